"""Static sparsity patterns: skip, 3-D tile window (STA), radial (Radial Attention), diagonal, multi-diagonal and
vertical stripe (Sparse-vDiT).

Every pattern is a small pure factory ``(layout, device, **params) -> bool [nB, nB]`` registered with defaults and
parameter validation. Each is *exact at block granularity*: a (query block, key block) pair is allowed iff some
(video query, video key) token pair inside it satisfies the pattern's token-level rule, stated in each docstring.
Nothing builds an N×N token matrix: rules on raster positions are evaluated on *segments* (the part of a block that
lies in one frame, a run of consecutive positions), the tile window on a tile-by-block incidence. Text tokens never
satisfy a rule here; :func:`dit_sparse.patterns.build_layer_mask` makes text rows and columns dense afterwards.

Token coordinates: video token ``v`` (``0 <= v < F'·H'·W'``, raster order, at sequence position
``layout.video_offset + v``) sits at frame ``f = v // (H'·W')`` and in-frame position ``s = v % (H'·W') = h·W' + w``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import PatternSpec, build_layer_mask, register
from .layout import MaskLayout

ORDERS = ("token", "frame")
_CHUNK_ELEMS = 1 << 22  # pair evaluations per chunk: bounds temporary memory on large grids


# ------------------------------------------------------------------------------------------------- validation
def _check_int(pattern: str, p: dict[str, Any], key: str, minimum: int) -> None:
    v = p[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{pattern} parameter {key} must be an integer >= {minimum}, got {v!r}")


def _check_int_list(pattern: str, p: dict[str, Any], key: str, minimum: int | None) -> None:
    v = p[key]
    ok = isinstance(v, (list, tuple)) and len(v) > 0
    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    ok = ok and (minimum is None or all(x >= minimum for x in v))
    if not ok:
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{pattern} parameter {key} must be a non-empty list of integers{bound}, got {v!r}")


def _check_order(pattern: str, p: dict[str, Any]) -> None:
    if p["order"] not in ORDERS:
        raise ValueError(f"{pattern} parameter order must be one of {list(ORDERS)}, got {p['order']!r}")


# ---------------------------------------------------------------------------------------------------- segments
@dataclass(frozen=True)
class _Segments:
    """Runs of consecutive video tokens that share one block and one frame (sorted by position)."""

    block: torch.Tensor  # (S,) block id
    frame: torch.Tensor  # (S,) frame (always 0 in token order)
    start: torch.Tensor  # (S,) first position: in-frame s (frame order) or video index v (token order)
    end: torch.Tensor  # (S,) one past the last position


def _segments(layout: MaskLayout, per_frame: bool, device: torch.device) -> _Segments:
    n = layout.num_video
    frame_len = layout.grid[1] * layout.grid[2] if per_frame else n
    off, bs = layout.video_offset, layout.block_size
    block_cuts = torch.arange(-(off % bs), n + bs, bs, device=device)  # video indices where a block starts
    frame_cuts = torch.arange(0, n + 1, frame_len, device=device)
    bounds = torch.cat([block_cuts, frame_cuts, torch.tensor([0, n], device=device)])
    bounds = torch.unique(bounds[(bounds >= 0) & (bounds <= n)])  # sorted, (S + 1,)
    lo, hi = bounds[:-1], bounds[1:]
    frame = torch.div(lo, frame_len, rounding_mode="floor")
    return _Segments(
        block=torch.div(lo + off, bs, rounding_mode="floor"),
        frame=frame,
        start=lo - frame * frame_len,
        end=hi - frame * frame_len,
    )


PairRule = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (query seg ids, key seg ids) -> bool (Sq, Sk)


def _reduce_pairs(layout: MaskLayout, segs: _Segments, rule: PairRule, device: torch.device) -> torch.Tensor:
    """Block mask: block pair allowed iff ``rule`` allows some (query segment, key segment) pair inside it."""
    nb = layout.num_blocks
    num = segs.block.numel()
    flat = torch.zeros(nb * nb, dtype=torch.bool, device=device)
    k_ids = torch.arange(num, device=device)
    step = max(1, _CHUNK_ELEMS // num)
    for first in range(0, num, step):
        q_ids = torch.arange(first, min(num, first + step), device=device)
        ok = rule(q_ids, k_ids)  # (Sq, S)
        pair = segs.block[q_ids, None] * nb + segs.block[None, :]  # (Sq, S) flat block-pair id
        flat[pair[ok]] = True
    return flat.view(nb, nb)


def _diff_rule(segs: _Segments, lo: torch.Tensor, hi: torch.Tensor) -> PairRule:
    """Allowed iff some tokens ``s`` (query segment), ``t`` (key segment) have ``lo <= t - s <= hi``, where
    ``lo``/``hi`` are ``(F, F)`` tables indexed by (query frame, key frame); ``lo > hi`` means no pair."""

    def rule(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        d_lo = segs.start[None, k] - (segs.end[q, None] - 1)  # (Sq, Sk) smallest t - s
        d_hi = (segs.end[None, k] - 1) - segs.start[q, None]  # (Sq, Sk) largest t - s
        fq, fk = segs.frame[q, None], segs.frame[None, k]
        return torch.maximum(d_lo, lo[fq, fk]) <= torch.minimum(d_hi, hi[fq, fk])

    return rule


def _frame_distance(num_frames: int, device: torch.device | str) -> torch.Tensor:
    f = torch.arange(num_frames, device=device)
    return (f[:, None] - f[None, :]).abs()  # (F, F)


# -------------------------------------------------------------------------------------------------------- skip
def _check_skip(p: dict[str, Any]) -> None:
    if p["mode"] not in ("zero", "reuse"):
        raise ValueError(f"skip parameter mode must be 'zero' or 'reuse', got {p['mode']!r}")


def _skip(layout: MaskLayout, device: torch.device, mode: str) -> torch.Tensor:
    """No video block pair: the head contributes nothing (``zero``) or, in the processor, reuses its previous-step
    output (``reuse``). Text rows and columns are still forced dense by build_layer_mask."""
    return torch.zeros(layout.num_blocks, layout.num_blocks, dtype=torch.bool, device=device)


register(
    PatternSpec(
        "skip",
        _skip,
        {"mode": "zero"},
        _check_skip,
        doc="skip the head: output zero or reuse the previous step's output (Sparse-vDiT)",
    )
)


# ------------------------------------------------------------------------------------------------- tile window
def _check_tile_window(p: dict[str, Any]) -> None:
    for key in ("tf", "th", "tw"):
        _check_int("tile_window", p, key, 1)
    for key in ("wf", "wh", "ww"):
        _check_int("tile_window", p, key, 0)


def _dilate(x: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """``out[i] = any(x[j] for |i - j| <= radius)`` along ``dim`` of an int tensor, via a prefix sum (O(len))."""
    length = x.shape[dim]
    radius = min(radius, length - 1)
    if radius == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    csum = torch.cat(
        [torch.zeros(pad_shape, dtype=x.dtype, device=x.device), x.cumsum(dim)], dim=dim
    )  # len+1
    idx = torch.arange(length, device=x.device)
    hi = (idx + radius + 1).clamp(max=length)
    lo = (idx - radius).clamp(min=0)
    return ((csum.index_select(dim, hi) - csum.index_select(dim, lo)) > 0).to(x.dtype)


def _tile_window(
    layout: MaskLayout, device: torch.device, tf: int, th: int, tw: int, wf: int, wh: int, ww: int
) -> torch.Tensor:
    """3-D tile window (STA-style): video tokens are grouped into tiles of ``tf × th × tw`` latent units (tiles at
    the far grid edges are partial); token ``i`` may attend ``j`` iff their tiles are within ``wf``, ``wh``, ``ww``
    tiles of each other on each axis: ``|f_i // tf - f_j // tf| <= wf`` and likewise for (h, th, wh), (w, tw, ww).
    Tokens stay in raster order: a block holds parts of several tiles."""
    grid_f, grid_h, grid_w = layout.grid
    nt = (-(-grid_f // tf), -(-grid_h // th), -(-grid_w // tw))  # tiles per axis (Ft, Ht, Wt)
    num_tiles = nt[0] * nt[1] * nt[2]
    first, last = layout.video_block_range()
    nbv = last - first
    v = torch.arange(layout.num_video, device=device)
    f, h, w = v // (grid_h * grid_w), (v // grid_w) % grid_h, v % grid_w
    tile = ((f // tf) * nt[1] + h // th) * nt[2] + w // tw  # (N,) tile id of each video token
    blk = layout.video_token_blocks(device) - first  # (N,) video block id, 0..nbv-1
    pairs = torch.unique(tile * nbv + blk)  # distinct (tile, block) incidences, <= N
    p_tile, p_blk = pairs // nbv, pairs % nbv
    hit = torch.zeros(nbv, nbv, dtype=torch.float32, device=device)
    step = max(1, _CHUNK_ELEMS // num_tiles)
    for c0 in range(0, nbv, step):
        c1 = min(nbv, c0 + step)
        inc = torch.zeros(num_tiles, c1 - c0, dtype=torch.int32, device=device)  # tile touches key block?
        sel = (p_blk >= c0) & (p_blk < c1)
        inc[p_tile[sel], p_blk[sel] - c0] = 1
        dil = inc.view(*nt, c1 - c0)  # (Ft, Ht, Wt, c)
        for dim, radius in enumerate((wf, wh, ww)):
            dil = _dilate(dil, dim, radius)
        # query block qb hits key block kb iff one of qb's tiles is in kb's dilated tile set
        hit[:, c0:c1].index_add_(0, p_blk, dil.reshape(num_tiles, -1).to(torch.float32)[p_tile])
    out = torch.zeros(layout.num_blocks, layout.num_blocks, dtype=torch.bool, device=device)
    out[first:last, first:last] = hit > 0
    return out


register(
    PatternSpec(
        "tile_window",
        _tile_window,
        {"tf": 2, "th": 8, "tw": 8, "wf": 1, "wh": 1, "ww": 1},
        _check_tile_window,
        doc="3-D tile window (STA/NATTEN): tiles of (tf, th, tw) latent units, window radius (wf, wh, ww) tiles",
    )
)


# ------------------------------------------------------------------------------------------------------ radial
def _check_radial(p: dict[str, Any]) -> None:
    _check_int("radial", p, "dense_frames", 0)
    _check_int("radial", p, "band", 1)
    _check_int("radial", p, "sink", 0)


def radial_frame_table(
    num_frames: int,
    block_size: int,
    dense_frames: int,
    band: int,
    sink: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (query frame, key frame): the allowed in-frame offsets ``lo <= s_k - s_q <= hi`` (``lo > hi``: none).

    With ``d = |f_q - f_k|`` and ``d0 = dense_frames + 1``:
      * key frame ``f_k < sink`` or ``d <= dense_frames``: every pair (full frame);
      * otherwise level ``k = floor(log2(d / d0))`` and band width ``band >> k`` latent tokens: the width halves each
        time the distance doubles. ``K`` = the last level whose width is still >= one block (0 if ``band`` is
        below a block from the start). For ``k <= K`` every frame pair is kept with ``|s_k - s_q| <= (band >> k) // 2``;
        for ``k > K`` the width stays ``band >> K`` and only frame pairs with ``d % 2^(k - K) == 0`` are kept.
    """
    d = _frame_distance(num_frames, device)  # (F, F)
    d0 = dense_frames + 1
    ratio = torch.div(d, d0, rounding_mode="floor")  # level k: 2^k <= ratio < 2^(k+1)
    level = torch.zeros_like(d)
    m = 1
    while (1 << m) < max(2, num_frames):
        level += (ratio >= (1 << m)).to(level.dtype)
        m += 1
    frozen = 0
    while (band >> (frozen + 1)) >= block_size:
        frozen += 1
    width = torch.div(
        band, torch.pow(2, level.clamp(max=frozen)), rounding_mode="floor"
    )  # (F, F) latent tokens
    drop_exp = (level - frozen).clamp(min=0)  # keep every 2^drop_exp-th frame pair
    kept = torch.remainder(d, torch.pow(2, drop_exp)) == 0
    big = 1 << 62  # "every offset"
    radius = width // 2
    lo, hi = -radius, radius.clone()
    full = (d <= dense_frames) | (torch.arange(num_frames, device=device)[None, :] < sink)
    lo = torch.where(full, torch.full_like(lo, -big), lo)
    hi = torch.where(full, torch.full_like(hi, big), hi)
    none = ~full & ~kept
    lo = torch.where(none, torch.ones_like(lo), lo)
    hi = torch.where(none, torch.zeros_like(hi), hi)
    return lo, hi


