"""Block-sparse index building: bool block mask <-> FlexAttention-style index lists.

Index format (FlexAttention-compatible, DESIGN §4):

* ``kv_num_blocks [B, H, nQ]`` int32 — how many kv blocks query-block row ``m`` attends;
* ``kv_indices [B, H, nQ, nK]`` int32 — those kv block ids, **sorted ascending and packed left**; the entries
  past ``kv_num_blocks`` hold the remaining (not attended) ids, also ascending, exactly as FlexAttention's
  ``_dense_to_ordered`` leaves them.

Everything here is plain torch on the tensor's own device: no ``.item()``, no ``.tolist()``, no host sync, so the
index for a CUDA mask is built on the GPU and is safe inside CUDA graphs and ``torch.compile``.

:class:`BlockSparseIndex` is what the Triton kernel consumes. It is built at a *granularity* (tokens per index
row / column) that may be coarser than the mask's block size, so kernel tile sizes are independent of the mask's
block size: a coarse block is *full* when every fine block inside it is allowed and it holds no out-of-range key,
*partial* when only some are (the kernel then applies an element mask read from the fine mask and the key bound),
and skipped otherwise. Only partial blocks pay for element masking.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


# Largest q tile of the Triton kernel's configs: its q granularity must be a multiple of it.
_BLOCK_M_MAX = 128
# kv granularity floor: 64-token key blocks keep fine masks cheap while allowing BLOCK_N 64 (and 128 at bs 128).
_KV_GRANULARITY_MIN = 64


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def index_granularity(block_size: int) -> tuple[int, int]:
    """``(G_q, G_k)``: tokens per index row / column the Triton kernel uses for a mask of ``block_size`` (legal for
    every one of its tile configs)."""
    return max(block_size, _BLOCK_M_MAX), max(block_size, _KV_GRANULARITY_MIN)


def squeeze_broadcast(mask: torch.Tensor) -> torch.Tensor:
    """An expanded view (stride 0 over B or H) back to size 1 there, so the index is built once, not per head."""
    for dim in (0, 1):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    return mask


def block_mask_to_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``bool [..., nQ, nK]`` -> ``(kv_num_blocks int32 [..., nQ], kv_indices int32 [..., nQ, nK])``.

    Allowed ids come first in ascending order; a stable sort keeps the order of equal keys.
    """
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be torch.bool, got {block_mask.dtype}")
    kv_num_blocks = block_mask.sum(dim=-1, dtype=torch.int32)
    # sort key 0 for allowed, 1 for not allowed; stable -> ascending ids inside each group
    kv_indices = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return kv_num_blocks, kv_indices


