"""``dit-sparse bench patterns``: each sparsity pattern at its default parameters against dense cuDNN SDPA.

Method (issue "Sparsity patterns", benchmark section): B=1 self-attention of one layer with the token layout of
Wan2.1-1.3B 480p (grid 21×30×52, no text, 12×128) and HunyuanVideo 720p (grid 33×45×80 + 256 text tokens last,
24×128), bf16, block 128, randn q/k/v. Every head of the layer runs the same pattern. Per pattern we time, each
alone:

- **attn**: ``sparse_attention(q, k, v, mask, bs, perm=perm)`` with the layer's mask (and permutation for
  reordering patterns), as the processor calls it;
- **mask build**: ``build_layer_mask`` on the device (the processor caches it per layout and layer);
- **perm build**: ``build_layer_perm`` on the device (cached the same way), reordering patterns only;
- **perm in kernel**: attn minus the same kernel call without ``perm`` (the cost of the in-kernel gather/scatter);
- **perm copy**: the alternative to the in-kernel gather, timed whole: q/k/v permuted by one ``torch.gather`` each,
  the kernel without ``perm``, the output scattered back (3 + 1 extra copies of a q-sized tensor); its output is
  checked against the in-kernel one;
- **draft**: the dynamic builder (pooling, low-resolution map, top-k) plus forcing text dense, per call.

Each overhead is reported in ms and as % of the dense attention time (target ≤ ``--target-pct``, default 5 %).
Dense is SDPA pinned to cuDNN (FA2 if cuDNN refuses). CUDA timings are ``triton.testing.do_bench`` medians; CPU
timings are ``time.perf_counter`` medians on tiny layouts and only prove the benchmark runs.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .kernel import (
    _DTYPES,
    DENSE_COLUMNS,
    _dense_backends,
    _flatten,
    _fmt,
    _fmt_x,
    _max_abs_diff,
    _ratio,
    _reason,
    _tflops,
    _timer,
    cli_entry,
    default_out_dir,
    format_markdown,
    format_plain,
    markdown_head,
    resolve_block_size_and_dtype,
    resolve_device,
    run_benchmark,
    run_note,
)
from .patterns_args import (
    GPU_LAYOUTS,
    LAYOUTS,
    TINY_LAYOUTS,
    LayoutShape,
    unknown_layout_message,
)

SCHEMA_VERSION = 1
GPU_TINY_NOTE = "tiny layouts on the GPU: a smoke test, not representative pattern performance"

PatternArg = tuple[str, dict[str, Any]]


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    shapes: tuple[LayoutShape, ...]
    patterns: tuple[PatternArg, ...]
    block_size: int
    dtype_name: str
    reps: int
    warmup: int
    target_pct: float
    out_dir: Path
    device: str  # "cuda" | "cpu"
    seed: int
    note: str | None

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    def to_json(self) -> dict[str, Any]:
        from dit_sparse.patterns import pattern_name

        return {
            "shapes": [s.name for s in self.shapes],
            "patterns": [pattern_name(n, p) for n, p in self.patterns],
            "block_size": self.block_size,
            "dtype": self.dtype_name,
            "batch": 1,
            "reps_min": self.reps,
            "warmup_min": self.warmup,
            "target_pct": self.target_pct,
            "timer": (
                "triton.testing.do_bench median (L2 flush per run)"
                if self.device == "cuda"
                else "time.perf_counter median"
            ),
            "seed": self.seed,
            "out_dir": str(self.out_dir),
            "cpu_threads": torch.get_num_threads(),
        }


def default_patterns() -> tuple[PatternArg, ...]:
    """Every registered pattern at its default parameters, in registration order."""
    from dit_sparse.patterns import PATTERNS

    return tuple((name, {}) for name in PATTERNS)


def _resolve_patterns(items: Any) -> tuple[PatternArg, ...]:
    from dit_sparse.patterns import parse_pattern_name, pattern_name, validate_pattern

    out: dict[str, PatternArg] = {}
    for item in items or ():
        if isinstance(item, str):
            name, params = parse_pattern_name(item)  # ValueError names the pattern and lists the known ones
        else:
            name, params = item
        validate_pattern(name, params)
        out.setdefault(pattern_name(name, params), (name, dict(params)))
    return tuple(out.values()) or default_patterns()


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Check the parsed options (also when ``args`` was built by hand) and pick the device, layouts, patterns."""
    names = [str(n) for n in _flatten(getattr(args, "shapes", None))]
    for name in names:
        if name not in LAYOUTS:
            raise ValueError(unknown_layout_message(name))
    patterns = _resolve_patterns(getattr(args, "patterns", None))
    block_size, dtype_name = resolve_block_size_and_dtype(args)
    target = float(getattr(args, "target_pct", 5.0))
    if not target > 0:
        raise ValueError(f"--target-pct must be a percentage > 0, got {target}")

    tiny = bool(getattr(args, "tiny", False))
    device = resolve_device(args)

    if names:
        shapes = tuple(dict.fromkeys(LAYOUTS[n] for n in names))
    else:
        shapes = TINY_LAYOUTS if (tiny or device == "cpu") else GPU_LAYOUTS
    note = run_note(device, shapes, GPU_TINY_NOTE)
    out = getattr(args, "out", None)
    return Settings(
        shapes=shapes,
        patterns=patterns,
        block_size=block_size,
        dtype_name=dtype_name,
        reps=int(getattr(args, "reps", 20)),
        warmup=int(getattr(args, "warmup", 5)),
        target_pct=target,
        out_dir=Path(out) if out else default_out_dir(),
        device=device,
        seed=int(getattr(args, "seed", 0)),
        note=note,
    )


