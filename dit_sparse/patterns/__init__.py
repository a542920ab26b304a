"""Sparsity patterns: pure functions of a token layout (and parameters) -> bool block mask.

A pattern never imports diffusers. Each registered pattern has a name, default parameters with validation, and a
builder ``(layout, **params) -> bool [nB, nB]`` on a given device. :func:`build_layer_mask` stacks the heads of
one layer into ``[1, H, nB, nB]`` for the kernel and forces text rows and columns dense (joint attention).

Registered here: ``dense``, ``full`` (every block, computed by the sparse kernel: the kernel's own dense), and
``window`` (spatio-temporal window, STA/NATTEN-style, exact at block granularity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import MaskLayout

Builder = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class PatternSpec:
    """A registered pattern.

    ``builder(layout, device=, **params) -> bool [nB, nB]``. Optional:
    ``permutation(layout, device=, **params) -> int64 [seq_len]`` (reordering patterns: the builder's mask is then
    in permuted order; permuted position ``i`` holds original token ``perm[i]``) and
    ``dynamic(layout, q, k, perm, **params) -> bool [B, Hs, nB, nB]`` (masks computed from the layer's q/k
    ``(B, Hs, N, D)`` in original order, for the ``Hs`` heads that share these params, on the device, no host sync;
    for a dynamic pattern ``builder`` gives the part that is always kept, e.g. for pictures).
    """

    name: str
    builder: Builder
    defaults: dict[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None
    doc: str = ""
    permutation: Callable[..., torch.Tensor | None] | None = None
    dynamic: Builder | None = None


PATTERNS: dict[str, PatternSpec] = {}


def register(spec: PatternSpec) -> PatternSpec:
    PATTERNS[spec.name] = spec
    return spec


def validate_pattern(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Return the full parameter dict (defaults filled in); ``ValueError`` naming the problem otherwise."""
    if name == "dense":
        if params:
            raise ValueError(f"pattern 'dense' takes no parameters, got {sorted(params)}")
        return {}
    spec = PATTERNS.get(name)
    if spec is None:
        raise ValueError(f"unknown pattern {name!r}; known patterns: {sorted(['dense', *PATTERNS])}")
    unknown = set(params) - set(spec.defaults)
    if unknown:
        raise ValueError(
            f"pattern {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(spec.defaults)}"
        )
    full = {**spec.defaults, **params}
    if spec.check is not None:
        spec.check(full)
    return full


def pattern_name(name: str, params: dict[str, Any]) -> str:
    """A name that encodes the parameters, e.g. ``window(f=1,h=4,w=4)``: logs and reports say what ran."""
    full = validate_pattern(name, params)
    if not full:
        return name
    return f"{name}(" + ",".join(f"{k}={_format_param(v)}" for k, v in sorted(full.items())) + ")"


def _format_param(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_format_param(x) for x in v) + "]"
    return str(v)


def parse_pattern_name(text: str) -> tuple[str, dict[str, Any]]:
    """Inverse of :func:`pattern_name`: ``'window(f=1,h=4,w=4)'`` -> ``('window', {'f': 1, 'h': 4, 'w': 4})``."""
    text = text.strip()
    name, sep, rest = text.partition("(")
    if sep and not rest.endswith(")"):
        raise ValueError(f"pattern name {text!r} must look like name or name(key=value,...)")
    params: dict[str, Any] = {}
    for item in _split_top(rest[:-1]) if sep else []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"pattern name {text!r}: parameter {item!r} must be key=value")
        params[key.strip()] = _parse_value(value.strip())
    validate_pattern(name, params)
    return name, params


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur] if cur or parts else []


def _parse_value(v: str) -> Any:
    if v.startswith("[") and v.endswith("]"):
        return [_parse_value(x.strip()) for x in _split_top(v[1:-1])]
    if v in ("True", "False"):
        return v == "True"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def build_pattern(
    name: str, params: dict[str, Any], layout: MaskLayout, device: torch.device | str
) -> torch.Tensor:
    """One head's bool block mask ``[nB, nB]`` (text rows/columns not yet forced; see build_layer_mask)."""
    full = validate_pattern(name, params)
    if name == "dense":
        return torch.ones(layout.num_blocks, layout.num_blocks, dtype=torch.bool, device=device)
    return PATTERNS[name].builder(layout, device=torch.device(device), **full)


def build_pattern_perm(
    name: str, params: dict[str, Any], layout: MaskLayout, device: torch.device | str
) -> torch.Tensor | None:
    """One head's token permutation ``int64 [seq_len]``, or None if the pattern keeps the raster order."""
    full = validate_pattern(name, params)
    spec = PATTERNS.get(name)
    if spec is None or spec.permutation is None:
        return None
    return spec.permutation(layout, device=torch.device(device), **full)


