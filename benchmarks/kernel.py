"""``dit-sparse bench kernel``: dit-sparse's block-sparse attention against dense SDPA and FlexAttention.

Method (DESIGN §7, notes/kernels.md §9): B=1 self-attention on the shapes of Wan2.1, HunyuanVideo, CogVideoX and
FLUX, bf16 by default, randn inputs. Per shape the dense baselines (SDPA pinned to cuDNN, then to FlashAttention-2)
are timed once; per mask (random masks with a fixed number of kv blocks per query-block row at each density, plus one
structured mask) we time ``sparse_attention`` (Triton on CUDA), the index build alone, and FlexAttention with the
same blocks. CUDA timings are ``triton.testing.do_bench`` medians (L2 flushed between runs); CPU timings are
``time.perf_counter`` medians and only prove the benchmark runs.

TFLOP/s count computed blocks only: ``4·D·Σ_(b,h) allowed_block_pairs·bs² / t`` for sparse (same token set for ours
and Flex), ``4·B·H·N²·D / t`` for dense.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import inspect
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .kernel_args import (
    BLOCK_SIZES,
    DEFAULT_DENSITIES,
    GPU_SHAPES,
    SHAPES,
    TINY_SHAPES,
    AttentionShape,
    density_out_of_range_message,
    unknown_shape_message,
)

SCHEMA_VERSION = 1
CPU_NOTE = "CPU/tiny: proves the benchmark runs; not kernel performance"
GPU_TINY_NOTE = "tiny shapes on the GPU: a smoke test, not representative kernel performance"
STRUCTURED_TARGET_DENSITY = 0.15
# Functions the Triton launcher may expose to say at which granularity it builds its index (first found wins).
_GRANULARITY_FUNCS = ("index_granularity", "granularity", "kernel_granularity", "launch_granularity")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    shapes: tuple[AttentionShape, ...]
    densities: tuple[float, ...]
    structured: bool
    block_size: int
    dtype_name: str
    reps: int
    warmup: int
    out_dir: Path
    device: str  # "cuda" | "cpu"
    flex: bool
    seed: int
    note: str | None

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    def to_json(self) -> dict[str, Any]:
        return {
            "shapes": [s.name for s in self.shapes],
            "densities": list(self.densities),
            "structured_mask": self.structured,
            "block_size": self.block_size,
            "dtype": self.dtype_name,
            "batch": 1,
            "reps_min": self.reps,
            "warmup_min": self.warmup,
            "timer": (
                "triton.testing.do_bench median (L2 flush per run)"
                if self.device == "cuda"
                else "time.perf_counter median"
            ),
            "flex": self.flex,
            "seed": self.seed,
            "out_dir": str(self.out_dir),
            "cpu_threads": torch.get_num_threads(),
        }


def _flatten(items: Iterable[Any] | None) -> list[Any]:
    out: list[Any] = []
    for item in items or ():
        if isinstance(item, (list, tuple)):
            out.extend(item)
        elif isinstance(item, str):
            out.extend(p.strip() for p in item.split(",") if p.strip())
        else:
            out.append(item)
    return out


def default_out_dir() -> Path:
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").exists():  # a source checkout: benchmarks/results next to this file
        return here / "results"
    return Path.cwd() / "benchmarks" / "results"


def resolve_block_size_and_dtype(args: argparse.Namespace) -> tuple[int, str]:
    """``--block-size`` and ``--dtype``, checked (also when ``args`` was built by hand)."""
    block_size = int(getattr(args, "block_size", 128))
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"--block-size must be one of {BLOCK_SIZES}, got {block_size}")
    dtype_name = getattr(args, "dtype", "bf16")
    if dtype_name not in _DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(_DTYPES)}, got {dtype_name!r}")
    return block_size, dtype_name


def resolve_device(args: argparse.Namespace) -> str:
    """``cuda`` or ``cpu`` from ``--device`` / ``--tiny``; without CUDA the tiny CPU run is chosen, with a note."""
    tiny = bool(getattr(args, "tiny", False))
    requested = getattr(args, "device", "auto")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ValueError(
            "--device cuda was given but torch sees no CUDA device; use --tiny to run on the CPU"
        )
    if requested == "auto":
        device = "cuda" if has_cuda and not tiny else "cpu"
    elif requested in ("cuda", "cpu"):
        device = requested
    else:
        raise ValueError(f"--device must be auto, cuda or cpu, got {requested!r}")
    if device == "cpu" and not tiny and not has_cuda:
        print(
            "NOTE: no CUDA device found: running the tiny CPU benchmark (--tiny). " + CPU_NOTE + ".",
            flush=True,
        )
    return device


def run_note(device: str, shapes: Sequence[Any], gpu_tiny_note: str) -> str | None:
    """The caveat recorded with a run: CPU timings and tiny GPU shapes are not performance figures."""
    if device == "cpu":
        return CPU_NOTE
    if any(s.tiny for s in shapes):
        return gpu_tiny_note
    return None


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Check the parsed options (also when ``args`` was built by hand) and pick the device and shapes."""
    names = [str(n) for n in _flatten(getattr(args, "shapes", None))]
    for name in names:
        if name not in SHAPES:
            raise ValueError(unknown_shape_message(name))
    densities = [float(d) for d in _flatten(getattr(args, "densities", None))] or list(DEFAULT_DENSITIES)
    for d in densities:
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise ValueError(density_out_of_range_message(d))
    block_size, dtype_name = resolve_block_size_and_dtype(args)
    tiny = bool(getattr(args, "tiny", False))
    device = resolve_device(args)

    if names:
        shapes = tuple(dict.fromkeys(SHAPES[n] for n in names))
    else:
        shapes = TINY_SHAPES if (tiny or device == "cpu") else GPU_SHAPES
    note = run_note(device, shapes, GPU_TINY_NOTE)
    out = getattr(args, "out", None)
    return Settings(
        shapes=shapes,
        densities=tuple(dict.fromkeys(densities)),
        structured=not getattr(args, "no_structured", False),
        block_size=block_size,
        dtype_name=dtype_name,
        reps=int(getattr(args, "reps", 20)),
        warmup=int(getattr(args, "warmup", 5)),
        out_dir=Path(out) if out else default_out_dir(),
        device=device,
        flex=not getattr(args, "no_flex", False) and device == "cuda",
        seed=int(getattr(args, "seed", 0)),
        note=note,
    )