# --------------------------------------------------------------------------------------------------- pieces


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(ms: float | None, dense_ms: float | None) -> float | None:
    return None if ms is None or not dense_ms else 100.0 * ms / dense_ms


def draft_call(
    name: str,
    params: dict[str, Any],
    layout: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    perm: torch.Tensor | None,
) -> torch.Tensor:
    """The per-call work of a dynamic pattern as the processor does it for a group of heads sharing one pattern:
    the dynamic builder on ``q, k (B, H, N, D)`` (pooling, map, top-k), then text rows/columns forced dense."""
    from dit_sparse.patterns import PATTERNS, force_text_dense, validate_pattern

    builder = PATTERNS[name].dynamic
    if builder is None:
        raise ValueError(f"pattern {name!r} is not dynamic")
    head_perm = None if perm is None else perm[0, 0]  # (N,): shared by the group
    return force_text_dense(builder(layout, q, k, head_perm, **validate_pattern(name, params)), layout)


def _dense_baseline(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, st: Settings, log: Callable[[str], None], label: str
) -> tuple[list[dict], dict | None]:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    timer = _timer(st.device)
    _, h, n, d = q.shape
    flops = 4.0 * h * n * n * d
    dense: list[dict] = []
    baseline: dict | None = None
    for name, backend, skip in _dense_backends(st.device):
        entry: dict[str, Any] = {"backend": name}
        if skip is not None:
            entry["skipped"] = skip
        elif baseline is not None and name == "fa2":
            entry["skipped"] = "cuDNN ran: not needed as the baseline"
        else:
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v)
                    ms = timer(functools.partial(F.scaled_dot_product_attention, q, k, v), st.reps, st.warmup)
                entry.update(ms=ms, tflops=_tflops(flops, ms))
                baseline = baseline or entry
            except Exception as exc:  # backend unsupported for this dtype/shape/GPU
                entry["skipped"] = _reason(exc)
        dense.append(entry)
        if "ms" in entry:
            log(f"  {label} dense {name}: {entry['ms']:.4g} ms ({entry['tflops']:.3g} TF/s)")
        else:
            log(f"  {label} dense {name}: skipped ({entry['skipped']})")
    return dense, baseline


