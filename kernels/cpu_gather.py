"""Block-gather sparse attention for CPU tensors (and any device without the Triton kernel).

Only allowed blocks are computed, so a sparse mask is cheaper than dense SDPA on the CPU too. Query-block rows
are sorted by how many kv blocks they attend (rows that hold a ragged last kv block after the others of their count)
and processed in small chunks. Each chunk gathers exactly those K/V blocks with one ``index_select`` (padded to the
chunk's largest count, which sorting keeps small) and runs one batched, fused ``scaled_dot_product_attention`` over
them, with a key mask only where the chunk has padding slots or holds the ragged last block, then scatters the rows
back. Rows with no allowed block are set to zero.

Half-precision inputs are computed in float32 (CPU half matmuls are slow and less accurate) and cast back.
"""

from __future__ import annotations

import math

import torch

from .indices import cdiv

# Upper bound on score elements materialised per chunk (float32): 1M elements = 4 MiB. Small chunks keep the gathered
# K/V and the scores in cache: on the 2-core development CPU 1M was 2x faster than 16M at the bundled model's shape
# (2x2 heads, 4,372 tokens, window masks of density 0.14-0.21), 1.2x / 1.0x at 2x12x8000 (random masks 0.1 / 0.3).
_MAX_CHUNK_SCORES = 1024 * 1024


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
    bs = block_size
    nqb, nkb = cdiv(nq, bs), cdiv(nk, bs)
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    mask = block_mask.expand(bsz, heads, nqb, nkb).reshape(bsz * heads * nqb, nkb)  # (R, nK)

    def blocks(x: torch.Tensor, n: int, nb: int) -> torch.Tensor:
        x = x.to(compute_dtype)
        if nb * bs != n:
            x = torch.nn.functional.pad(x, (0, 0, 0, nb * bs - n))
        return x.reshape(bsz * heads * nb, bs * dim)  # one row per block: index_select copies whole blocks

    qb = blocks(q, nq, nqb).view(-1, bs, dim)  # (R, bs, D)
    kb, vb = blocks(k, nk, nkb), blocks(v, nk, nkb)  # (B*H*nK, bs*D)
    out = torch.empty_like(qb)  # (R, bs, D); rows with no allowed block are zeroed below

    counts = mask.sum(dim=-1)
    ragged = nk % bs != 0
    last = mask[:, -1] if ragged else torch.zeros_like(counts, dtype=torch.bool)
    order = torch.argsort(counts * 2 + last.long(), stable=True)
    last_sorted = last[order].tolist()
    kv_order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # allowed ids first, ascending
    counts_sorted = counts[order].tolist()
    start = next((i for i, c in enumerate(counts_sorted) if c > 0), len(counts_sorted))
    if start:
        out[order[:start]] = 0
    tail_pad = torch.arange(bs) >= nk - (nkb - 1) * bs  # key slots of the last block past nk

    while start < len(counts_sorted):
        # grow the chunk while its padded score matrix stays under budget (rows are sorted by count)
        stop = start + 1
        while (
            stop < len(counts_sorted)
            and (stop + 1 - start) * bs * counts_sorted[stop] * bs <= _MAX_CHUNK_SCORES
            and last_sorted[stop] == last_sorted[start]
        ):
            stop += 1
        width = counts_sorted[stop - 1]
        rows = order[start:stop]  # (c,)
        c = len(rows)
        kv_ids = kv_order[rows, :width]  # (c, w)
        flat = (torch.div(rows, nqb, rounding_mode="floor")[:, None] * nkb + kv_ids).reshape(-1)
        kg = kb.index_select(0, flat).view(c, 1, width * bs, dim)  # (c, 1, w*bs, D)
        vg = vb.index_select(0, flat).view(c, 1, width * bs, dim)
        attn_mask = None
        has_last = last_sorted[start]
        if counts_sorted[start] < width or has_last:
            # padding slots of rows with fewer blocks, and keys past nk in the last block, are not attended
            ok = (torch.arange(width)[None, :] < counts[rows][:, None])[:, :, None].expand(c, width, bs)
            if has_last:
                ok = ok & ~((kv_ids == nkb - 1)[:, :, None] & tail_pad[None, None, :])
            attn_mask = ok.reshape(c, 1, 1, width * bs)
        # every processed row has >= 1 allowed block whose first key is in range, so no row is fully masked
        out[rows] = torch.nn.functional.scaled_dot_product_attention(
            qb[rows].unsqueeze(1), kg, vg, attn_mask=attn_mask, scale=scale
        ).squeeze(1)
        start = stop

    out = out.reshape(bsz, heads, nqb * bs, dim)[:, :, :nq]
    # contiguous: the custom op's fake kernel (and torch.compile's stride asserts) promise a contiguous output
    return out.to(q.dtype).contiguous()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