# --------------------------------------------------------------------------------------------------- masks


def kv_blocks_per_row(density: float, num_kv_blocks: int) -> int:
    """round(density × nK) (halves round up), at least 1, at most nK."""
    return min(num_kv_blocks, max(1, math.floor(density * num_kv_blocks + 0.5)))


def random_block_mask(
    heads: int, nqb: int, nkb: int, density: float, *, seed: int, device: str | torch.device
) -> torch.Tensor:
    """bool ``[1, H, nQ, nK]`` with exactly :func:`kv_blocks_per_row` allowed kv blocks per (head, row), uniform."""
    keep = kv_blocks_per_row(density, nkb)
    if keep == nkb:
        return torch.ones((1, heads, nqb, nkb), dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand((heads, nqb, nkb), generator=gen, device=device)  # (H, nQ, nK)
    chosen = scores.topk(keep, dim=-1).indices  # (H, nQ, keep)
    mask = torch.zeros((heads, nqb, nkb), dtype=torch.bool, device=device)
    return mask.scatter_(-1, chosen, True).unsqueeze(0)


def structured_block_mask(
    heads: int, nqb: int, nkb: int, *, seed: int, device: str | torch.device
) -> tuple[torch.Tensor, str]:
    """Diagonal band + first-column sink + per-head vertical stripes, ≈0.15 block density on large grids.

    Returns the bool ``[1, H, nQ, nK]`` mask and a name that encodes its parameters.
    """
    stripes = min(4, max(1, nkb // 16), max(0, nkb - 1))
    band = max(0, round((STRUCTURED_TARGET_DENSITY * nkb - 1 - stripes) / 2))
    rows = torch.arange(nqb, device=device)[:, None]  # (nQ, 1)
    cols = torch.arange(nkb, device=device)[None, :]  # (1, nK)
    base = ((rows * nkb) // nqb - cols).abs() <= band  # (nQ, nK) diagonal band
    base |= cols == 0  # sink
    mask = base.expand(heads, nqb, nkb).clone()  # (H, nQ, nK)
    if stripes:
        gen = torch.Generator().manual_seed(seed)
        picks = torch.stack([torch.randperm(nkb - 1, generator=gen)[:stripes] + 1 for _ in range(heads)])
        picks = picks.to(device)[:, None, :].expand(heads, nqb, stripes)  # (H, nQ, stripes)
        mask.scatter_(-1, picks, True)
    return mask.unsqueeze(0), f"structured(band=±{band}, sink=1, stripes={stripes}/head)"


# --------------------------------------------------------------------------------------------------- timing


def _time_cpu(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _time_cuda(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    # do_bench takes milliseconds: give it enough for at least `reps` timed and `warmup` untimed runs
    return float(
        do_bench(
            fn,
            warmup=max(25.0, warmup * estimate * 1.25),
            rep=max(100.0, reps * estimate * 1.25),
            return_mode="median",
        )
    )


def _timer(device: str) -> Callable[[Callable[[], Any], int, int], float]:
    return _time_cuda if device == "cuda" else _time_cpu


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if not num or not den else num / den


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------------------------------- pieces


def _index_granularity(
    block_size: int, head_dim: int, dtype: torch.dtype, seq_len: int
) -> tuple[int, int, str]:
    """(q, kv) tokens per index block used by the Triton launcher, and where that came from."""
    try:
        from dit_sparse.kernels import triton_attention
    except Exception as exc:  # not written yet, or triton missing
        return (
            block_size,
            block_size,
            f"mask block size (kernels.triton_attention unavailable: {_reason(exc)})",
        )
    for name in _GRANULARITY_FUNCS:
        func = getattr(triton_attention, name, None)
        if not callable(func):
            continue
        known = {
            "block_size": block_size,
            "head_dim": head_dim,
            "dtype": dtype,
            "seq_len": seq_len,
            "seq_len_q": seq_len,
            "seq_len_kv": seq_len,
        }
        try:
            params = inspect.signature(func).parameters
            kwargs = {k: v for k, v in known.items() if k in params}
            missing = [
                p.name
                for p in params.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in kwargs
            ]
            if missing:
                continue
            got = func(**kwargs)
            gq, gk = (got, got) if isinstance(got, int) else (int(got[0]), int(got[1]))
        except Exception:
            continue
        if gq % block_size == 0 and gk % block_size == 0:
            return gq, gk, f"kernels.triton_attention.{name}"
    return block_size, block_size, "mask block size (no granularity function in kernels.triton_attention)"


def _flex_block_mask(
    mask: torch.Tensor, block_size: int, seq_len: int, *, with_mask_mod: bool = False
) -> Any:
    """Our bool block mask ``[1, H, nQ, nK]`` as a FlexAttention ``BlockMask``.

    Every allowed block is listed as *full*, so the compiled kernel never evaluates a mask_mod (Flex's fastest case
    for a block-level mask) and the default no-op mask_mod is right. Eager flex_attention ignores the block lists
    and applies only the mask_mod: ``with_mask_mod=True`` adds one that says the same thing element-wise, for
    checks on the CPU. The benchmark leaves it off because a closure over each mask would recompile Flex per mask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    from dit_sparse.kernels.indices import block_mask_to_indices

    num, idx = block_mask_to_indices(mask)  # (1, H, nQ), (1, H, nQ, nK)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return mask[0, h, q_idx // block_size, kv_idx // block_size]

    return BlockMask.from_kv_blocks(
        torch.zeros_like(num),
        idx,
        num,
        idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod if with_mask_mod else None,
        seq_lengths=(seq_len, seq_len),
    )


_FLEX_COMPILED: Callable[..., torch.Tensor] | None = None


def _compiled_flex() -> Callable[..., torch.Tensor]:
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit"):  # one recompile per shape
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 64))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def _dense_backends(device: str) -> list[tuple[str, Any, str | None]]:
    """(name, SDPBackend, skip reason) in baseline-preference order."""
    from torch.nn.attention import SDPBackend

    if device == "cuda":
        return [("cudnn", SDPBackend.CUDNN_ATTENTION, None), ("fa2", SDPBackend.FLASH_ATTENTION, None)]
    return [
        ("cudnn", None, "needs CUDA (CPU run)"),
        ("fa2", None, "needs CUDA (CPU run)"),
        ("cpu-flash", SDPBackend.FLASH_ATTENTION, None),
        ("cpu-math", SDPBackend.MATH, None),
    ]


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------------------------------- run


def _bench_shape(shape: AttentionShape, st: Settings, log: Callable[[str], None]) -> tuple[dict, list[dict]]:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from dit_sparse.kernels import prepare_block_mask, sparse_attention
    from dit_sparse.kernels.indices import build_block_index, cdiv, token_density
    from dit_sparse.kernels.reference import reference_attention

    timer = _timer(st.device)
    n, h, d, bs = shape.seq_len, shape.heads, shape.head_dim, st.block_size
    nb = cdiv(n, bs)
    gen = torch.Generator(device=st.device).manual_seed(st.seed)
    q, k, v = (torch.randn((1, h, n, d), generator=gen, device=st.device, dtype=st.dtype) for _ in range(3))
    dense_flops = 4.0 * h * n * n * d

    # dense baselines, once per shape
    dense: list[dict] = []
    baseline: dict | None = None
    baseline_out: torch.Tensor | None = None
    for name, backend, skip in _dense_backends(st.device):
        entry: dict[str, Any] = {"backend": name}
        if skip is not None:
            entry["skipped"] = skip
        else:
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
                    ms = timer(functools.partial(F.scaled_dot_product_attention, q, k, v), st.reps, st.warmup)
                entry.update(ms=ms, tflops=_tflops(dense_flops, ms))
                if baseline is None:
                    baseline, baseline_out = entry, out
                else:
                    del out
            except Exception as exc:  # backend unsupported for this dtype/shape/GPU
                entry["skipped"] = _reason(exc)
        dense.append(entry)
        if "ms" in entry:
            log(f"  {shape.name} dense {name}: {entry['ms']:.4g} ms ({entry['tflops']:.3g} TF/s)")
        else:
            log(f"  {shape.name} dense {name}: skipped ({entry['skipped']})")
    shape_info = {
        "name": shape.name,
        "label": shape.label,
        "seq_len": n,
        "heads": h,
        "head_dim": d,
        "tiny": shape.tiny,
        "dense": dense,
        "dense_baseline": baseline["backend"] if baseline else None,
    }

    if st.device == "cuda":
        gq, gk, gsource = _index_granularity(bs, d, st.dtype, n)
    else:  # no Triton import on the CPU: the gather path builds no index
        gq, gk, gsource = bs, bs, "mask block size (CPU run)"
    masks: list[tuple[str, float | None, torch.Tensor, str]] = []
    for i, density in enumerate(st.densities):
        keep = kv_blocks_per_row(density, nb)
        mask = random_block_mask(h, nb, nb, density, seed=st.seed + 1000 * i + 1, device=st.device)
        masks.append(
            ("random", density, mask, f"random({keep}/{nb} kv blocks per row, seed={st.seed + 1000 * i + 1})")
        )
    if st.structured:
        mask, desc = structured_block_mask(h, nb, nb, seed=st.seed + 7, device=st.device)
        masks.append(("structured", None, mask, desc))

    flex_skip: str | None = (
        None if st.flex else ("--no-flex" if st.device == "cuda" else "needs CUDA (CPU run)")
    )
    rows: list[dict] = []
    for kind, requested, mask, desc in masks:
        counts = mask.sum(-1).double()  # (1, H, nQ) kv blocks per row
        pairs = int(counts.sum())
        sparse_flops = 4.0 * d * pairs * bs * bs
        row: dict[str, Any] = {
            "shape": shape.name,
            "seq_len": n,
            "heads": h,
            "head_dim": d,
            "mask": kind,
            "mask_desc": desc,
            "requested_density": requested,
            "block_density": pairs / (h * nb * nb),
            "density": float(token_density(mask, bs, n, n)),
            "kv_blocks_per_row_mean": float(counts.mean()),
            "kv_blocks_per_row_std": float(counts.std()) if counts.numel() > 1 else 0.0,
            "computed_block_pairs": pairs,
            "impl": "triton" if st.device == "cuda" else "gather",
            "ms": None,
            "tflops": None,
            "error": None,
        }
        # ours: the public call, as a user makes it
        ours_out: torch.Tensor | None = None
        try:
            ours_out = sparse_attention(q, k, v, mask, bs)
            ms = timer(functools.partial(sparse_attention, q, k, v, mask, bs), st.reps, st.warmup)
            row.update(ms=ms, tflops=_tflops(sparse_flops, ms))
        except Exception as exc:
            row["error"] = _reason(exc)
        # index build alone, at the launcher's granularity
        row.update(
            granularity=[gq, gk], granularity_source=gsource, index_ms=None, index_pct=None, kernel_ms=None
        )
        if st.device == "cpu":
            row["index_note"] = "the CPU gather path does not use this index; timed for reference"
        try:
            index_ms = timer(functools.partial(build_block_index, mask, bs, n, n, gq, gk), st.reps, st.warmup)
            row.update(index_ms=index_ms, index_pct=_ratio(100.0 * index_ms, row["ms"]))
        except Exception as exc:
            row["index_error"] = _reason(exc)
        # the kernel alone: the index prepared once, as the processor does per layer plan
        if row["ms"] is not None:
            try:
                prepared = prepare_block_mask(mask, bs, n)
                call = functools.partial(sparse_attention, q, k, v, prepared)
                row["kernel_ms"] = timer(call, st.reps, st.warmup)
                del prepared, call
            except Exception as exc:
                row["kernel_error"] = _reason(exc)
        # FlexAttention with the same blocks
        row.update(flex_ms=None, flex_tflops=None, flex_skipped=flex_skip)
        if flex_skip is None:
            try:
                flex = _compiled_flex()
                block_mask = _flex_block_mask(mask, bs, n)
                flex_out = flex(q, k, v, block_mask=block_mask)
                flex_ms = timer(functools.partial(flex, q, k, v, block_mask=block_mask), st.reps, st.warmup)
                row.update(flex_ms=flex_ms, flex_tflops=_tflops(sparse_flops, flex_ms))
                if ours_out is not None:
                    row["max_abs_diff_vs_flex"] = _max_abs_diff(ours_out, flex_out)
                del flex_out, block_mask
            except Exception as exc:
                row["flex_skipped"] = f"compiled flex_attention failed: {_reason(exc)}"
                flex_skip = row["flex_skipped"]  # do not retry (and recompile) for every mask of this shape
        if ours_out is not None and baseline_out is not None and pairs == h * nb * nb:
            row["max_abs_diff_vs_dense"] = _max_abs_diff(ours_out, baseline_out)
        if ours_out is not None and st.device == "cpu" and n <= 2048:
            ref = reference_attention(q, k, v, mask, bs)
            row["max_abs_diff_vs_reference"] = _max_abs_diff(ours_out, ref)
        row.update(
            dense_baseline=shape_info["dense_baseline"],
            dense_ms=baseline["ms"] if baseline else None,
            speedup_vs_dense=_ratio(baseline["ms"] if baseline else None, row["ms"]),
            speedup_vs_flex=_ratio(row["flex_ms"], row["ms"]),
        )
        rows.append(row)
        log(_progress_line(row))
        del ours_out
    return shape_info, rows


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def _progress_line(row: dict) -> str:
    dens = (
        f"d={row['requested_density']:g}"
        if row["requested_density"] is not None
        else f"d≈{row['density']:.2f}"
    )
    if row["error"]:
        ours = f"ours FAILED ({row['error']})"
    else:
        ours = f"ours {_fmt(row['ms'], '.4g')} ms ({_fmt(row['tflops'])} TF/s, {_fmt_x(row['speedup_vs_dense'])} dense)"
    flex = f"flex {_fmt(row['flex_ms'], '.4g')} ms" if row["flex_ms"] is not None else "flex skipped"
    return f"  {row['shape']} {row['mask']} {dens}: {ours}, {flex}, index {_fmt(row['index_ms'], '.3g')} ms"


SPARSE_COLUMNS = (
    "shape",
    "mask",
    "density",
    "ours ms",
    "kernel ms",
    "TF/s",
    "Flex ms",
    "Flex TF/s",
    "dense ms",
    "× dense",
    "× Flex",
    "index ms",
    "index %",
)
DENSE_COLUMNS = ("shape", "N", "H×d", "backend", "ms", "TF/s", "note")


def table_rows(result: dict) -> tuple[list[list[str]], list[list[str]]]:
    sparse = []
    for r in result["rows"]:
        dens = f"{r['density']:.3f}"
        if r["requested_density"] is not None and abs(r["requested_density"] - r["density"]) > 5e-4:
            dens += f" ({r['requested_density']:g})"
        sparse.append(
            [
                r["shape"],
                r["mask"],
                dens,
                "FAILED" if r["error"] else _fmt(r["ms"], ".4g"),
                _fmt(r["kernel_ms"], ".4g"),
                _fmt(r["tflops"]),
                _fmt(r["flex_ms"], ".4g"),
                _fmt(r["flex_tflops"]),
                _fmt(r["dense_ms"], ".4g"),
                _fmt_x(r["speedup_vs_dense"]),
                _fmt_x(r["speedup_vs_flex"]),
                _fmt(r["index_ms"], ".3g"),
                _fmt(r["index_pct"], ".2g"),
            ]
        )
    dense = []
    for s in result["shapes"]:
        for e in s["dense"]:
            note = e.get("skipped", "baseline" if e["backend"] == s["dense_baseline"] else "")
            dense.append(
                [
                    s["name"],
                    str(s["seq_len"]),
                    f"{s['heads']}×{s['head_dim']}",
                    e["backend"],
                    _fmt(e.get("ms"), ".4g"),
                    _fmt(e.get("tflops")),
                    note,
                ]
            )
    return sparse, dense


def format_plain(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _explain(result: dict) -> list[str]:
    baselines = sorted({s["dense_baseline"] for s in result["shapes"] if s["dense_baseline"]})
    if result["device"] == "cuda":
        ours = (
            "ours ms: dit_sparse.sparse_attention(q, k, v, mask, block_size) as a user calls it (Triton, index "
            "build included); index ms: build_block_index alone at the launcher's granularity; kernel ms: the same "
            "call with the index prepared once (prepare_block_mask, as the processor does per layer plan)."
        )
    else:
        ours = (
            "ours ms: dit_sparse.sparse_attention(q, k, v, mask, block_size) on the CPU gather path; index ms: "
            "build_block_index alone (the gather path does not use it; timed for reference); kernel ms: the call "
            "with a prepared index (the gather path reads its mask)."
        )
    return [
        ours,
        "TF/s: computed blocks only, 4·D·Σ allowed block pairs·bs²/t (same token set for ours and Flex); "
        "dense: 4·B·H·N²·D/t.",
        f"× dense: dense ms / ours ms, dense = {', '.join(baselines) or 'none'} SDPA; "
        "× Flex: Flex ms / ours ms; index %: index ms / ours ms.",
    ]


def markdown_head(title: str, result: dict, settings_tail: str = "") -> list[str]:
    """The lines every benchmark's Markdown starts with: title, note, command, device and settings, versions."""
    v, st = result["versions"], result["settings"]
    lines = [f"# dit-sparse {title}: {result['device_name']}", ""]
    if result["note"]:
        lines += [f"**{result['note']}**", ""]
    diffusers = f", diffusers {v['diffusers']}" if v.get("diffusers") else ""
    return [
        *lines,
        f"- command: `{result['command']}`",
        f"- started: {result['started_at']}, device: {result['device']}, dtype: {st['dtype']}, "
        f"block size: {st['block_size']}, timer: {st['timer']}{settings_tail}",
        f"- torch {v['torch']}{diffusers}, triton {v['triton']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, "
        f"dit-sparse {v['dit_sparse']} ({v['git_commit'] or 'no git'})",
        "",
    ]


def render_markdown(result: dict) -> str:
    sparse, dense = table_rows(result)
    lines = [
        *markdown_head("kernel benchmark", result),
        "## Sparse",
        "",
        format_markdown(SPARSE_COLUMNS, sparse),
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
    sparse, dense = table_rows(result)
    lines = [f"dit-sparse kernel benchmark on {result['device_name']} ({result['device']})"]
    if result["note"]:
        lines.append(f"NOTE: {result['note']}")
    lines += [
        "",
        format_plain(SPARSE_COLUMNS, sparse),
        "",
        *_explain(result),
        "",
        format_plain(DENSE_COLUMNS, dense),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- output


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, Any]:
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:
        triton_version = None
    from dit_sparse import __version__

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "dit_sparse": __version__,
        "git_commit": _git("rev-parse", "HEAD") or None,
        # tracked files changed since that commit (None: not a git checkout)
        "git_dirty": None
        if (status := _git("status", "--porcelain", "--untracked-files=no")) is None
        else bool(status),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def write_results(
    result: dict,
    out_dir: Path,
    *,
    prefix: str = "kernel",
    render: Callable[[dict], str] | None = None,
) -> tuple[Path, Path]:
    """Write ``<prefix>-<device>-<date>.json`` and its ``.md`` (``render(result)``, default this benchmark's
    tables); never overwrite: add ``-2``, ``-3``, ... instead.

    The JSON name is reserved with an exclusive create, then both files are written to a temp file and moved into
    place with ``os.replace`` (atomic).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if result["device"] == "cpu" else device_slug(result["gpu"] or "cuda")
    stem = f"{prefix}-{slug}-{result['started_at'][:10]}"
    for i in range(1, 10_000):
        name = stem if i == 1 else f"{stem}-{i}"
        json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
        if md_path.exists():
            continue
        try:
            with open(json_path, "x"):
                pass
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover
        raise RuntimeError(f"no free result name for {stem} in {out_dir}")
    for path, text in (
        (json_path, json.dumps(result, indent=1) + "\n"),
        (md_path, (render or render_markdown)(result)),
    ):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=out_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return json_path, md_path


def result_header(
    benchmark: str,
    settings: Any,
    started: dt.datetime,
    schema_version: int = SCHEMA_VERSION,
    extra_versions: dict[str, str] | None = None,
    lists: tuple[str, ...] = ("shapes",),
) -> dict[str, Any]:
    """The provenance every benchmark JSON starts with: device, versions, command, start time, settings; then the
    empty ``lists`` (what was measured) and ``rows``; ``finished_at`` / ``wall_s`` are filled in at the end."""
    gpu = torch.cuda.get_device_name() if settings.device == "cuda" else None
    return {
        "schema_version": schema_version,
        "benchmark": benchmark,
        "device": settings.device,
        "gpu": gpu,
        "device_name": gpu or _cpu_name(),
        "note": settings.note,
        "versions": {**versions(), **(extra_versions or {})},
        "command": shlex.join(sys.argv),
        "argv": list(sys.argv),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": None,
        "wall_s": None,
        "settings": settings.to_json(),
        **{name: [] for name in lists},
        "rows": [],
    }


def run_benchmark(
    benchmark: str,
    settings: Any,
    bench_shape: Callable[[Any, Any, Callable[[str], None]], tuple[dict, list[dict]]],
    describe_shape: Callable[[Any], str],
    render_plain_fn: Callable[[dict], str],
    render_markdown_fn: Callable[[dict], str],
    prefix: str,
    log: Callable[[str], None] = print,
    schema_version: int = SCHEMA_VERSION,
) -> tuple[dict, Path]:
    """The driver both ``bench kernel`` and ``bench patterns`` use: provenance header, one shape at a time, the
    tables, and the never-overwriting JSON + Markdown write."""
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    result = result_header(benchmark, settings, started, schema_version)
    head = f"{benchmark} on {result['device_name']} ({settings.device}, {settings.dtype_name})"
    log(head + (f": {settings.note}" if settings.note else ""))
    for shape in settings.shapes:
        log(describe_shape(shape))
        shape_info, rows = bench_shape(shape, settings, log)
        if settings.device == "cuda":
            torch.cuda.empty_cache()  # the shape's tensors died with bench_shape's frame
        result["shapes"].append(shape_info)
        result["rows"].extend(rows)
    result["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    json_path, md_path = write_results(result, settings.out_dir, prefix=prefix, render=render_markdown_fn)
    log("")
    log(render_plain_fn(result))
    log("")
    log(f"wrote {json_path}")
    log(f"wrote {md_path}")
    return result, json_path


def run(settings: Settings, log: Callable[[str], None] = print) -> tuple[dict, Path]:
    return run_benchmark(
        "dit-sparse bench kernel",
        settings,
        _bench_shape,
        lambda shape: f"{shape.label}: N={shape.seq_len}, {shape.heads}×{shape.head_dim}",
        render_plain,
        render_markdown,
        "kernel",
        log,
    )


def cli_entry(
    args: argparse.Namespace,
    resolve: Callable[[argparse.Namespace], Any],
    run_fn: Callable[[Any, Callable[[str], None]], tuple[dict, Path]],
    what: str,
    failures: Callable[[dict], list[dict]] | None = None,
) -> int:
    """The ``dit-sparse bench ...`` entry points: settings from ``args`` (a ``ValueError`` is a bad option: exit 2
    with its message), the run with line-flushed logging, exit 1 when ``failures(result)`` (default: the rows with
    an ``error``) is not empty, else 0."""
    try:
        settings = resolve(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, flush=True)

    result, _ = run_fn(settings, log)
    failed = failures(result) if failures is not None else [r for r in result["rows"] if r["error"]]
    if failed:
        print(f"error: {len(failed)} {what} failed, see 'error' in the JSON", file=sys.stderr)
        return 1
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dit-sparse bench kernel``: 0 when every sparse measurement ran, 1 otherwise, 2 on bad
    options."""
    return cli_entry(args, resolve_settings, run, "sparse measurement(s)")
