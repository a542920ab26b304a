"""Per-head attention statistics on captured q/k/v, without an N×N matrix.

For one self-attention call (q, k, v ``(B, H, N, D)``) and a list of candidate block masks this computes, per head:

* the block-pooled attention mass of a *sample of query blocks* (``(H, nSel, nB)``: each sampled query block's
  mean attention probability summed per key block, so every row sums to 1), and the share of that mass each
  candidate mask keeps (its *coverage*);
* each candidate's output error against dense: ``||O_c - O||_F / ||O||_F`` over the sampled query rows, where
  ``O`` is exact fp32 softmax attention and ``O_c`` is :func:`dit_sparse.kernels.sparse_attention` (the kernel that
  will run, ``impl`` as requested) with the candidate's mask.

A *dynamic* candidate (``dynamic[c]``: draft guidance, lse_topk) has no fixed mask: its per-head mask is built
from this call's q/k by the pattern's own builder (what the processor does at a refresh step) and its error measured
with that mask, or with a mask the caller gives (``given[c]``: a step-cached candidate's mask from an earlier step).

A candidate that reorders tokens (``perms[c]``, PARO's axis orders) has its mask in permuted order: its error and
coverage are measured the same way on the permuted q/k/v (the sampled query blocks are then blocks of the permuted
sequence, with their own exact reference), and its squared error is rescaled to the raster sample's reference norm
so that ``sqrt(err_sq / ref_sq)`` is its relative error like every other candidate's.

Memory: dense rows are computed in chunks of query rows so that at most ``chunk_elems`` scores (``B·H·rows·N``)
exist at once; candidates run one at a time over the sampled rows only. Sampling: ``max_query_blocks`` query blocks
evenly spaced over the sequence (always all of them when there are fewer), so the errors are exact for small
sequences and an unbiased-by-position estimate for long ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..patterns import MaskLayout

DEFAULT_CHUNK_ELEMS = 1 << 25  # 32M fp32 scores = 128 MiB per chunk


def sample_query_blocks(num_blocks: int, max_blocks: int) -> torch.Tensor:
    """``max_blocks`` query block ids evenly spaced over ``0..num_blocks-1`` (all of them if fewer), ascending."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    if num_blocks <= max_blocks:
        return torch.arange(num_blocks)
    return torch.unique(torch.linspace(0, num_blocks - 1, max_blocks).round().long())


