"""Token permutations for ``sparse_attention(..., perm=...)`` (PARO reordering, draft patch tiling, 3-D tiles).

Convention: ``perm`` is an integer tensor ``[B|1, H|1, N]``; *permuted* position ``i`` holds *original* token
``perm[b, h, i]``. The block mask is expressed in permuted order and the output comes back in original order:

    out[b, h, perm[b, h, i]] = attention(q_p, k_p, v_p, block_mask)[b, h, i],   x_p[b, h, i] = x[b, h, perm[b, h, i]]

These helpers are plain torch on the tensor's device, one fused ``gather`` / ``scatter`` for all heads (an
expanded index, never a per-head loop) and no host synchronisation, except :func:`check_permutation` (a debug
check that syncs).
"""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def validate_perm(perm: object, bsz: int, heads: int, n: int, device: torch.device) -> torch.Tensor:
    """Shape, dtype and device checks (no host sync: values are not checked, see :func:`check_permutation`)."""
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"perm must be an integer torch.Tensor [B|1, H|1, N], got {type(perm).__name__}")
    if perm.dtype not in _INDEX_DTYPES:
        raise TypeError(f"perm must be torch.int32 or torch.int64, got {perm.dtype}")
    if perm.dim() != 3:
        raise ValueError(f"perm must be 3-D [B|1, H|1, N], got shape {tuple(perm.shape)}")
    if perm.shape[0] not in (1, bsz) or perm.shape[1] not in (1, heads) or perm.shape[2] != n:
        raise ValueError(
            f"perm has shape {tuple(perm.shape)}; with q of batch {bsz}, {heads} heads and {n} tokens it must be "
            f"[1 or {bsz}, 1 or {heads}, {n}]"
        )
    if perm.device != device:
        raise ValueError(f"perm is on {perm.device}, q on {device}: move perm to q's device")
    return perm


def check_permutation(perm: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every ``perm[b, h, :]`` is a permutation of ``0..N-1`` (debug: syncs)."""
    n = perm.shape[-1]
    ok = torch.equal(
        torch.sort(perm.long(), dim=-1).values, torch.arange(n, device=perm.device).expand_as(perm)
    )
    if not ok:
        raise ValueError(f"perm is not a permutation of 0..{n - 1} in every (batch, head) row")


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[..., perm[..., i]] = i`` (same shape and dtype; one scatter)."""
    ar = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm.long(), ar)


def _row_index(perm: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``perm [B|1, H|1, N]`` -> int64 index ``[B, H, N, D]`` for gather/scatter along dim 2 (an expanded view)."""
    bsz, heads, n, dim = x.shape
    return perm.long().expand(bsz, heads, n)[..., None].expand(bsz, heads, n, dim)


def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x [B, H, N, D]`` -> ``x_p`` with ``x_p[b, h, i] = x[b, h, perm[b, h, i]]`` (one gather for all heads)."""
    return torch.gather(x, 2, _row_index(perm, x))


def unpermute_tokens(x_p: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute_tokens`: ``x[b, h, perm[b, h, i]] = x_p[b, h, i]`` (one scatter)."""
    return torch.empty_like(x_p).scatter_(2, _row_index(perm, x_p), x_p)