def _radial(
    layout: MaskLayout, device: torch.device, dense_frames: int, band: int, sink: int
) -> torch.Tensor:
    """Radial attention (O(n log n) blocks); the token rule is :func:`radial_frame_table`'s, on in-frame positions
    ``s = h·W' + w`` (the band is a diagonal band of each frame-pair block, as in Radial Attention)."""
    lo, hi = radial_frame_table(layout.grid[0], layout.block_size, dense_frames, band, sink, device)
    segs = _segments(layout, per_frame=True, device=device)
    return _reduce_pairs(layout, segs, _diff_rule(segs, lo, hi), device)


register(
    PatternSpec(
        "radial",
        _radial,
        {"dense_frames": 1, "band": 512, "sink": 1},
        _check_radial,
        doc="Radial Attention: dense near frames, spatial band halving per distance doubling, frame sink",
    )
)


# ------------------------------------------------------------------------------- diagonals and stripes
def _order_geometry(layout: MaskLayout, order: str, device: torch.device) -> tuple[_Segments, int]:
    """Segments and the number of 'frames' the rule is applied between (token order: one frame of all tokens)."""
    segs = _segments(layout, per_frame=order == "frame", device=device)
    return segs, layout.grid[0] if order == "frame" else 1


def _multi_diagonal_mask(
    layout: MaskLayout, device: torch.device, offsets: list[int], width: int, order: str
) -> torch.Tensor:
    segs, nf = _order_geometry(layout, order, device)
    radius = width // 2
    ones = torch.ones(nf, nf, dtype=torch.int64, device=device)
    rules = [_diff_rule(segs, (o - radius) * ones, (o + radius) * ones) for o in sorted(set(offsets))]

    def rule(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ok = rules[0](q, k)
        for r in rules[1:]:
            ok |= r(q, k)
        return ok

    return _reduce_pairs(layout, segs, rule, device)


def _check_diagonal(p: dict[str, Any]) -> None:
    _check_int("diagonal", p, "width", 1)
    _check_order("diagonal", p)


def _diagonal(layout: MaskLayout, device: torch.device, width: int, order: str) -> torch.Tensor:
    """Main diagonal band. ``order="token"``: ``|v_j - v_i| <= width // 2`` on raster video indices.
    ``order="frame"``: ``|s_j - s_i| <= width // 2`` on in-frame positions, in every frame pair (the same spatial
    position in every frame)."""
    return _multi_diagonal_mask(layout, device, [0], width, order)


def _check_multi_diagonal(p: dict[str, Any]) -> None:
    _check_int_list("multi_diagonal", p, "offsets", None)
    _check_int("multi_diagonal", p, "width", 1)
    _check_order("multi_diagonal", p)


def _multi_diagonal(
    layout: MaskLayout, device: torch.device, offsets: list[int], width: int, order: str
) -> torch.Tensor:
    """Several parallel diagonals: ``|(j - i) - o| <= width // 2`` for some ``o`` in ``offsets`` (key minus query),
    on raster video indices (``order="token"``) or on in-frame positions in every frame pair (``"frame"``)."""
    return _multi_diagonal_mask(layout, device, list(offsets), width, order)


def _check_stripe(p: dict[str, Any]) -> None:
    _check_int_list("stripe", p, "positions", 0)
    _check_int("stripe", p, "width", 1)
    _check_order("stripe", p)


def _stripe(
    layout: MaskLayout, device: torch.device, positions: list[int], width: int, order: str
) -> torch.Tensor:
    """Vertical stripes: every video query attends the keys at ``p <= pos_j < p + width`` for ``p`` in
    ``positions``; ``pos`` is the raster video index (``order="token"``) or the in-frame position, in every key
    frame (``"frame"``). Positions past the grid select nothing."""
    segs, _ = _order_geometry(layout, order, device)
    key_ok = torch.zeros_like(segs.block, dtype=torch.bool)
    for p in sorted(set(positions)):
        key_ok |= (segs.start < p + width) & (segs.end > p)
    cols = torch.zeros(layout.num_blocks, dtype=torch.bool, device=device)
    cols[segs.block[key_ok]] = True
    rows = torch.zeros(layout.num_blocks, dtype=torch.bool, device=device)
    rows[segs.block] = True  # every block holding a video query
    return rows[:, None] & cols[None, :]


register(
    PatternSpec(
        "diagonal",
        _diagonal,
        {"width": 256, "order": "token"},
        _check_diagonal,
        doc="diagonal band of width tokens, in raster token order or per frame pair (Sparse-vDiT)",
    )
)
register(
    PatternSpec(
        "multi_diagonal",
        _multi_diagonal,
        {"offsets": [-256, 0, 256], "width": 64, "order": "token"},
        _check_multi_diagonal,
        doc="parallel diagonals at key-minus-query offsets, token or frame order (Sparse-vDiT)",
    )
)
register(
    PatternSpec(
        "stripe",
        _stripe,
        {"positions": [0], "width": 64, "order": "token"},
        _check_stripe,
        doc="vertical stripes: every query attends keys at chosen positions, token or frame order (Sparse-vDiT)",
    )
)


# ----------------------------------------------------------------------------------------------------- density
def pattern_density(name: str, params: dict[str, Any], layout: MaskLayout) -> float:
    """Fraction of the ``seq_len²`` in-range (query, key) token pairs that the kernel computes for one head running
    ``name(**params)`` on ``layout``, text rows and columns forced dense (as build_layer_mask does)."""
    mask = build_layer_mask([(name, params)], layout, "cpu")[0, 0]  # (nB, nB)
    bs, n = layout.block_size, layout.seq_len
    sizes = torch.full((layout.num_blocks,), bs, dtype=torch.float64)
    sizes[-1] = n - (layout.num_blocks - 1) * bs  # partial last block: in-range tokens only
    return float(sizes @ mask.to(torch.float64) @ sizes) / (n * n)


__all__ = ["ORDERS", "pattern_density", "radial_frame_table"]
