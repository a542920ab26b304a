"""Options of ``dit-sparse bench kernel`` and the shapes it knows.

Kept apart from :mod:`dit_sparse.benchmarks.kernel` so ``dit-sparse --help`` imports no Triton and starts no CUDA.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionShape:
    """One self-attention call of a model at B=1 (DESIGN §7)."""

    name: str  # what --shapes takes
    label: str  # what the table prints
    seq_len: int  # tokens N (text tokens included for joint-attention models)
    heads: int
    head_dim: int
    tiny: bool = False  # a CPU smoke-test shape, not a real model


GPU_SHAPES: tuple[AttentionShape, ...] = (
    AttentionShape("wan2.1-1.3b-480p", "Wan2.1-1.3B 480p 81f", 32_760, 12, 128),
    AttentionShape("wan2.1-14b-720p", "Wan2.1-14B 720p 81f", 75_600, 40, 128),
    AttentionShape("hunyuanvideo-720p", "HunyuanVideo 720p 129f", 119_056, 24, 128),
    AttentionShape("cogvideox-5b", "CogVideoX-5B 49f", 17_776, 48, 64),
    AttentionShape("flux-1024", "FLUX 1024²", 4_608, 24, 128),
)

# N deliberately not a multiple of the block size (partial last block), head_dim 64 and 128.
TINY_SHAPES: tuple[AttentionShape, ...] = (
    AttentionShape("tiny-d64", "tiny N=520 2×64", 520, 2, 64, tiny=True),
    AttentionShape("tiny-d128", "tiny N=1000 2×128", 1000, 2, 128, tiny=True),
)

SHAPES: dict[str, AttentionShape] = {s.name: s for s in (*GPU_SHAPES, *TINY_SHAPES)}
DEFAULT_DENSITIES: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05)
BLOCK_SIZES: tuple[int, ...] = (
    16,
    32,
    64,
    128,
)  # kernels.indices.SUPPORTED_BLOCK_SIZES, without importing torch


def unknown_name_message(name: str, known: Iterable[str]) -> str:
    return f"unknown shape {name!r}; known shapes: {', '.join(known)}"


def unknown_shape_message(name: str) -> str:
    return unknown_name_message(name, SHAPES)


def density_out_of_range_message(value: float) -> str:
    return f"density {value} is outside (0, 1]: give the fraction of kv blocks kept per query-block row, e.g. 0.25"


def parse_names(text: str, known: Mapping[str, Any]) -> list[str]:
    """A ``--shapes`` item: one name or a comma-separated list of names, each one of ``known``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty shape name")
    for name in names:
        if name not in known:
            raise argparse.ArgumentTypeError(unknown_name_message(name, known))
    return names


def parse_shape_names(text: str) -> list[str]:
    return parse_names(text, SHAPES)


def parse_densities(text: str) -> list[float]:
    """``--densities`` item: one number or a comma-separated list, each in (0, 1]."""
    values: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"density {part!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(density_out_of_range_message(value))
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("empty density list")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def add_common_bench_args(parser: argparse.ArgumentParser, *, tiny_help: str, seed_help: str) -> None:
    """Options every ``dit-sparse bench`` subcommand shares: block size, dtype, timing, output, device, seed."""
    parser.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=128,
        help="tokens per mask block (square blocks)",
    )
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="q/k/v dtype")
    parser.add_argument(
        "--reps",
        type=positive_int,
        default=20,
        help="at least this many timed runs per measurement (median)",
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=5, help="at least this many untimed runs before timing"
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the JSON and Markdown results (default: benchmarks/results of the source checkout)",
    )
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: CUDA when present (CPU with --tiny)",
    )
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def add_kernel_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dit-sparse bench kernel`` to ``parser``."""
    gpu_names = ", ".join(s.name for s in GPU_SHAPES)
    tiny_names = ", ".join(s.name for s in TINY_SHAPES)
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape_names,
        default=None,
        metavar="NAME",
        help=f"shapes to run (space- or comma-separated). GPU shapes: {gpu_names}. Tiny CPU shapes: {tiny_names}. "
        "Default: all GPU shapes, or all tiny shapes with --tiny / without CUDA",
    )
    parser.add_argument(
        "--densities",
        nargs="+",
        type=parse_densities,
        default=None,
        metavar="D",
        help="fractions of kv blocks kept per query-block row, each in (0, 1] "
        f"(default: {' '.join(str(d) for d in DEFAULT_DENSITIES)})",
    )
    parser.add_argument(
        "--no-structured",
        action="store_true",
        help="skip the structured mask (diagonal band + first-column sink + vertical stripes, ≈0.1-0.2 density)",
    )
    parser.add_argument(
        "--no-flex", action="store_true", help="skip FlexAttention (torch.compile of flex_attention)"
    )
    add_common_bench_args(
        parser,
        tiny_help="tiny shapes on the CPU paths (block-gather vs torch SDPA): proves the benchmark runs, its "
        "timings are not kernel performance. The default when no CUDA device is present",
        seed_help="seed of the random masks and of the inputs",
    )
