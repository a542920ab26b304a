"""``dit-sparse bench kernel``: the tiny CPU run writes an honest JSON record; bad options fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_sparse.benchmarks import kernel as bench
from dit_sparse.cli import main
from dit_sparse.kernels.indices import indices_to_block_mask

TINY = ["bench", "kernel", "--tiny", "--reps", "1", "--warmup", "0", "--densities", "1.0", "0.25"]


def test_tiny_run_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([*TINY, "--shapes", "tiny-d64", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert bench.CPU_NOTE in out  # never presented as kernel performance

    files = sorted(tmp_path.glob("kernel-cpu-*.json"))
    assert len(files) == 1
    assert files[0].with_suffix(".md").exists()
    data = json.loads(files[0].read_text())
    assert data["device"] == "cpu"
    assert data["note"] == bench.CPU_NOTE
    for key in ("torch", "triton", "cuda", "cudnn", "dit_sparse"):
        assert key in data["versions"]
    assert data["versions"]["torch"] == torch.__version__
    assert isinstance(data["command"], str) and data["argv"]
    assert data["started_at"] and data["finished_at"]
    assert data["settings"]["block_size"] == 128 and data["settings"]["dtype"] == "bf16"

    rows = data["rows"]
    assert [r["mask"] for r in rows] == ["random", "random", "structured"]
    for r in rows:
        assert r["error"] is None
        assert isinstance(r["ms"], float) and r["ms"] > 0
        assert r["speedup_vs_dense"] is not None and r["speedup_vs_dense"] > 0
        assert "speedup_vs_flex" in r and r["flex_skipped"]  # Flex is not run on the CPU, with a reason
        assert r["index_ms"] > 0 and r["tflops"] > 0
        assert r["max_abs_diff_vs_reference"] < 0.05  # bf16 output of the gather path vs fp64
        assert r["kernel_ms"] > 0 and "kernel_error" not in r
    # a fixed count of kv blocks per query-block row
    assert rows[1]["kv_blocks_per_row_std"] == 0.0
    assert rows[0]["computed_block_pairs"] == 2 * 5 * 5  # density 1: every block, 2 heads, ceil(520/128)=5

    (shape,) = data["shapes"]
    dense = {e["backend"]: e for e in shape["dense"]}
    assert "skipped" in dense["cudnn"] and "skipped" in dense["fa2"]
    assert dense["cpu-flash"]["ms"] > 0
    assert shape["dense_baseline"] == "cpu-flash"


def test_never_overwrites(tmp_path: Path) -> None:
    args = [*TINY, "--shapes", "tiny-d64", "--no-structured", "--densities", "0.5", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0
    names = {p.name for p in tmp_path.glob("*.json")}
    assert len(names) == 2 and sum(n.endswith("-2.json") for n in names) == 1, names
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_unknown_shape_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--shapes", "wan9-720p", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "wan9-720p" in err and "wan2.1-1.3b-480p" in err


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1"])
def test_density_out_of_range_is_a_clear_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "kernel", "--tiny", "--densities", bad])
    assert "outside (0, 1]" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad option found after parsing exits 2 with the message, not a traceback (shared ``cli_entry``)."""
    assert main(["bench", "kernel", "--device", "cuda", "--shapes", "tiny-d64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda") and "--tiny" in err


def test_resolve_settings_checks_hand_built_args() -> None:
    import argparse

    with pytest.raises(ValueError, match="nope"):
        bench.resolve_settings(argparse.Namespace(shapes=["nope"], tiny=True))
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        bench.resolve_settings(argparse.Namespace(densities=[0.0], tiny=True))


def test_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dit_sparse", "bench", "kernel", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--densities" in proc.stdout and "--tiny" in proc.stdout


def test_random_mask_has_fixed_count_per_row() -> None:
    for density, nkb in ((0.05, 10), (0.25, 37), (0.5, 8), (1.0, 5)):
        mask = bench.random_block_mask(3, 4, nkb, density, seed=1, device="cpu")
        assert mask.shape == (1, 3, 4, nkb)
        assert (mask.sum(-1) == bench.kv_blocks_per_row(density, nkb)).all()
    assert bench.kv_blocks_per_row(0.05, 10) == 1  # round(0.5) rounds up
    assert bench.kv_blocks_per_row(0.01, 10) == 1  # at least one


def test_structured_mask_density_and_flex_lists() -> None:
    mask, desc = bench.structured_block_mask(4, 256, 256, seed=0, device="cpu")
    assert 0.1 <= mask.float().mean() <= 0.2
    assert mask[..., 0].all() and mask.diagonal(dim1=-2, dim2=-1).all()  # sink and diagonal
    assert desc.startswith("structured(")
    small, _ = bench.structured_block_mask(2, 5, 5, seed=0, device="cpu")
    block_mask = bench._flex_block_mask(small, 128, 520)
    assert int(block_mask.kv_num_blocks.sum()) == 0  # every allowed block is full
    rebuilt = indices_to_block_mask(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 5)
    assert torch.equal(rebuilt, small)
