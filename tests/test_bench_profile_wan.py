"""benchmarks/profile_wan.py: the profiler's time and memory on a random-weight Wan pipeline (here: its --tiny CPU
mode, the same code path as the GPU run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dit_sparse.benchmarks import profile_wan
from dit_sparse.profile import Profile


@pytest.mark.slow
def test_tiny_run_writes_a_result_and_a_valid_profile_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert profile_wan.main(["--tiny", "--out", str(out), "--quiet"]) == 0
    files = sorted(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    data = json.loads(files[0].read_text())
    assert data["device"] == "cpu" and data["gpu"] is None and "not GPU performance" in data["note"]
    assert data["versions"]["torch"] and data["versions"]["diffusers"]

    model = data["model"]
    assert (
        model["transformer"] == "WanTransformer3DModel" and model["num_layers"] == 2 and model["heads"] == 2
    )
    run = data["profile_run"]
    assert run["exit_code"] == 0 and run["error"] is None and run["wall_s"] > 0
    for stage in ("load_pipeline", "cost_model", "search", "verify"):
        assert run["stages"][stage]["calls"] == 1 and run["stages"][stage]["seconds"] >= 0
    # the default video prompt set: 4 calibration samples (the 5th prompt is held out for the check)
    assert len(run["calibration_sample_s"]) == 4

    # the profile inside the result is a valid profile for this model, with its end-to-end check recorded
    prof = Profile.from_dict(data["profile_figures"]["profile"])
    assert prof.family == "wan" and prof.fingerprint.num_layers == model["num_layers"]
    assert prof.fingerprint.num_heads == model["heads"] and len(prof.layers) == model["num_layers"]
    summary = data["profile_figures"]["summary"]
    assert 0 < summary["measured_mean_density"] <= 1 and summary["measured_dense_seconds"] > 0

    # a second run never replaces the first result
    assert profile_wan.main(["--tiny", "--out", str(out), "--quiet", "--no-verify"]) == 0
    assert {p.name for p in out.glob("*.json")} == {files[0].name, files[0].stem + "-2.json"}
    assert json.loads(files[0].read_text()) == data


@pytest.mark.slow
def test_an_interrupted_run_still_writes_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpu_check.sh stops a stage with SIGINT at its time limit: the calibration samples already timed must still
    reach the result file (a run that is killed before it writes anything measures nothing)."""
    from dit_sparse.profiler import run as profiler_run

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(profiler_run, "verify", stop)  # interrupted after calibration and search
    out = tmp_path / "results"
    assert profile_wan.main(["--tiny", "--out", str(out), "--quiet"]) == 1
    (path,) = out.glob("*.json")
    run = json.loads(path.read_text())["profile_run"]
    assert run["exit_code"] == 130 and run["error"].startswith("interrupted after")
    assert len(run["calibration_sample_s"]) == 4 and run["stages"]["search"]["calls"] == 1
    # the stage the interrupt hit is recorded up to the interrupt
    assert run["stages"]["verify"]["calls"] == 1