def _bench_pattern(
    shape: LayoutShape,
    layout: Any,
    name: str,
    params: dict[str, Any],
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dense_ms: float | None,
    st: Settings,
) -> dict[str, Any]:
    from dit_sparse.kernels import sparse_attention
    from dit_sparse.kernels.indices import token_density
    from dit_sparse.kernels.reference import reference_attention
    from dit_sparse.patterns import build_layer_mask, build_layer_perm, is_dynamic, pattern_name

    timer = _timer(st.device)
    q, k, v = qkv
    bs, n, dev = st.block_size, layout.seq_len, st.device
    heads = [(name, params)] * shape.heads
    row: dict[str, Any] = {
        "shape": shape.name,
        "pattern": name,
        "pattern_desc": pattern_name(name, params),
        "seq_len": n,
        "heads": shape.heads,
        "head_dim": shape.head_dim,
        "dynamic": is_dynamic(name),
        "impl": "triton" if dev == "cuda" else "gather",
        "error": None,
    }
    for key in ("mask", "perm_build", "perm_kernel", "draft"):
        row[f"{key}_ms"] = None
    row.update(attn_ms=None, attn_noperm_ms=None, per_call_ms=None, density=None, block_density=None)
    row.update(perm_copy_ms=None, perm_copy_max_abs_diff=None)
    try:
        mask = build_layer_mask(heads, layout, dev)  # (1, H, nB, nB)
        row["mask_ms"] = timer(functools.partial(build_layer_mask, heads, layout, dev), st.reps, st.warmup)
        perm = build_layer_perm(heads, layout, dev)  # (1, H, N) or None
        if perm is not None:
            row["perm_build_ms"] = timer(
                functools.partial(build_layer_perm, heads, layout, dev), st.reps, st.warmup
            )
        if row["dynamic"]:
            mask = draft_call(name, params, layout, q, k, perm)  # (1, H, nB, nB)
            row["draft_ms"] = timer(
                functools.partial(draft_call, name, params, layout, q, k, perm), st.reps, st.warmup
            )
        row["density"] = float(token_density(mask, bs, n, n))
        row["block_density"] = float(mask.float().mean())
        out = sparse_attention(q, k, v, mask, bs, perm=perm)
        row["attn_ms"] = timer(
            functools.partial(sparse_attention, q, k, v, mask, bs, perm=perm), st.reps, st.warmup
        )
        if perm is not None:
            row["attn_noperm_ms"] = timer(
                functools.partial(sparse_attention, q, k, v, mask, bs), st.reps, st.warmup
            )
            row["perm_kernel_ms"] = row["attn_ms"] - row["attn_noperm_ms"]  # may be < 0 within timing noise
            copy_call = functools.partial(_perm_copy_call, q, k, v, mask, bs, perm)
            row["perm_copy_ms"] = timer(copy_call, st.reps, st.warmup)
            row["perm_copy_max_abs_diff"] = _max_abs_diff(copy_call(), out)
        row["per_call_ms"] = row["attn_ms"] + (row["draft_ms"] or 0.0)
        if dev == "cpu" and n <= 4096:
            ref = reference_attention(q, k, v, mask, bs, perm=perm)
            row["max_abs_diff_vs_reference"] = _max_abs_diff(out, ref)
        del out
    except Exception as exc:
        row["error"] = _reason(exc)

    row["dense_ms"] = dense_ms
    row["speedup_vs_dense"] = _ratio(dense_ms, row["per_call_ms"])
    over = []
    for key in ("mask", "perm_build", "perm_kernel", "draft"):
        pct = _pct(row[f"{key}_ms"], dense_ms)
        row[f"{key}_pct"] = pct
        if pct is not None and pct > st.target_pct:
            over.append(key)
    row["over_target"] = over
    # judged on CUDA only: CPU timings of the tiny layouts say nothing about the overhead on a GPU
    row["within_target"] = None if dense_ms is None or row["error"] or st.device != "cuda" else not over
    return row


