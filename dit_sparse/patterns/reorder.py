"""Per-head token reordering (PARO): put the video tokens in one of the six axis orders of (F, H, W) so that a
head's pattern becomes block-local, then attend within a band of neighbour blocks in that order.

``axis_permutation(layout, "HWF")`` lists the video tokens with h slowest and f fastest: a head that attends
"the same pixel in every frame" (a temporal stripe in raster order) becomes block-diagonal. Text tokens stay where
they are. The permutation convention is the kernel's (``dit_sparse.kernels.permutation``): permuted position ``i``
holds original token ``perm[i]``; masks of a reordering pattern are expressed in permuted order.
"""

from __future__ import annotations

from typing import Any

import torch

from . import PatternSpec, register
from .layout import MaskLayout

AXIS_ORDERS = ("FHW", "FWH", "HFW", "HWF", "WFH", "WHF")


def axis_permutation(layout: MaskLayout, order: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``[seq_len]``: video tokens listed in axis ``order`` (first letter slowest), text in place."""
    if order not in AXIS_ORDERS:
        raise ValueError(f"axis order must be one of {AXIS_ORDERS}, got {order!r}")
    f, h, w = layout.grid
    raster = torch.arange(layout.num_video, device=device).view(f, h, w)  # (F, H, W) raster index
    dims = ["FHW".index(axis) for axis in order]
    video = raster.permute(*dims).reshape(-1)  # permuted position -> raster index
    perm = torch.arange(layout.seq_len, device=device)
    off = layout.video_offset
    perm[off : off + layout.num_video] = video + off
    return perm


def band_mask(layout: MaskLayout, device: torch.device, blocks: int) -> torch.Tensor:
    """``[nB, nB]`` bool: video block pairs at most ``blocks`` apart (text blocks are forced dense later)."""
    first, last = layout.video_block_range()
    ids = torch.arange(layout.num_blocks, device=device)
    video = (ids >= first) & (ids < last)
    near = (ids[:, None] - ids[None, :]).abs() <= blocks
    return near & video[:, None] & video[None, :]


def _check_reorder_window(p: dict[str, Any]) -> None:
    if p["order"] not in AXIS_ORDERS:
        raise ValueError(f"reorder_window parameter order must be one of {AXIS_ORDERS}, got {p['order']!r}")
    b = p["blocks"]
    if not isinstance(b, int) or isinstance(b, bool) or b < 0:
        raise ValueError(
            f"reorder_window parameter blocks must be an integer >= 0 (neighbour blocks), got {b!r}"
        )


def _reorder_window_mask(layout: MaskLayout, device: torch.device, order: str, blocks: int) -> torch.Tensor:
    """Band of ``blocks`` neighbour blocks in the permuted order (the mask is in permuted order)."""
    return band_mask(layout, device, blocks)


def _reorder_window_perm(layout: MaskLayout, device: torch.device, order: str, blocks: int) -> torch.Tensor:
    return axis_permutation(layout, order, device)


register(
    PatternSpec(
        "reorder_window",
        _reorder_window_mask,
        {"order": "HWF", "blocks": 1},
        _check_reorder_window,
        doc="PARO: reorder video tokens by an axis order of (F, H, W), attend a band of neighbour blocks",
        permutation=_reorder_window_perm,
    )
)
