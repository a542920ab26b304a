"""`dit-sparse generate --model PATH`: a diffusers pipeline saved to a local folder (tokenizer + text encoder
included) loads offline and runs dense and sparse from a text prompt."""

from __future__ import annotations

import json

import pytest
from tiny_wan import tiny_text_wan_pipeline, tiny_wan_transformer

from dit_sparse import Profile
from dit_sparse.cli import main

ARGS = ["--height", "64", "--width", "80", "--frames", "13", "--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "moving", "left", "blue", "square", "right"]
    pipe = tiny_text_wan_pipeline(words)
    transformer = pipe.transformer
    root = tmp_path_factory.mktemp("models")
    pipe.save_pretrained(root / "tiny-wan-local")
    profile = Profile.uniform(transformer, "window", {"f": 0, "h": 1, "w": 1}, block_size=16)
    profile.save(root / "profile.json")
    return root


def test_generate_from_a_local_folder(saved_pipeline, tmp_path):
    model = str(saved_pipeline / "tiny-wan-local")
    profile = str(saved_pipeline / "profile.json")
    assert main(["generate", "--model", model, "--profile", profile, *ARGS, "--out", str(tmp_path)]) == 0
    (run_dir,) = list(tmp_path.iterdir())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"] == model and report["frames"] == 13
    assert 0 < report["runs"]["sparse"]["mean_density"] < 1
    assert len(report["metrics"]["psnr_per_frame"]) == 13
    assert (run_dir / "side_by_side.mp4").stat().st_size > 0


def test_profile_for_another_model_fails_before_generating(saved_pipeline, tmp_path):
    other = Profile.dense(tiny_wan_transformer(num_layers=3))
    path = other.save(tmp_path / "other.json")
    model = str(saved_pipeline / "tiny-wan-local")
    with pytest.raises(SystemExit, match=r"profile has 3 layers × 2 heads.*transformer has 2 × 2"):
        main(["generate", "--model", model, "--profile", str(path), *ARGS, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing was generated or written
    with pytest.raises(SystemExit, match="no profile ships"):
        main(["generate", "--model", model, *ARGS, "--out", str(tmp_path / "o")])
