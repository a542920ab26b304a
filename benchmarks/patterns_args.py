"""Options of ``dit-sparse bench patterns`` and the layouts it knows.

Kept apart from :mod:`dit_sparse.benchmarks.patterns` so ``dit-sparse --help`` imports no Triton and starts no CUDA;
``--patterns`` is checked against the pattern registry (which imports torch) only when it is given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from .kernel_args import add_common_bench_args, parse_names, unknown_name_message


@dataclass(frozen=True)
class LayoutShape:
    """One self-attention layer of a model at B=1: latent grid, text span, heads (DESIGN §7, §8)."""

    name: str  # what --shapes takes
    label: str  # what the table prints
    grid: tuple[int, int, int]  # (F', H', W') latent tokens after patching
    num_text: int  # text tokens inside self-attention (joint attention)
    text_first: bool
    heads: int
    head_dim: int
    tiny: bool = False  # a CPU smoke-test layout, not a real model

    @property
    def seq_len(self) -> int:
        f, h, w = self.grid
        return f * h * w + self.num_text


GPU_LAYOUTS: tuple[LayoutShape, ...] = (
    LayoutShape("wan2.1-1.3b-480p", "Wan2.1-1.3B 480p 81f", (21, 30, 52), 0, False, 12, 128),
    LayoutShape(
        "hunyuanvideo-720p", "HunyuanVideo 720p 129f (+256 text last)", (33, 45, 80), 256, False, 24, 128
    ),
)

# Grids that are not multiples of the block (partial last block); one with text last, like HunyuanVideo.
TINY_LAYOUTS: tuple[LayoutShape, ...] = (
    LayoutShape("tiny-wan", "tiny 5×8×12 2×64", (5, 8, 12), 0, False, 2, 64, tiny=True),
    LayoutShape("tiny-hunyuan", "tiny 5×8×12 +16 text last 2×64", (5, 8, 12), 16, False, 2, 64, tiny=True),
)

LAYOUTS: dict[str, LayoutShape] = {s.name: s for s in (*GPU_LAYOUTS, *TINY_LAYOUTS)}


def unknown_layout_message(name: str) -> str:
    return unknown_name_message(name, LAYOUTS)


def parse_layout_names(text: str) -> list[str]:
    return parse_names(text, LAYOUTS)


def parse_pattern(text: str) -> tuple[str, dict[str, Any]]:
    """``--patterns`` item: a registered name (its default parameters) or ``name(key=value,...)``."""
    from dit_sparse.patterns import parse_pattern_name

    try:
        return parse_pattern_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_patterns_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dit-sparse bench patterns`` to ``parser``."""
    gpu_names = ", ".join(s.name for s in GPU_LAYOUTS)
    tiny_names = ", ".join(s.name for s in TINY_LAYOUTS)
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_layout_names,
        default=None,
        metavar="NAME",
        help=f"layouts to run (space- or comma-separated). GPU: {gpu_names}. Tiny CPU: {tiny_names}. "
        "Default: all GPU layouts, or all tiny layouts with --tiny / without CUDA",
    )
    parser.add_argument(
        "--patterns",
        nargs="+",
        type=parse_pattern,
        default=None,
        metavar="PATTERN",
        help="patterns to time, each a registered name (its default parameters) or name(key=value,...), e.g. "
        "'window(f=2,h=8,w=8)'. Default: every registered pattern at its defaults",
    )
    parser.add_argument(
        "--target-pct",
        type=float,
        default=5.0,
        help="overhead target: each overhead (mask build, permutation, draft) as %% of dense attention time",
    )
    add_common_bench_args(
        parser,
        tiny_help="tiny layouts on the CPU paths: proves the benchmark runs, its timings are not kernel "
        "performance. The default when no CUDA device is present",
        seed_help="seed of the random q/k/v",
    )
