"""``dit-sparse bench patterns``: the tiny CPU run writes an honest JSON record per pattern; bad options fail clearly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from dit_sparse.benchmarks import kernel as kbench
from dit_sparse.benchmarks import patterns as bench
from dit_sparse.cli import main
from dit_sparse.patterns import PATTERNS, MaskLayout, build_layer_mask, build_layer_perm

TINY = ["bench", "patterns", "--tiny", "--reps", "1", "--warmup", "0"]


def _run(tmp_path: Path, *extra: str) -> dict:
    assert main([*TINY, *extra, "--out", str(tmp_path)]) == 0
    (path,) = sorted(tmp_path.glob("patterns-cpu-*.json"))
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text())


def test_tiny_run_every_pattern(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _run(tmp_path, "--shapes", "tiny-hunyuan")
    out = capsys.readouterr().out
    assert kbench.CPU_NOTE in out  # never presented as kernel performance

    assert data["benchmark"] == "dit-sparse bench patterns"
    assert data["device"] == "cpu" and data["note"] == kbench.CPU_NOTE
    for key in ("torch", "triton", "cuda", "cudnn", "dit_sparse", "git_commit"):
        assert key in data["versions"]
    assert data["versions"]["torch"] == torch.__version__
    assert isinstance(data["command"], str) and data["argv"]
    assert data["started_at"] and data["finished_at"]
    st = data["settings"]
    assert st["block_size"] == 128 and st["dtype"] == "bf16" and st["target_pct"] == 5.0

    (shape,) = data["shapes"]
    assert shape["grid"] == [5, 8, 12] and shape["num_text"] == 16 and shape["text_first"] is False
    assert shape["seq_len"] == 496 and shape["num_blocks"] == 4
    dense = {e["backend"]: e for e in shape["dense"]}
    assert "skipped" in dense["cudnn"] and dense["cpu-flash"]["ms"] > 0
    assert shape["dense_baseline"] == "cpu-flash"

    rows = {r["pattern"]: r for r in data["rows"]}
    assert list(rows) == list(PATTERNS)  # one row per registered pattern, at its defaults
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        assert r["attn_ms"] > 0 and r["mask_ms"] > 0 and r["per_call_ms"] >= r["attn_ms"]
        assert r["dense_ms"] == dense["cpu-flash"]["ms"]
        assert r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["per_call_ms"])
        assert r["mask_pct"] == pytest.approx(100 * r["mask_ms"] / r["dense_ms"])
        assert r["within_target"] is None  # not judged on the CPU
        assert 0.0 <= r["density"] <= 1.0
        assert r["max_abs_diff_vs_reference"] < 0.05  # bf16 gather path (with perm) vs fp64
    # overheads exist exactly where the pattern has them
    assert rows["reorder_window"]["perm_build_ms"] > 0 and rows["reorder_window"]["attn_noperm_ms"] > 0
    # the pre-gathered alternative gives the in-kernel gather's output
    for name in ("reorder_window", "draft"):
        assert rows[name]["perm_copy_ms"] > 0 and rows[name]["perm_copy_max_abs_diff"] < 1e-2
    assert rows["draft"]["draft_ms"] > 0 and rows["draft"]["perm_build_ms"] > 0 and rows["draft"]["dynamic"]
    for name in ("full", "window", "skip", "radial"):
        assert rows[name]["perm_build_ms"] is None and rows[name]["draft_ms"] is None
        assert rows[name]["perm_copy_ms"] is None
    # densities against hand counts: 496 tokens in 4 blocks (last holds 112 tokens, the 16 text tokens among them)
    assert rows["full"]["density"] == 1.0
    assert rows["skip"]["density"] == pytest.approx((2 * 112 * 496 - 112 * 112) / 496**2)  # text row + column


def test_draft_call_matches_processor_recipe() -> None:
    """The timed draft work is the dynamic builder on permuted pooled q/k, top-k per row, diagonal, text dense."""
    layout = MaskLayout(grid=(3, 8, 16), num_text=5, block_size=32)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn((1, 2, layout.seq_len, 16), generator=gen) for _ in range(2))
    heads = [("draft", {"budget": 0.25})] * 2
    perm = build_layer_perm(heads, layout, "cpu")
    assert perm is not None
    mask = bench.draft_call("draft", {"budget": 0.25}, layout, q, k, perm)
    # brute force: pool the permuted tokens per block, softmax, top ceil(0.25 nB) per row, + diagonal + text
    nb, bs = layout.num_blocks, layout.block_size
    qp, kp = q[:, :, perm[0, 0]].double(), k[:, :, perm[0, 0]].double()
    pooled = [
        torch.stack([x[..., i * bs : (i + 1) * bs, :].mean(-2) for i in range(nb)], -2) for x in (qp, kp)
    ]
    probs = torch.softmax(pooled[0] @ pooled[1].transpose(-1, -2) / 4.0, -1)  # (1, 2, nB, nB)
    want = torch.zeros_like(probs, dtype=torch.bool)
    want.scatter_(-1, probs.topk(-(-nb // 4), -1).indices, True)
    want |= torch.eye(nb, dtype=torch.bool)
    text = build_layer_mask([("skip", {})], layout, "cpu")[0, 0]  # text rows/columns only
    assert torch.equal(mask, want | text)


def test_never_overwrites(tmp_path: Path) -> None:
    args = [*TINY, "--shapes", "tiny-wan", "--patterns", "full", "skip", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0
    names = {p.name for p in tmp_path.glob("*.json")}
    assert len(names) == 2 and sum(n.endswith("-2.json") for n in names) == 1, names
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_pattern_with_params_and_dedup(tmp_path: Path) -> None:
    data = _run(tmp_path, "--shapes", "tiny-wan", "--patterns", "window(f=0,h=1,w=1)", "window(f=0,h=1,w=1)")
    (row,) = data["rows"]
    assert row["pattern_desc"] == "window(f=0,h=1,w=1)" and row["density"] < 1.0


def test_unknown_shape_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--shapes", "wan9-720p", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "wan9-720p" in err and "wan2.1-1.3b-480p" in err and "hunyuanvideo-720p" in err


@pytest.mark.parametrize(
    ("bad", "says"),
    [("nope", "unknown pattern 'nope'"), ("window(q=1)", "no parameter(s) ['q']"), ("window(f=-1)", ">= 0")],
)
def test_bad_pattern_is_a_clear_error(bad: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--patterns", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err
    if bad == "nope":
        assert "radial" in err and "draft" in err  # lists the known patterns


def test_resolve_settings_checks_hand_built_args(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown shape 'nope'"):
        bench.resolve_settings(argparse.Namespace(shapes=["nope"], tiny=True))
    with pytest.raises(ValueError, match="unknown pattern 'nope'"):
        bench.resolve_settings(argparse.Namespace(patterns=["nope"], tiny=True))
    assert bench.run_from_args(argparse.Namespace(patterns=["nope"], tiny=True)) == 2
    assert "unknown pattern 'nope'" in capsys.readouterr().err
    st = bench.resolve_settings(argparse.Namespace(tiny=True))
    assert st.device == "cpu" and [n for n, _ in st.patterns] == list(PATTERNS)
    assert [s.name for s in st.shapes] == ["tiny-wan", "tiny-hunyuan"]


def test_gpu_layouts_are_the_real_models() -> None:
    from dit_sparse.benchmarks.patterns_args import LAYOUTS

    wan, hy = LAYOUTS["wan2.1-1.3b-480p"], LAYOUTS["hunyuanvideo-720p"]
    assert (wan.grid, wan.num_text, wan.heads, wan.head_dim, wan.seq_len) == (
        (21, 30, 52),
        0,
        12,
        128,
        32_760,
    )
    assert (hy.grid, hy.num_text, hy.text_first, hy.heads, hy.seq_len) == (
        (33, 45, 80),
        256,
        False,
        24,
        119_056,
    )


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "patterns", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--patterns" in out and "--tiny" in out and "--target-pct" in out
