"""The fp64 reference for block-sparse attention: the spec every implementation is tested against.

Readable on purpose; optimised code never imports it.

    out[b, h, i] = sum_j softmax_j(scale * q_i · k_j | allowed(i, j)) v_j
    allowed(i, j) = block_mask[b, h, i // block_size, j // block_size]

A query row with no allowed key returns zeros (never NaN).

With a token permutation ``perm [B|1, H|1, N]`` (permuted position ``i`` holds original token ``perm[b, h, i]``),
q, k, v are first put in permuted order, the block mask applies there, and the output rows are put back:

    out[b, h, perm[b, h, i]] = attention(q[perm], k[perm], v[perm] | block_mask)[b, h, i]
"""

from __future__ import annotations

import math

import torch


def expand_block_mask(
    block_mask: torch.Tensor, block_size: int, seq_len_q: int, seq_len_kv: int
) -> torch.Tensor:
    """bool ``[B|1, H|1, nQ, nK]`` block mask -> bool ``[B|1, H|1, seq_len_q, seq_len_kv]`` token mask."""
    token = block_mask.repeat_interleave(block_size, dim=-2)[..., :seq_len_q, :]
    return token.repeat_interleave(block_size, dim=-1)[..., :seq_len_kv]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None,
    block_size: int = 128,
    scale: float | None = None,
    token_mask: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention in float64. ``q [B,H,Nq,D]``, ``k/v [B,H,Nk,D]``; returns float64 ``[B,H,Nq,D]``.

    Give either a block mask (with its ``block_size``) or a bool ``token_mask`` broadcastable to
    ``[B, H, Nq, Nk]``; with neither, attention is dense. ``perm`` (needs Nq == Nk): the masks are in permuted
    order, the output in original order (see the module docstring).
    """
    if perm is not None:
        bsz, heads, n, _ = q.shape
        rows = perm.long().expand(bsz, heads, n)  # (B, H, N): original token at each permuted position
        b_ix = torch.arange(bsz, device=q.device)[:, None, None]
        h_ix = torch.arange(heads, device=q.device)[None, :, None]
        out_p = reference_attention(
            q[b_ix, h_ix, rows],
            k[b_ix, h_ix, rows],
            v[b_ix, h_ix, rows],
            block_mask,
            block_size,
            scale,
            token_mask,
        )  # (B, H, N, D) in permuted order
        out = torch.empty_like(out_p)
        out[b_ix, h_ix, rows] = out_p  # back to original order
        return out
    q64, k64, v64 = q.double(), k.double(), v.double()
    nq, nk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * (q64 @ k64.transpose(-1, -2))  # (B, H, Nq, Nk)
    if block_mask is not None:
        token_mask = expand_block_mask(block_mask.to(q.device), block_size, nq, nk)
    if token_mask is None:
        return torch.softmax(scores, dim=-1) @ v64
    allowed = token_mask.to(q.device).expand_as(scores)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max) * allowed
    denom = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(denom > 0, weights / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return probs @ v64
