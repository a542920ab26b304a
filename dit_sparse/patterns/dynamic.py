"""Dynamic patterns: masks computed from the layer's own q/k at generation time (DraftAttention).

``draft`` average-pools Q and K per mask block, computes a low-resolution attention map per head (softmax over the
pooled keys) and keeps, per query block, the top key blocks by a ``budget`` (fraction of blocks) or by a
cumulative probability ``mass``; the diagonal block is always kept (text rows/columns are forced dense by the
processor). With ``patch`` (default ``"auto"``: 8×16 latent tokens for 128-token blocks) the video tokens are
first reordered so each latent patch of ``ph × pw`` tokens of one frame is contiguous: one patch = one block when
the grid divides (partial patches at the edges just make some blocks straddle two patches). Everything runs on the
tensors' device, batched over heads, with no host synchronisation.

Masks are computed per call or, with ``refresh`` (default: the profile's ``schedule.refresh_interval``), at refresh
steps and reused in between (step caching, AdaSpa/SparseD); the processor keeps that cache and resets it per run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import PatternSpec, register
from .layout import MaskLayout

# ph × pw latent tokens per patch for each block size (DraftAttention's 8×16 at 128)
_AUTO_PATCH = {16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16)}


def patch_permutation(
    layout: MaskLayout, ph: int, pw: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 ``[seq_len]``: per frame, ``ph × pw`` latent patches in raster order, tokens raster inside a patch;
    text in place. Any grid: edge patches are smaller."""
    _, h, w = layout.grid
    coords = layout.token_coords(device)  # (N, 3); text rows are -1
    off = layout.video_offset
    video = coords[off : off + layout.num_video]  # (Nv, 3) in raster order
    fi, hi, wi = video.unbind(1)
    n_pw = -(-w // pw)
    n_ph = -(-h // ph)
    # lexicographic key (frame, patch row, patch col, row in patch, col in patch); all fit in int64
    key = (((fi * n_ph + hi // ph) * n_pw + wi // pw) * ph + hi % ph) * pw + wi % pw
    order = torch.argsort(key)  # permuted position -> raster index (keys are unique)
    perm = torch.arange(layout.seq_len, device=device)
    perm[off : off + layout.num_video] = order + off
    return perm


def resolve_patch(patch: Any, block_size: int) -> tuple[int, int] | None:
    if patch == "none":
        return None
    if patch == "auto":
        return _AUTO_PATCH[block_size]
    return int(patch[0]), int(patch[1])


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, H, N, D)`` -> float32 ``(B, H, nB, D)``: mean over the tokens of each block (the last may be short)."""
    bsz, heads, n, dim = x.shape
    nb = -(-n // block_size)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block_size - n))  # (B, H, nB*bs, D)
    sums = xf.view(bsz, heads, nb, block_size, dim).sum(dim=3)  # (B, H, nB, D)
    counts = torch.full((nb,), float(block_size), device=x.device)
    counts[-1] = n - (nb - 1) * block_size
    return sums / counts[:, None]


def pooled_attention_map(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 ``(B, H, nB, nB)``: softmax over pooled keys of pooled-query · pooled-key / sqrt(D)."""
    qp, kp = pool_blocks(q, block_size), pool_blocks(k, block_size)
    scores = qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, nB, nB)
    return torch.softmax(scores, dim=-1)


def select_blocks(probs: torch.Tensor, budget: float, mass: float | None) -> torch.Tensor:
    """bool like ``probs``: per row the top ``ceil(budget·nB)`` blocks, or (``mass``) the fewest largest blocks
    whose probabilities sum to at least ``mass``; plus the diagonal."""
    nb = probs.shape[-1]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if mass is None:
        top = torch.topk(probs, max(1, min(nb, math.ceil(budget * nb))), dim=-1).indices
        keep.scatter_(-1, top, True)
    else:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly larger blocks
        keep.scatter_(-1, idx, before < mass)  # the first block always (before = 0 < mass)
    eye = torch.eye(nb, dtype=torch.bool, device=probs.device)
    return keep | eye


def _check_draft(p: dict[str, Any]) -> None:
    b = p["budget"]
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
        raise ValueError(f"draft parameter budget must be a fraction of blocks in (0, 1], got {b!r}")
    m = p["mass"]
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1):
        raise ValueError(f"draft parameter mass must be None or a probability in (0, 1], got {m!r}")
    patch = p["patch"]
    ok = patch in ("auto", "none") or (
        isinstance(patch, (list, tuple))
        and len(patch) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in patch)
    )
    if not ok:
        raise ValueError(
            f"draft parameter patch must be 'auto', 'none' or [ph, pw] (latent tokens), got {patch!r}"
        )
    r = p["refresh"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
        raise ValueError(
            f"draft parameter refresh must be None (the profile's refresh_interval) or an integer >= 0, got {r!r}"
        )


def _draft_static(layout: MaskLayout, device: torch.device, **_: Any) -> torch.Tensor:
    """What draft always keeps, whatever q/k are: the diagonal (text is forced dense by the processor)."""
    return torch.eye(layout.num_blocks, dtype=torch.bool, device=device)


def _draft_perm(layout: MaskLayout, device: torch.device, patch: Any, **_: Any) -> torch.Tensor | None:
    ph_pw = resolve_patch(patch, layout.block_size)
    return None if ph_pw is None else patch_permutation(layout, *ph_pw, device=device)


def draft_mask(
    layout: MaskLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    perm: torch.Tensor | None,
    budget: float,
    mass: float | None,
    **_: Any,
) -> torch.Tensor:
    """bool ``(B, H, nB, nB)`` in permuted order (if ``perm``) from ``q, k (B, H, N, D)`` in original order."""
    if perm is not None:
        q = q.index_select(2, perm)  # (B, H, N, D) permuted: one gather for all heads
        k = k.index_select(2, perm)
    probs = pooled_attention_map(q, k, layout.block_size)
    return select_blocks(probs, float(budget), None if mass is None else float(mass))


register(
    PatternSpec(
        "draft",
        _draft_static,
        {"budget": 0.25, "mass": None, "patch": "auto", "refresh": None},
        _check_draft,
        doc="DraftAttention: pooled q/k per latent patch, keep the top blocks per row (budget or mass)",
        permutation=_draft_perm,
        dynamic=draft_mask,
    )
)
