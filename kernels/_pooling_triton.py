"""The Triton program behind :func:`dit_sparse.kernels.pooling.block_mean` (imported on first use)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_mean_kernel(
    X,
    Perm,
    Out,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_xd,
    stride_p,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    H,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_PERM: tl.constexpr,
):
    """One program: the float32 mean of block ``program_id(0)``'s rows (gathered through ``Perm``) of one head."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    x_bh = X + b * stride_xb + h * stride_xh
    start = blk * BS
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, BS, ROWS):
        rows = start + r0 + tl.arange(0, ROWS)
        ok = (rows < N) & (r0 + tl.arange(0, ROWS) < BS)
        if HAS_PERM:
            src = tl.load(Perm + rows * stride_p, mask=ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        x = tl.load(
            x_bh + src[:, None] * stride_xn + offs_d[None, :] * stride_xd,
            mask=ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(x.to(tl.float32), axis=0)
    count = tl.minimum(N - start, BS).to(tl.float32)
    o_ptrs = Out + b * stride_ob + h * stride_oh + blk * stride_on + offs_d * stride_od
    tl.store(o_ptrs, acc / count, mask=d_ok)