def build_layer_perm(
    heads: Sequence[tuple[str, dict[str, Any]]], layout: MaskLayout, device: torch.device | str
) -> torch.Tensor | None:
    """``int64 [1, H, seq_len]`` for the kernel (identity for heads without one), or None if no head reorders."""
    built: dict[str, torch.Tensor | None] = {}
    for name, params in heads:
        key = pattern_name(name, params)
        if key not in built:
            built[key] = build_pattern_perm(name, params, layout, device)
    if all(p is None for p in built.values()):
        return None
    ident = torch.arange(layout.seq_len, device=device)
    perms = [built[pattern_name(n, p)] for n, p in heads]
    return torch.stack([ident if p is None else p for p in perms]).unsqueeze(0)  # (1, H, N)


def is_dynamic(name: str) -> bool:
    spec = PATTERNS.get(name)
    return spec is not None and spec.dynamic is not None


def build_layer_mask(
    heads: Sequence[tuple[str, dict[str, Any]]], layout: MaskLayout, device: torch.device | str
) -> torch.Tensor:
    """Stack per-head masks into ``[1, H, nB, nB]``; identical heads are built once; text stays dense."""
    built: dict[str, torch.Tensor] = {}
    masks = []
    for name, params in heads:
        key = pattern_name(name, params)
        if key not in built:
            built[key] = build_pattern(name, params, layout, device)
        masks.append(built[key])
    mask = torch.stack(masks).unsqueeze(0)  # (1, H, nB, nB)
    return force_text_dense(mask, layout)


def force_text_dense(mask: torch.Tensor, layout: MaskLayout) -> torch.Tensor:
    """Blocks holding any text token keep their whole row and column (text rows/columns always dense)."""
    if layout.num_text == 0:
        return mask
    text_blocks = layout.text_block_flags(mask.device)  # (nB,)
    return mask | text_blocks[:, None] | text_blocks[None, :]


def block_density(mask: torch.Tensor) -> float:
    return float(mask.float().mean())


# ---------------------------------------------------------------------------------------------------- patterns
def _full(layout: MaskLayout, device: torch.device) -> torch.Tensor:
    return torch.ones(layout.num_blocks, layout.num_blocks, dtype=torch.bool, device=device)


register(PatternSpec("full", _full, {}, doc="every block, through the sparse kernel"))


def _check_window(p: dict[str, Any]) -> None:
    for axis in ("f", "h", "w"):
        v = p[axis]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"window parameter {axis} must be an integer >= 0 (latent units), got {v!r}")


def _window(layout: MaskLayout, device: torch.device, f: int, h: int, w: int) -> torch.Tensor:
    """Query block ``qb`` may attend key block ``kb`` iff some token pair in them is within the window
    ``|Δf| <= f, |Δh| <= h, |Δw| <= w`` (latent units). Exact: dilate each query block's token set on the grid."""
    grid_f, grid_h, grid_w = layout.grid
    nb = layout.num_blocks
    blk = layout.video_token_blocks(device)  # (F*H*W,) block id of each video token
    first = int(layout.video_block_range()[0])
    last = int(layout.video_block_range()[1])
    q_ids = torch.arange(first, last, device=device)
    # one volume per video query block: 1 where its tokens sit, dilated by the window (max-pool)
    vol = (blk.view(1, -1) == q_ids.view(-1, 1)).to(torch.float32).view(-1, 1, grid_f, grid_h, grid_w)
    dil = torch.nn.functional.max_pool3d(
        vol, kernel_size=(2 * f + 1, 2 * h + 1, 2 * w + 1), stride=1, padding=(f, h, w)
    ).view(len(q_ids), -1)  # (nQv, F*H*W)
    hit = torch.zeros(len(q_ids), nb, dtype=torch.float32, device=device)
    hit.index_add_(1, blk, dil)
    out = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    out[first:last] = hit > 0
    return out


register(
    PatternSpec(
        "window",
        _window,
        {"f": 1, "h": 4, "w": 4},
        _check_window,
        doc="spatio-temporal window in latent units (STA/NATTEN), exact at block granularity",
    )
)

__all__ = [
    "PATTERNS",
    "MaskLayout",
    "PatternSpec",
    "block_density",
    "build_layer_mask",
    "build_layer_perm",
    "build_pattern",
    "build_pattern_perm",
    "force_text_dense",
    "is_dynamic",
    "parse_pattern_name",
    "pattern_name",
    "register",
    "validate_pattern",
]

from . import dynamic, reorder, static  # noqa: E402,F401
