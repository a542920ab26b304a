"""sparse_attention(..., perm=...): permuted attention with the permuted mask equals unpermuted attention with the
equivalent token mask (fp64 reference), for the Triton kernel (interpreter on CPU) and the CPU gather path.

Oracle: ``reference_attention`` with *no* permutation and the token mask ``allowed(i, j) =
block_mask[inv[i] // bs, inv[j] // bs]`` in original order (``inv`` = inverse permutation). Tolerance as in
test_kernels: error <= 4 x the same-dtype dense SDPA error against fp64, plus one ulp of the output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dit_sparse
from dit_sparse.kernels import reference_attention, triton_interpreting
from dit_sparse.kernels.permutation import (
    check_permutation,
    invert_permutation,
    permute_tokens,
    unpermute_tokens,
)


def _needs_triton(impl: str) -> None:
    if impl == "triton" and not torch.cuda.is_available() and not triton_interpreting():
        pytest.skip("impl='triton' on CPU needs TRITON_INTERPRET=1 (set by conftest when CUDA is absent)")


def _qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))


def _random_perm(pb: int, ph: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(pb * ph)]).view(pb, ph, n)


def _token_mask_in_original_order(block_mask: torch.Tensor, perm: torch.Tensor, bs: int, b: int, h: int):
    """bool [B, H, N, N]: original tokens i, j may meet iff their permuted positions' blocks are allowed."""
    n = perm.shape[-1]
    pos = invert_permutation(perm).long().expand(b, h, n) // bs  # (B, H, N) block of each original token
    bm = block_mask.expand(b, h, -1, -1)
    b_ix = torch.arange(b)[:, None, None, None]
    h_ix = torch.arange(h)[None, :, None, None]
    return bm[b_ix, h_ix, pos[..., :, None], pos[..., None, :]]  # (B, H, N, N)


def _assert_close(out, ref, q, k, v) -> None:
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    err = (out.double() - ref).abs().max().item()
    sdpa = F.scaled_dot_product_attention(q, k, v)
    err_sdpa = (sdpa.double() - reference_attention(q, k, v, None)).abs().max().item()
    floor = torch.finfo(q.dtype).eps * ref.abs().max().item()
    assert err <= 4 * err_sdpa + floor, f"err {err:.3g} > 4 * sdpa err {err_sdpa:.3g} + {floor:.3g}"


