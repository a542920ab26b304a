"""Property tests for the block-sparse index (kernels/indices.py), checked against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.kernels import (
    block_mask_to_indices,
    build_block_index,
    expand_block_mask,
    indices_to_block_mask,
    token_density,
)


@st.composite
def bool_masks(draw, max_blocks: int = 9) -> torch.Tensor:
    """bool [B, H, nQ, nK] with a drawn density (all-False and all-True included)."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, max_blocks)), draw(st.integers(1, max_blocks))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nq, nk, generator=g) < density


@st.composite
def masks_with_lengths(draw):
    """(mask, block_size, Nq, Nk): Nq/Nk anywhere in the last block (ragged ends)."""
    mask = draw(bool_masks())
    bs = draw(st.sampled_from([16, 32, 64]))
    nqb, nkb = mask.shape[-2:]
    nq = draw(st.integers((nqb - 1) * bs + 1, nqb * bs))
    nk = draw(st.integers((nkb - 1) * bs + 1, nkb * bs))
    return mask, bs, nq, nk


@settings(max_examples=80, deadline=None)
@given(mask=bool_masks())
def test_round_trip_is_exact(mask: torch.Tensor) -> None:
    num, idx = block_mask_to_indices(mask)
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    assert torch.equal(indices_to_block_mask(num, idx, mask.shape[-1]), mask)


@settings(max_examples=80, deadline=None)
@given(mask=bool_masks())
def test_indices_sorted_packed_left_and_counted(mask: torch.Tensor) -> None:
    num, idx = block_mask_to_indices(mask)
    assert num.shape == mask.shape[:-1] and idx.shape == mask.shape
    assert torch.equal(num.long(), mask.sum(-1))
    nk = mask.shape[-1]
    rows_mask = mask.reshape(-1, nk)
    for row_mask, n, row in zip(rows_mask, num.reshape(-1).tolist(), idx.reshape(-1, nk).long()):
        allowed, rest = row[:n], row[n:]
        assert torch.equal(allowed, torch.nonzero(row_mask).flatten())  # allowed ids first, ascending
        assert bool(row_mask[rest].logical_not().all())
        assert bool((rest[1:] > rest[:-1]).all())  # the rest ascending too (FlexAttention's layout)
        assert torch.equal(row.sort().values, torch.arange(nk))


def _brute_force_coarse(mask: torch.Tensor, bs: int, nk: int, gq: int, gk: int):
    """(any, full) per coarse block: any fine block allowed / all in-range fine blocks allowed and no key >= nk."""
    fq, fk = gq // bs, gk // bs
    *lead, nqb, nkb = mask.shape
    cq, ck = math.ceil(nqb / fq), math.ceil(nkb / fk)
    any_ = torch.zeros(*lead, cq, ck, dtype=torch.bool)
    full = torch.zeros(*lead, cq, ck, dtype=torch.bool)
    for r in range(cq):
        for c in range(ck):
            # the fine blocks inside (in range only)
            sub = mask[..., r * fq : (r + 1) * fq, c * fk : (c + 1) * fk]
            any_[..., r, c] = sub.flatten(-2).any(-1)
            in_range = (c + 1) * gk <= nk
            full[..., r, c] = sub.flatten(-2).all(-1) & in_range
    return any_, full


@settings(max_examples=60, deadline=None)
@given(data=masks_with_lengths(), fq=st.integers(1, 4), fk=st.integers(1, 4))
def test_build_block_index_full_and_partial(data, fq: int, fk: int) -> None:
    mask, bs, nq, nk = data
    gq, gk = fq * bs, fk * bs
    index = build_block_index(mask, bs, nq, nk, q_granularity=gq, kv_granularity=gk)
    ck = math.ceil(mask.shape[-1] / fk)
    partial = indices_to_block_mask(index.kv_num_blocks, index.kv_indices, ck)
    full = indices_to_block_mask(index.full_kv_num_blocks, index.full_kv_indices, ck)
    any_, full_expected = _brute_force_coarse(mask, bs, nk, gq, gk)
    assert partial.shape == any_.shape
    assert not bool((partial & full).any()), "a block is both partial and full"
    assert torch.equal(partial | full, any_), "partial ∪ full != coarse blocks with an allowed fine block"
    assert torch.equal(full, full_expected)
    # full blocks: every token pair in range is allowed, and no key is out of range
    token = expand_block_mask(mask, bs, nq, nk)  # (B, H, Nq, Nk)
    for pos in full.nonzero().tolist():
        *bh, r, c = pos
        assert (c + 1) * gk <= nk
        assert bool(token[(*bh, slice(r * gq, (r + 1) * gq), slice(c * gk, (c + 1) * gk))].all())
    # the index is sorted (it feeds the kernel's loops) and counts match
    lists = ((index.kv_num_blocks, index.kv_indices), (index.full_kv_num_blocks, index.full_kv_indices))
    for num, idx in lists:
        width = idx.shape[-1]
        valid = torch.arange(width) < num.unsqueeze(-1).long()
        nxt_ok = (idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]
        assert bool(nxt_ok.all())
    assert index.fine_mask is mask


@settings(max_examples=60, deadline=None)
@given(data=masks_with_lengths())
def test_token_density_matches_brute_force(data) -> None:
    mask, bs, nq, nk = data
    expected = expand_block_mask(mask, bs, nq, nk).double().mean()
    torch.testing.assert_close(token_density(mask, bs, nq, nk), expected, rtol=1e-12, atol=1e-12)
    index = build_block_index(mask, bs, nq, nk)
    assert index.density() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)


def test_broadcast_mask_gives_broadcast_index() -> None:
    mask = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    index = build_block_index(mask, 32, 150, 200, q_granularity=128, kv_granularity=64)
    assert index.kv_num_blocks.shape[:2] == (1, 1) and index.full_kv_indices.shape[:2] == (1, 1)


@pytest.mark.gpu
def test_build_block_index_has_no_host_sync() -> None:
    mask = torch.rand(2, 4, 40, 37, device="cuda") < 0.3
    # warm up kernels and caches first
    build_block_index(mask, 32, 1270, 1170, q_granularity=128, kv_granularity=64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        build_block_index(mask, 32, 1270, 1170, q_granularity=128, kv_granularity=64)
        build_block_index(mask, 16, 630, 580)
    finally:
        torch.cuda.set_sync_debug_mode("default")