def block_rows(blocks: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """Token rows of the given ascending block ids (the last block may be partial): ``int64 (R,)``."""
    offs = torch.arange(block_size)
    rows = (blocks[:, None] * block_size + offs[None, :]).reshape(-1)  # (nSel·bs,)
    return rows[rows < seq_len]


@dataclass
class CallStats:
    """Statistics of one attention call (summed over its batch): per-candidate squared errors and norms."""

    err_sq: torch.Tensor  # float64 (C, H): sum over sampled rows of ||O_c - O||²
    ref_sq: torch.Tensor  # float64 (H,): sum over sampled rows of ||O||²
    mass: (
        torch.Tensor
    )  # float64 (H, nSel, nB): pooled attention mass of the sampled query blocks (mean over batch)
    coverage: torch.Tensor  # float64 (C, H): share of the sampled mass inside each candidate mask


def dense_rows_and_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    sel_blocks: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 attention output of query ``rows`` ``(B, H, R, D)`` and the block-pooled mass ``(B, H, nSel, nB)``
    of the sampled query blocks, computed in chunks of rows (at most ``chunk_elems`` scores at once)."""
    bsz, heads, n, dim = k.shape
    scale = dim**-0.5 if scale is None else scale
    nb = -(-n // block_size)
    kf, vf = k.float(), v.float()
    key_block = torch.arange(n, device=k.device) // block_size  # (N,)
    row_block = torch.searchsorted(
        sel_blocks.to(rows.device), rows // block_size
    )  # (R,) index into sel_blocks
    out = torch.empty(bsz, heads, len(rows), dim, dtype=torch.float32, device=q.device)
    mass = torch.zeros(bsz, heads, len(sel_blocks), nb, dtype=torch.float64, device=q.device)
    chunk = max(1, chunk_elems // max(1, bsz * heads * n))
    for r0 in range(0, len(rows), chunk):
        r = rows[r0 : r0 + chunk].to(q.device)
        s = torch.matmul(q[:, :, r].float(), kf.transpose(-1, -2)) * scale  # (B, H, c, N)
        p = torch.softmax(s, dim=-1)
        out[:, :, r0 : r0 + len(r)] = torch.matmul(p, vf)
        pooled = torch.zeros(bsz, heads, len(r), nb, dtype=torch.float32, device=q.device)
        pooled.index_add_(3, key_block, p)  # (B, H, c, nB)
        mass.index_add_(2, row_block[r0 : r0 + len(r)].to(q.device), pooled.double())
    counts = torch.bincount(row_block, minlength=len(sel_blocks)).to(mass)  # rows per sampled block
    return out, mass / counts.view(1, 1, -1, 1)


def call_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: torch.Tensor,
    block_size: int,
    max_query_blocks: int = 32,
    impl: str = "auto",
    scale: float | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    perms: list[torch.Tensor | None] | None = None,
    dynamic: list[tuple[str, dict[str, Any]] | None] | None = None,
    layout: MaskLayout | None = None,
    given: dict[int, torch.Tensor] | None = None,
) -> CallStats:
    """Statistics of one self-attention call. ``q, k, v``: ``(B, H, N, D)``; ``masks``: bool ``(C, nB, nB)`` one
    per candidate (text rows/columns already forced); ``perms``: per candidate None (raster order) or its token
    permutation ``int64 [N]`` (permuted position ``i`` holds token ``perm[i]``; its mask is in that order);
    ``dynamic``: per candidate None or its (pattern, params) whose mask is built from ``q, k`` (needs ``layout``);
    ``given``: candidate -> bool ``(B, H, nB, nB)`` mask to measure instead (a step-cached mask of an earlier step)."""
    from ..kernels import sparse_attention

    n = q.shape[2]
    nb = -(-n // block_size)
    if masks.shape[-2:] != (nb, nb):
        raise ValueError(f"candidate masks are {tuple(masks.shape[-2:])} blocks, the call has {nb}×{nb}")
    sel = sample_query_blocks(nb, max_query_blocks)  # (nSel,)
    rows = block_rows(sel, block_size, n)  # (R,)
    ref, mass = dense_rows_and_mass(q, k, v, rows, sel, block_size, scale, chunk_elems)
    ref_sq = (ref.double() ** 2).sum(dim=(0, 2, 3))
    masks = masks.to(q.device)
    sel_dev = sel.to(q.device)
    perms = perms if perms is not None else [None] * masks.shape[0]
    if len(perms) != masks.shape[0]:
        raise ValueError(f"{len(perms)} permutations for {masks.shape[0]} candidate masks")
    dynamic = dynamic if dynamic is not None else [None] * masks.shape[0]
    if len(dynamic) != masks.shape[0] or (any(d is not None for d in dynamic) and layout is None):
        raise ValueError("dynamic candidates need one entry per candidate mask and the call's layout")
    groups: dict[bytes, list[int]] = {}
    for c, perm in enumerate(perms):
        groups.setdefault(b"" if perm is None else perm.cpu().numpy().tobytes(), []).append(c)
    err: dict[int, torch.Tensor] = {}  # candidate -> (H,), filled group by group
    coverage: dict[int, torch.Tensor] = {}
    for members in groups.values():
        perm = perms[members[0]]
        if perm is None:
            qq, kk, vv, ref_g, mass_g, scale_g = q, k, v, ref, mass, None
        else:
            p = perm.to(q.device)
            qq, kk, vv = q.index_select(2, p), k.index_select(2, p), v.index_select(2, p)
            ref_g, mass_g = dense_rows_and_mass(qq, kk, vv, rows, sel, block_size, scale, chunk_elems)
            ref_sq_g = (ref_g.double() ** 2).sum(dim=(0, 2, 3))
            # rescale to the raster sample's reference norm: err_sq / ref_sq is then this sample's ratio
            scale_g = torch.where(
                ref_sq_g > 0, ref_sq / ref_sq_g.clamp(min=torch.finfo(torch.float64).tiny), 1.0
            )
        q_sub = qq[:, :, rows.to(q.device)]  # (B, H, R, D): block i of q_sub = sampled block sel[i]
        mass_mean = mass_g.mean(dim=0)  # (H, nSel, nB)
        for c in members:
            spec = dynamic[c]
            if given is not None and c in given:
                full = given[c].to(q.device)  # (B, H, nB, nB)
            elif spec is None:
                full = masks[c][None, None]  # (1, 1, nB, nB)
            else:  # built from this call's q/k in original order, returned in the candidate's token order
                assert layout is not None
                full = _dynamic_mask(spec, layout, q, k, perm)  # (B, H, nB, nB)
            m = full[:, :, sel_dev]  # (B or 1, H or 1, nSel, nB)
            o = sparse_attention(q_sub, kk, vv, m, block_size, scale, impl=impl).float()  # (B, H, R, D)
            e = ((o - ref_g).double() ** 2).sum(dim=(0, 2, 3))  # (H,)
            err[c] = e if scale_g is None else e * scale_g
            share = m.double().mean(dim=0).expand(mass_mean.shape[0], -1, -1)  # (H, nSel, nB)
            coverage[c] = torch.einsum("hsk,hsk->h", share, mass_mean) / len(sel)
    order = range(masks.shape[0])
    return CallStats(
        torch.stack([err[c] for c in order]).cpu(),
        ref_sq.cpu(),
        mass.mean(dim=0).cpu(),
        torch.stack([coverage[c] for c in order]).cpu(),
    )


def _dynamic_mask(
    spec: tuple[str, dict[str, Any]],
    layout: MaskLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    perm: torch.Tensor | None,
) -> torch.Tensor:
    """bool ``(B, H, nB, nB)``: the dynamic pattern's mask for ``q, k (B, H, N, D)``, text rows/columns dense."""
    from ..patterns import PATTERNS, force_text_dense, validate_pattern

    name, params = spec
    builder = PATTERNS[name].dynamic
    if builder is None:
        raise ValueError(f"pattern {name!r} is not dynamic")
    p = None if perm is None else perm.to(q.device)
    return force_text_dense(builder(layout, q, k, p, **validate_pattern(name, params)), layout)


def relative_error(err_sq: torch.Tensor, ref_sq: torch.Tensor) -> torch.Tensor:
    """``sqrt(err_sq / ref_sq)`` per head, with a zero reference giving 0 (no error) or inf (error on nothing)."""
    ref = ref_sq.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(ref_sq > 0, (err_sq / ref).sqrt(), torch.where(err_sq > 0, torch.inf, 0.0).to(err_sq))
