"""Profile JSON: round trip, atomic save, refusing to clobber, clear errors for bad files."""

from __future__ import annotations

import json

import pytest
from tiny_wan import tiny_wan_transformer

from dit_sparse import Profile
from dit_sparse.profile import SCHEMA_VERSION, ProfileError


@pytest.fixture(scope="module")
def transformer():
    return tiny_wan_transformer()


def test_round_trip_is_exact(tmp_path, transformer):
    prof = Profile.uniform(transformer, "window", {"f": 2, "h": 3, "w": 4}, dense_steps=2, block_size=64)
    prof.layers[1][0].density = 0.25
    prof.layers[1][0].rel_error = 0.01
    prof.stamp(prompts=["a red circle"], seeds=[0], steps=10)
    path = prof.save(tmp_path / "p.json")
    loaded = Profile.load(path)
    assert loaded.to_dict() == prof.to_dict()
    assert loaded.fingerprint.num_layers == 2 and loaded.schedule.dense_steps == 2
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


def test_save_refuses_to_overwrite(tmp_path, transformer):
    path = tmp_path / "p.json"
    path.write_text("user data")
    prof = Profile.dense(transformer)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prof.save(path)
    assert path.read_text() == "user data"  # nothing lost
    prof.save(path, overwrite=True)
    assert Profile.load(path).to_dict() == prof.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp files left behind


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "newer than this dit-sparse supports"),
        (lambda d: d.update(schema_version=0), "too old"),
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d["layers"][0][0].update(pattern="nonsense"), "unknown pattern 'nonsense'"),
        (lambda d: d["layers"][0][0].update(pattern="window", params={"f": -1}), "integer >= 0"),
        (lambda d: d["layers"][0][0].update(pattern="window", params={"q": 1}), "no parameter"),
        (lambda d: d["layers"].pop(), "lists 1 layers"),
        (lambda d: d["layers"][0].pop(), "layer 0 lists 1 heads"),
        (lambda d: d.update(block_size=100), "block_size"),
        (lambda d: d["schedule"].update(dense_layers=[7]), "out of range"),
        (lambda d: d.pop("model"), "malformed"),
    ],
)
def test_bad_profiles_name_the_problem(tmp_path, transformer, mutate, message):
    data = Profile.dense(transformer).to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        Profile.load(path)


def test_corrupt_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema_version": 1, "layers": [')
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(corrupt)
    with pytest.raises(ProfileError, match="not found"):
        Profile.load(tmp_path / "missing.json")
    binary = tmp_path / "pickle.pkl"
    binary.write_bytes(b"\x80\x04\x95\x00\x00")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(binary)
    with pytest.raises(ProfileError, match="expected a JSON object"):
        Profile.loads("[1, 2]")


def test_mismatch_names_both_shapes(transformer):
    prof = Profile.dense(tiny_wan_transformer(num_layers=3))
    fam = "wan"
    from dit_sparse.pipelines import family_for

    with pytest.raises(
        ProfileError, match=r"profile has 3 layers × 2 heads \(head_dim 64\), transformer has 2 × 2"
    ):
        prof.check_compatible(family_for(transformer).fingerprint(transformer), fam)
    with pytest.raises(ProfileError, match="'flux' family"):
        prof.family = "flux"
        prof.check_compatible(family_for(transformer).fingerprint(transformer), fam)
