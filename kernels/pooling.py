"""Per-block means of Q or K rows, optionally in permuted token order: the pooling step of draft guidance.

``block_mean(x, block_size, perm)`` returns float32 ``[B, H, ceil(N/bs), D]``: the mean over the ``block_size``
consecutive *permuted* positions of each block (the last block may be short), where permuted position ``i`` holds
token ``perm[i]`` (``perm`` is ``[N]``, shared by every batch row and head). It never builds a permuted or float32
copy of ``x``:

* CUDA (and ``impl="triton"`` under ``TRITON_INTERPRET=1``): one Triton program per (block, batch·head) gathers
  its rows through ``perm`` and sums them in float32 registers, so ``x`` is read once.
* CPU: a gather by ``perm`` (when given), then a float32-accumulating sum over a view of the full blocks and one
  over the short tail; no padding copy.

Knows nothing of patterns: the caller says which permutation and block size.
"""

from __future__ import annotations

import torch

from .api import triton_interpreting

_IMPLS = ("auto", "triton", "torch")
_ROWS = 32  # rows a Triton program sums per loop iteration


def _check(x: torch.Tensor, block_size: int, perm: torch.Tensor | None, impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if perm is not None:
        if perm.dim() != 1 or perm.shape[0] != x.shape[2]:
            raise ValueError(f"perm must be 1-D [N] with N={x.shape[2]}, got shape {tuple(perm.shape)}")
        if perm.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"perm must be torch.int32 or torch.int64, got {perm.dtype}")
        if perm.device != x.device:
            raise ValueError(f"perm is on {perm.device}, x on {x.device}")


def block_mean(
    x: torch.Tensor, block_size: int, perm: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """float32 ``[B, H, nB, D]``: mean of each block of ``block_size`` (permuted) rows of ``x [B, H, N, D]``.

    ``impl``: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` (CUDA, or CPU under the interpreter),
    ``"torch"``. No host synchronisation."""
    _check(x, block_size, perm, impl)
    bsz, heads, n, dim = x.shape
    nb = -(-n // block_size)
    if n == 0:
        return x.new_zeros((bsz, heads, 0, dim), dtype=torch.float32)
    use_triton = impl == "triton" or (impl == "auto" and x.device.type == "cuda")
    if use_triton:
        if x.device.type != "cuda" and not triton_interpreting():
            raise ValueError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1; use impl='torch'")
        if x.dtype == torch.float64:
            raise TypeError("the Triton block_mean takes float16 / bfloat16 / float32, got float64")
        return _triton_block_mean(x, block_size, perm, nb)
    return _torch_block_mean(x, block_size, perm)


def _torch_block_mean(x: torch.Tensor, block_size: int, perm: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[2]
    xp = x if perm is None else x.index_select(2, perm)  # (B, H, N, D) in permuted order
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    full = n // block_size
    parts = []
    if full:
        head = xp[:, :, : full * block_size].unflatten(2, (full, block_size))  # (B, H, full, bs, D) view
        parts.append(head.sum(dim=3, dtype=acc) / block_size)
    if full * block_size < n:
        tail = xp[:, :, full * block_size :]
        parts.append(tail.sum(dim=2, keepdim=True, dtype=acc) / tail.shape[2])
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.float()


def _triton_block_mean(x: torch.Tensor, block_size: int, perm: torch.Tensor | None, nb: int) -> torch.Tensor:
    import triton

    from ._pooling_triton import block_mean_kernel

    bsz, heads, n, dim = x.shape
    out = torch.empty((bsz, heads, nb, dim), dtype=torch.float32, device=x.device)
    perm_arg = perm if perm is not None else out  # never read without a permutation
    grid = (nb, bsz * heads)
    meta = {
        "HEAD_DIM": dim,
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        "BS": block_size,
        "ROWS": min(_ROWS, triton.next_power_of_2(block_size)),
        "HAS_PERM": perm is not None,
    }
    args = (x, perm_arg, out, *x.stride(), perm.stride(0) if perm is not None else 0, *out.stride(), heads, n)
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            block_mean_kernel[grid](*args, **meta)
    else:
        block_mean_kernel[grid](*args, **meta)
    return out