def _perm_copy_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    bs: int,
    perm: torch.Tensor,
) -> torch.Tensor:
    """``sparse_attention(..., perm=perm)`` done with copies instead of the in-kernel gather: q/k/v permuted before,
    the output scattered back after."""
    from dit_sparse.kernels import sparse_attention
    from dit_sparse.kernels.permutation import permute_tokens, unpermute_tokens

    qp, kp, vp = permute_tokens(q, perm), permute_tokens(k, perm), permute_tokens(v, perm)
    return unpermute_tokens(sparse_attention(qp, kp, vp, mask, bs), perm)


def _bench_shape(shape: LayoutShape, st: Settings, log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    from dit_sparse.patterns import MaskLayout

    layout = MaskLayout(
        grid=shape.grid, num_text=shape.num_text, text_first=shape.text_first, block_size=st.block_size
    )
    n, h, d = layout.seq_len, shape.heads, shape.head_dim
    gen = torch.Generator(device=st.device).manual_seed(st.seed)
    q, k, v = (torch.randn((1, h, n, d), generator=gen, device=st.device, dtype=st.dtype) for _ in range(3))
    dense, baseline = _dense_baseline(q, k, v, st, log, shape.name)
    info = {
        "name": shape.name,
        "label": shape.label,
        "grid": list(shape.grid),
        "num_text": shape.num_text,
        "text_first": shape.text_first,
        "seq_len": n,
        "num_blocks": layout.num_blocks,
        "heads": h,
        "head_dim": d,
        "tiny": shape.tiny,
        "dense": dense,
        "dense_baseline": baseline["backend"] if baseline else None,
    }
    dense_ms = baseline["ms"] if baseline else None
    rows = []
    for name, params in st.patterns:
        row = _bench_pattern(shape, layout, name, params, (q, k, v), dense_ms, st)
        row["dense_baseline"] = info["dense_baseline"]
        rows.append(row)
        log(_progress_line(row))
    return info, rows


# --------------------------------------------------------------------------------------------------- tables


def _progress_line(row: dict) -> str:
    if row["error"]:
        return f"  {row['shape']} {row['pattern_desc']}: FAILED ({row['error']})"
    extras = [f"mask {_fmt(row['mask_ms'], '.3g')} ms"]
    if row["perm_build_ms"] is not None:
        extras.append(f"perm {_fmt(row['perm_build_ms'], '.3g')} + {_fmt(row['perm_kernel_ms'], '.3g')} ms")
        extras.append(f"attn with perm copies {_fmt(row['perm_copy_ms'], '.4g')} ms")
    if row["draft_ms"] is not None:
        extras.append(f"draft {_fmt(row['draft_ms'], '.3g')} ms")
    return (
        f"  {row['shape']} {row['pattern_desc']}: density {row['density']:.3f}, attn {_fmt(row['attn_ms'], '.4g')} ms "
        f"({_fmt_x(row['speedup_vs_dense'])} dense), " + ", ".join(extras)
    )


COLUMNS = (
    "shape",
    "pattern",
    "density",
    "attn ms",
    "per call ms",
    "× dense",
    "mask ms",
    "mask %",
    "perm ms",
    "perm %",
    "perm kernel ms",
    "perm kernel %",
    "attn, perm copies ms",
    "draft ms",
    "draft %",
    "≤ target",
)


def table_rows(result: dict) -> tuple[list[list[str]], list[list[str]]]:
    body = []
    for r in result["rows"]:
        ok = (
            "-"
            if r["within_target"] is None
            else ("yes" if r["within_target"] else "no: " + ", ".join(r["over_target"]))
        )
        body.append(
            [
                r["shape"],
                r["pattern_desc"],
                _fmt(r["density"], ".3f"),
                "FAILED" if r["error"] else _fmt(r["attn_ms"], ".4g"),
                _fmt(r["per_call_ms"], ".4g"),
                _fmt_x(r["speedup_vs_dense"]),
                _fmt(r["mask_ms"], ".3g"),
                _fmt_pct(r["mask_pct"]),
                _fmt(r["perm_build_ms"], ".3g"),
                _fmt_pct(r["perm_build_pct"]),
                _fmt(r["perm_kernel_ms"], ".3g"),
                _fmt_pct(r["perm_kernel_pct"]),
                _fmt(r["perm_copy_ms"], ".4g"),
                _fmt(r["draft_ms"], ".3g"),
                _fmt_pct(r["draft_pct"]),
                ok,
            ]
        )
    dense = []
    for s in result["shapes"]:
        for e in s["dense"]:
            note = e.get("skipped", "baseline" if e["backend"] == s["dense_baseline"] else "")
            hd = f"{s['heads']}×{s['head_dim']}"
            dense.append(
                [
                    s["name"],
                    str(s["seq_len"]),
                    hd,
                    e["backend"],
                    _fmt(e.get("ms"), ".4g"),
                    _fmt(e.get("tflops")),
                    note,
                ]
            )
    return body, dense


def _explain(result: dict) -> list[str]:
    target = result["settings"]["target_pct"]
    impl = "Triton kernel" if result["device"] == "cuda" else "CPU gather path"
    return [
        f"attn ms: sparse_attention(q, k, v, layer mask, block_size, perm=perm) on the {impl}, every head running "
        "the pattern; per call ms: attn + draft (what every call costs; mask and perm builds are cached per "
        "layout and layer); × dense: dense ms / per call ms.",
        "mask ms: build_layer_mask on the device; perm ms: build_layer_perm on the device (reordering patterns); "
        "perm kernel ms: attn ms - the same call without perm (in-kernel gather/scatter; may be < 0 in noise); "
        "attn, perm copies ms: the alternative, q/k/v permuted by torch.gather, the kernel without perm, the output "
        "scattered back (compare with attn ms); "
        "draft ms: dynamic builder (pool q/k per block, low-res map, top-k) + text forced dense, per call.",
        f"%: of the dense attention time; ≤ target: every overhead ≤ {target:g} % of dense (else the ones above); "
        "judged on CUDA only (CPU: -).",
        "density: fraction of the N² token pairs the kernel computes (text rows/columns dense).",
    ]


def render_markdown(result: dict) -> str:
    body, dense = table_rows(result)
    lines = [
        *markdown_head("patterns benchmark", result),
        "## Patterns",
        "",
        format_markdown(COLUMNS, body),
        "",
        *(f"- {line}" for line in _explain(result)),
        "",
        "## Dense (once per shape)",
        "",
        format_markdown(DENSE_COLUMNS, dense),
        "",
    ]
    return "\n".join(lines)


def render_plain(result: dict) -> str:
    body, dense = table_rows(result)
    lines = [f"dit-sparse patterns benchmark on {result['device_name']} ({result['device']})"]
    if result["note"]:
        lines.append(f"NOTE: {result['note']}")
    lines += ["", format_plain(COLUMNS, body), "", *_explain(result), "", format_plain(DENSE_COLUMNS, dense)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- run


def _describe(shape: LayoutShape) -> str:
    f, h, w = shape.grid
    return f"{shape.label}: grid {f}×{h}×{w} + {shape.num_text} text, N={shape.seq_len}, {shape.heads}×{shape.head_dim}"


def run(settings: Settings, log: Callable[[str], None] = print) -> tuple[dict, Path]:
    return run_benchmark(
        "dit-sparse bench patterns",
        settings,
        _bench_shape,
        _describe,
        render_plain,
        render_markdown,
        "patterns",
        log,
        schema_version=SCHEMA_VERSION,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dit-sparse bench patterns``: 0 when every pattern ran, 1 otherwise, 2 on bad options."""
    return cli_entry(args, resolve_settings, run, "pattern measurement(s)")
