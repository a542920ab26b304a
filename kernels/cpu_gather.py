"""Block-gather sparse attention for CPU tensors (and any device without the Triton kernel).

Only allowed blocks are computed, so a sparse mask is cheaper than dense SDPA on the CPU too. Query-block rows
are sorted by how many kv blocks they attend and processed in chunks. Each chunk gathers exactly those K/V blocks
(padded to the chunk's largest count, which sorting keeps small), runs one batched softmax-attention and
scatters the rows back. Rows with no allowed block are skipped and stay zero.

Half-precision inputs are computed in float32 (CPU half matmuls are slow and less accurate) and cast back.
"""

from __future__ import annotations

import math

import torch

from .indices import cdiv

# Upper bound on score elements materialised per chunk (float32): 16M elements = 64 MiB.
_MAX_CHUNK_SCORES = 16 * 1024 * 1024


def gather_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """``q [B,H,Nq,D]``, ``k/v [B,H,Nk,D]``, bool ``block_mask`` broadcastable to ``[B,H,nQ,nK]``."""
    bsz, heads, nq, dim = q.shape
    nk = k.shape[2]
    nqb, nkb = cdiv(nq, block_size), cdiv(nk, block_size)
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    mask = block_mask.expand(bsz, heads, nqb, nkb).reshape(bsz * heads * nqb, nkb)  # (R, nK)

    def blocks(x: torch.Tensor, n: int, nb: int) -> torch.Tensor:
        x = x.to(compute_dtype)
        if nb * block_size != n:
            x = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - n))
        return x.reshape(bsz * heads, nb, block_size, dim)  # (B*H, nb, bs, D)

    qb = blocks(q, nq, nqb).reshape(bsz * heads * nqb, block_size, dim)  # (R, bs, D)
    kb, vb = blocks(k, nk, nkb), blocks(v, nk, nkb)  # (B*H, nK, bs, D)
    out = torch.zeros_like(qb)  # (R, bs, D)

    counts = mask.sum(dim=-1)
    order = torch.argsort(counts, stable=True)
    kv_order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # allowed ids first, ascending
    counts_sorted = counts[order].tolist()
    first = next((i for i, c in enumerate(counts_sorted) if c > 0), len(counts_sorted))

    # key tokens past nk (padding of the last block) are never attended
    key_valid = (torch.arange(nkb * block_size) < nk).reshape(nkb, block_size)

    start = first
    while start < len(counts_sorted):
        # take rows until the padded chunk would exceed the score budget (rows are sorted by count)
        width = counts_sorted[start]
        stop = start + 1
        while stop < len(counts_sorted):
            width = counts_sorted[stop]
            if (stop + 1 - start) * block_size * width * block_size > _MAX_CHUNK_SCORES:
                break
            stop += 1
        width = counts_sorted[stop - 1]
        rows = order[start:stop]  # (c,)
        bh = torch.div(rows, nqb, rounding_mode="floor")  # (c,)
        kv_ids = kv_order[rows, :width]  # (c, w)
        slot_ok = torch.arange(width) < counts[rows].unsqueeze(1)  # (c, w) padding slots of shorter rows
        tok_ok = (key_valid[kv_ids] & slot_ok.unsqueeze(-1)).reshape(len(rows), 1, width * block_size)
        kg = kb[bh.unsqueeze(1), kv_ids].reshape(len(rows), width * block_size, dim)  # (c, w*bs, D)
        vg = vb[bh.unsqueeze(1), kv_ids].reshape(len(rows), width * block_size, dim)
        scores = torch.baddbmm(
            torch.zeros((), dtype=compute_dtype), qb[rows], kg.transpose(1, 2), alpha=scale
        )  # (c, bs, w*bs)
        scores.masked_fill_(~tok_ok, float("-inf"))
        # every processed row has >= 1 allowed block whose first key is in range, so no row is all -inf
        probs = torch.softmax(scores, dim=-1)
        out[rows] = torch.bmm(probs, vg)
        start = stop

    out = out.reshape(bsz, heads, nqb * block_size, dim)[:, :, :nq]
    # contiguous: the custom op's fake kernel (and torch.compile's stride asserts) promise a contiguous output
    return out.to(q.dtype).contiguous()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
