"""block_mean (draft guidance's pooling) against a float64 brute force: per block, the mean of its permuted rows.

The Triton program runs under TRITON_INTERPRET=1 on the CPU (set by conftest) and compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from dit_sparse.kernels import triton_interpreting
from dit_sparse.kernels.pooling import block_mean

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _brute(x: torch.Tensor, bs: int, perm: torch.Tensor | None) -> torch.Tensor:
    """float64 by an explicit loop over blocks and rows."""
    bsz, heads, n, dim = x.shape
    order = list(range(n)) if perm is None else [int(i) for i in perm]
    out = torch.zeros(bsz, heads, -(-n // bs), dim, dtype=torch.float64)
    for blk in range(out.shape[2]):
        rows = order[blk * bs : (blk + 1) * bs]
        for r in rows:
            out[:, :, blk] += x[:, :, r].double().cpu()
        out[:, :, blk] /= len(rows)
    return out


def _impls() -> list[str]:
    impls = ["torch"]
    if DEVICE == "cuda" or triton_interpreting():
        impls.append("triton")
    return impls


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize(
    ("n", "bs", "dim", "dtype"),
    [
        (162, 16, 32, torch.float32),  # short last block
        (300, 128, 72, torch.bfloat16),  # head dim that is not a power of two, 2 full blocks + 44
        (64, 64, 64, torch.float16),  # exactly one block
        (5, 16, 16, torch.float32),  # fewer tokens than one block
        (97, 32, 128, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("perm_kind", ["none", "int64", "int32"])
def test_block_mean_matches_brute_force(impl, n, bs, dim, dtype, perm_kind) -> None:
    g = torch.Generator().manual_seed(n + bs + dim)
    x = torch.randn(2, 3, n, dim, generator=g).to(dtype)
    perm = None if perm_kind == "none" else torch.randperm(n, generator=g).to(getattr(torch, perm_kind))
    want = _brute(x, bs, perm)
    xd = x.to(DEVICE)
    got = block_mean(xd, bs, None if perm is None else perm.to(DEVICE), impl=impl)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # float32 accumulation of at most bs rows: a few float32 ulps of the block's magnitude
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", _impls())
def test_block_mean_reads_strided_views(impl) -> None:
    """A (B, N, H, D) tensor transposed to (B, H, N, D), as the processors hand q/k over: same values as a copy."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 70, 3, 24, generator=g).to(DEVICE).transpose(1, 2)  # (B, H, N, D) view
    assert not x.is_contiguous()
    perm = torch.randperm(70, generator=g).to(DEVICE)
    got = block_mean(x, 16, perm, impl=impl)
    want = block_mean(x.contiguous(), 16, perm, impl="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.double().cpu(), _brute(x.cpu(), 16, perm.cpu()), rtol=0, atol=1e-6)


def test_block_mean_rejects_bad_input() -> None:
    x = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match=r"4-D \[B, H, N, D\]"):
        block_mean(x[0], 4)
    with pytest.raises(ValueError, match=r"perm must be 1-D \[N\] with N=10"):
        block_mean(x, 4, torch.arange(9))
    with pytest.raises(TypeError, match=r"perm must be torch\.int32 or torch\.int64"):
        block_mean(x, 4, torch.arange(10).float())
    with pytest.raises(TypeError, match="floating"):
        block_mean(x.long(), 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        block_mean(x, 4, impl="cuda")


def test_block_mean_of_no_tokens_is_empty() -> None:
    got = block_mean(torch.randn(2, 3, 0, 8), 16)
    assert got.shape == (2, 3, 0, 8) and got.dtype == torch.float32


@pytest.mark.gpu
def test_block_mean_has_no_host_sync() -> None:
    x = torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(1000, device="cuda")
    block_mean(x, 128, perm)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block_mean(x, 128, perm)
        block_mean(x, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