@pytest.mark.parametrize("impl", ["triton", "gather", "reference"])
@pytest.mark.parametrize(
    ("b", "h", "n", "bs", "perm_bh", "dtype"),
    [
        (1, 2, 150, 32, (1, 2), torch.float32),  # per-head perms, ragged last block
        (2, 3, 97, 16, (2, 3), torch.bfloat16),  # per (batch, head), awkward N
        (2, 2, 130, 64, (1, 1), torch.float16),  # one perm broadcast over batch and heads
        (2, 2, 200, 128, (2, 1), torch.float32),  # per batch, broadcast over heads; one partial block
    ],
)
def test_permuted_equals_token_mask(impl, b, h, n, bs, perm_bh, dtype) -> None:
    _needs_triton(impl)
    q, k, v = _qkv(b, h, n, 64, dtype, seed=n)
    nb = -(-n // bs)
    g = torch.Generator().manual_seed(n + 1)
    mask = torch.rand(b, h, nb, nb, generator=g) < 0.45
    mask[..., 0, :] = False  # one empty block row: its (scattered) rows must be exact zeros
    perm = _random_perm(*perm_bh, n, seed=n + 2).to(torch.int32 if impl == "triton" else torch.int64)
    out = dit_sparse.sparse_attention(q, k, v, mask, bs, impl=impl, perm=perm)
    token_mask = _token_mask_in_original_order(mask, perm, bs, b, h)
    ref = reference_attention(q, k, v, None, token_mask=token_mask)
    _assert_close(out, ref, q, k, v)
    empty = ~token_mask.any(dim=-1)  # (B, H, N)
    assert empty.any() and torch.equal(out[empty], torch.zeros_like(out[empty]))


@pytest.mark.parametrize("impl", ["triton", "gather"])
def test_identity_perm_is_bit_identical(impl: str) -> None:
    """The permuted path with the identity computes exactly what the plain path computes."""
    _needs_triton(impl)
    q, k, v = _qkv(1, 2, 90, 32, torch.float32, seed=3)
    mask = torch.rand(1, 2, 3, 3, generator=torch.Generator().manual_seed(4)) < 0.6
    ident = torch.arange(90).view(1, 1, 90)
    plain = dit_sparse.sparse_attention(q, k, v, mask, 32, impl=impl)
    permuted = dit_sparse.sparse_attention(q, k, v, mask, 32, impl=impl, perm=ident)
    assert torch.equal(plain, permuted)


def test_permute_then_inverse_is_exact() -> None:
    x = torch.randn(2, 3, 77, 8, dtype=torch.bfloat16)
    for pb, ph in ((1, 1), (2, 1), (1, 3), (2, 3)):
        perm = _random_perm(pb, ph, 77, seed=pb * 10 + ph)
        xp = permute_tokens(x, perm)
        assert torch.equal(unpermute_tokens(xp, perm), x)
        assert torch.equal(invert_permutation(invert_permutation(perm)), perm)
        # gathering with the inverse undoes the permutation too
        assert torch.equal(permute_tokens(xp, invert_permutation(perm)), x)
        # and the permuted tensor really is x in the permuted order
        b0, h0 = pb - 1, ph - 1
        assert torch.equal(xp[b0, h0], x[b0, h0, perm[b0, h0]])


def test_check_permutation() -> None:
    check_permutation(_random_perm(2, 2, 33, seed=0))
    bad = torch.arange(33).view(1, 1, 33).clone()
    bad[0, 0, 5] = 6
    with pytest.raises(ValueError, match="not a permutation"):
        check_permutation(bad)
    q, k, v = _qkv(1, 1, 33, 16, torch.float32, seed=0)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="not a permutation"):
        dit_sparse.sparse_attention(q, k, v, mask, 16, impl="gather", perm=bad, check_perm=True)


def test_perm_validation_errors() -> None:
    q, k, v = _qkv(2, 2, 40, 16, torch.float32, seed=0)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    good = torch.arange(40).view(1, 1, 40)
    with pytest.raises(TypeError, match=r"int32 or torch\.int64"):
        dit_sparse.sparse_attention(q, k, v, mask, 16, perm=good.float())
    with pytest.raises(ValueError, match="3-D"):
        dit_sparse.sparse_attention(q, k, v, mask, 16, perm=good[0])
    with pytest.raises(ValueError, match=r"\[1 or 2, 1 or 2, 40\]"):
        dit_sparse.sparse_attention(q, k, v, mask, 16, perm=good.expand(3, 1, 40))
    with pytest.raises(ValueError, match="move perm"):
        dit_sparse.sparse_attention(q, k, v, mask, 16, perm=good.to("meta"))
    with pytest.raises(ValueError, match="as many queries as keys"):
        dit_sparse.sparse_attention(
            q[:, :, :20], k, v, torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, perm=good
        )


@pytest.mark.parametrize("impl", ["triton", "gather"])
def test_custom_op_opcheck_with_perm(impl: str) -> None:
    _needs_triton(impl)
    q, k, v = _qkv(1, 2, 37, 16, torch.float32, seed=15)
    mask = torch.rand(1, 1, 3, 3, generator=torch.Generator().manual_seed(16)) < 0.7
    perm = _random_perm(1, 2, 37, seed=17)
    torch.library.opcheck(
        torch.ops.dit_sparse.block_sparse_attention.default, (q, k, v, mask, 16, 0.25, impl, perm)
    )