def indices_to_block_mask(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, num_kv_blocks: int
) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_indices`: rebuild ``bool [..., nQ, num_kv_blocks]``."""
    width = kv_indices.shape[-1]
    valid = torch.arange(width, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)  # [..., nQ, width]
    out = torch.zeros((*kv_indices.shape[:-1], num_kv_blocks), dtype=torch.bool, device=kv_indices.device)
    # invalid slots scatter to a dummy column that is dropped afterwards
    idx = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, num_kv_blocks, dtype=torch.long))
    out = torch.cat([out, torch.zeros_like(out[..., :1])], dim=-1)
    out.scatter_(-1, idx, valid)
    return out[..., :num_kv_blocks]


def _pool(mask: torch.Tensor, fq: int, fk: int, pad_rows: bool, reduce_all: bool) -> torch.Tensor:
    """Pool ``[..., nQ, nK]`` by ``fq × fk`` with any/all; rows past the end pad with ``pad_rows``, columns with False."""
    *lead, nq, nk = mask.shape
    cq, ck = cdiv(nq, fq), cdiv(nk, fk)
    if cq * fq != nq or ck * fk != nk:
        padded = torch.full((*lead, cq * fq, ck * fk), False, dtype=torch.bool, device=mask.device)
        if pad_rows:
            padded[..., nq:, :] = True
        padded[..., :nq, :nk] = mask
        mask = padded
    m = mask.reshape(*lead, cq, fq, ck, fk)  # (..., cq, fq, ck, fk)
    return m.all(dim=-1).all(dim=-2) if reduce_all else m.any(dim=-1).any(dim=-2)


@dataclass(frozen=True)
class BlockSparseIndex:
    """A block mask turned into the kernel's index lists, built once and reusable across layers and steps.

    ``fine_mask`` is the original bool block mask ``[B|1, H|1, ceil(Nq/bs), ceil(Nk/bs)]`` (needed by partial
    blocks when the granularity is coarser than the mask's block size).
    """

    kv_num_blocks: torch.Tensor  # int32 [B|1, H|1, nQc]   partial blocks (element mask applied)
    kv_indices: torch.Tensor  # int32 [B|1, H|1, nQc, nKc]
    full_kv_num_blocks: torch.Tensor  # int32 [B|1, H|1, nQc]   full blocks (no element mask)
    full_kv_indices: torch.Tensor  # int32 [B|1, H|1, nQc, nKc]
    fine_mask: torch.Tensor  # bool [B|1, H|1, nQf, nKf]
    block_size: int  # the fine mask's block size
    q_granularity: int  # query tokens per index row (multiple of block_size)
    kv_granularity: int  # key tokens per index column (multiple of block_size)
    seq_len_q: int
    seq_len_kv: int

    def computed_block_pairs(self) -> torch.Tensor:
        """Number of (q-row, kv-column) coarse blocks the kernel computes, per (b, h): ``[B|1, H|1]``."""
        return (self.kv_num_blocks.sum(-1) + self.full_kv_num_blocks.sum(-1)).to(torch.int64)

    def nbytes(self) -> int:
        """Bytes of the index lists (the fine mask belongs to the caller)."""
        lists = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices)
        return sum(t.numel() * t.element_size() for t in lists)

    def density(self) -> float:
        """Fraction of token pairs allowed by the fine mask, counting only in-range tokens (host sync)."""
        return float(token_density(self.fine_mask, self.block_size, self.seq_len_q, self.seq_len_kv))


def token_density(block_mask: torch.Tensor, block_size: int, nq: int, nk: int) -> torch.Tensor:
    """Fraction of in-range (query, key) token pairs a bool block mask allows, averaged over batch and heads."""
    nqb, nkb = block_mask.shape[-2], block_mask.shape[-1]
    rows = torch.full((nqb,), block_size, dtype=torch.float64, device=block_mask.device)
    rows[-1] = nq - (nqb - 1) * block_size
    cols = torch.full((nkb,), block_size, dtype=torch.float64, device=block_mask.device)
    cols[-1] = nk - (nkb - 1) * block_size
    weighted = (block_mask.to(torch.float64) * rows[:, None] * cols[None, :]).sum(dim=(-1, -2))
    return (weighted / (nq * nk)).mean()


def build_block_index(
    block_mask: torch.Tensor,
    block_size: int,
    seq_len_q: int,
    seq_len_kv: int,
    q_granularity: int | None = None,
    kv_granularity: int | None = None,
) -> BlockSparseIndex:
    """Build the kernel index for ``block_mask`` at the given granularity (default: the mask's own block size).

    Granularities must be multiples of ``block_size``. A coarse block is *full* if every fine block inside is
    allowed and none of its keys is past ``seq_len_kv``; *partial* if at least one fine block is allowed but it is
    not full. Runs on the mask's device without host synchronisation.
    """
    gq = q_granularity or block_size
    gk = kv_granularity or block_size
    if gq % block_size or gk % block_size:
        raise ValueError(f"granularity ({gq}, {gk}) must be a multiple of block_size {block_size}")
    fq, fk = gq // block_size, gk // block_size
    any_ = _pool(block_mask, fq, fk, pad_rows=False, reduce_all=False)
    all_ = _pool(block_mask, fq, fk, pad_rows=True, reduce_all=True)
    if seq_len_kv % gk:
        # the last coarse kv block holds out-of-range keys: it always needs the element (bounds) mask
        all_ = all_.clone()
        all_[..., -1] = False
    partial = any_ & ~all_
    kv_num, kv_idx = block_mask_to_indices(partial)
    full_num, full_idx = block_mask_to_indices(all_)
    return BlockSparseIndex(
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        fine_mask=block_mask,
        block_size=block_size,
        q_granularity=gq,
        kv_granularity=gk,
        seq_len_q=seq_len_q,
        seq_len_kv=seq_len_kv,
    )


def compact_index(index: BlockSparseIndex) -> BlockSparseIndex:
    """The same index with ``kv_indices`` / ``full_kv_indices`` cut to the longest row's count (at least one
    column): the kernel reads only the first ``kv_num_blocks`` ids of a row, so nothing it reads changes. For an
    index kept across calls (a layer plan), where the full ``nK`` columns would cost memory; reads the counts'
    maximum, so it synchronises the host once."""
    counts = torch.stack([index.kv_num_blocks.max(), index.full_kv_num_blocks.max()]).tolist()
    width_p, width_f = (max(1, int(c)) for c in counts)
    return replace(
        index,
        kv_indices=index.kv_indices[..., :width_p].contiguous(),
        full_kv_indices=index.full_kv_indices[..., :width_f].contiguous(),
    )
