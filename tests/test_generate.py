"""`dit-sparse generate` end to end on the bundled tiny model at a small size (CPU, offline)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_profiles import write_sparse_profile

from dit_sparse.cli import main

SMALL = ["--height", "64", "--width", "48", "--frames", "9", "--steps", "3", "--seed", "3"]
# latent 5×12×12 = 720 video + 16 text tokens = 12 blocks of 64 (the last partial): a window profile skips blocks
MEDIUM = ["--height", "96", "--width", "96", "--frames", "17", "--steps", "4", "--seed", "3"]


def test_generate_both_modes_writes_videos_and_report(tmp_path, capsys):
    # a profile with sparse heads in every layer (the shipped one keeps a layer dense)
    profile = write_sparse_profile(tmp_path / "sparse.json")
    assert main(["generate", *MEDIUM, "--profile", str(profile), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    (run_dir,) = list((tmp_path / "out").iterdir())
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["dense.mp4", "report.json", "side_by_side.mp4", "sparse.mp4"]
    report = json.loads((run_dir / "report.json").read_text())
    runs, metrics = report["runs"], report["metrics"]
    assert runs["dense"]["seconds"] > 0 and runs["sparse"]["seconds"] > 0
    assert 0 < runs["sparse"]["mean_density"] < 1  # the profile really runs sparse at this size
    assert len(metrics["psnr_per_frame"]) == 17 and len(metrics["ssim_per_frame"]) == 17
    assert metrics["psnr_mean"] > 20 and 0 < metrics["ssim_mean"] <= 1
    assert metrics["speedup"] == pytest.approx(runs["dense"]["seconds"] / runs["sparse"]["seconds"])
    # the table names every number a user looks for
    for word in ("time (s)", "density", "speedup", "PSNR", "SSIM", "sparse", "dense"):
        assert word in printed
    # the mp4s decode back to the right number of frames and size (side by side is wider)
    import imageio.v3 as iio

    dense = iio.imread(run_dir / "dense.mp4")
    both = iio.imread(run_dir / "side_by_side.mp4")
    assert dense.shape[:3] == (17, 96, 96) and both.shape[0] == 17 and both.shape[2] > 2 * 96


def test_generate_never_overwrites_a_previous_run(tmp_path):
    for _ in range(2):
        assert main(["generate", *SMALL, "--mode", "dense", "--out", str(tmp_path)]) == 0
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["a-red-circle-moving-left-seed3", "a-red-circle-moving-left-seed3-1"]


def test_generate_dense_is_deterministic_and_matches_sparse_without_profile_effect(tmp_path):
    """Same seed -> same dense video; a dense-only run writes no sparse files and no metrics."""
    assert main(["generate", *SMALL, "--mode", "dense", "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", *SMALL, "--mode", "dense", "--out", str(tmp_path / "b")]) == 0
    (ra,) = list((tmp_path / "a").iterdir())
    (rb,) = list((tmp_path / "b").iterdir())
    assert (ra / "dense.mp4").read_bytes() == (rb / "dense.mp4").read_bytes()
    assert json.loads((ra / "report.json").read_text())["metrics"] == {}


def test_generate_bad_profile_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(["generate", *SMALL, "--profile", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="cannot load 'no/such-model' offline"):
        main(["generate", "--model", "no/such-model", "--out", str(tmp_path / "o")])


def test_generate_help_explains_options():
    out = subprocess.run(
        [sys.executable, "-m", "dit_sparse", "generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for opt in ("--prompt", "--model", "--profile", "--mode", "--steps", "--seed", "--frames", "--out"):
        assert opt in out
