"""PARO axis reordering: the six axis orders as permutations (exact inverse, brute-force order), the
reorder_window pattern against a token-level definition, and the per-head permutation reaching the kernel."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.kernels import reference_attention
from dit_sparse.kernels.permutation import check_permutation, permute_tokens, unpermute_tokens
from dit_sparse.patterns import MaskLayout, build_layer_mask, build_layer_perm
from dit_sparse.patterns.reorder import AXIS_ORDERS, axis_permutation

TEXT = [(0, False), (5, True), (7, False)]


@settings(max_examples=25, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)),
    order=st.sampled_from(AXIS_ORDERS),
    text=st.sampled_from(TEXT),
)
def test_axis_permutation_matches_brute_force_order(grid, order, text) -> None:
    layout = MaskLayout(grid, num_text=text[0], text_first=text[1], block_size=16)
    perm = axis_permutation(layout, order)
    check_permutation(perm.view(1, 1, -1))
    coords = layout.token_coords()  # (N, 3) f, h, w; text -1
    is_text = coords[:, 0] < 0
    assert torch.equal(perm[is_text], torch.arange(layout.seq_len)[is_text])  # text stays in place
    # brute force: video tokens sorted by the order's axes, first letter slowest
    axis = {"F": 0, "H": 1, "W": 2}
    video = [i for i in range(layout.seq_len) if not is_text[i]]
    expected = sorted(video, key=lambda i: tuple(int(coords[i, axis[a]]) for a in order))
    assert perm[~is_text].tolist() == expected


def test_axis_permutation_exact_inverse() -> None:
    layout = MaskLayout((3, 4, 5), num_text=6, text_first=True, block_size=16)
    x = torch.randn(1, 6, layout.seq_len, 8)
    perms = torch.stack([axis_permutation(layout, o) for o in AXIS_ORDERS]).unsqueeze(0)  # (1, 6, N)
    assert torch.equal(unpermute_tokens(permute_tokens(x, perms), perms), x)
    assert torch.equal(perms[0, 0], torch.arange(layout.seq_len))  # FHW is the raster order


@pytest.mark.parametrize("impl", ["gather", "triton"])
@pytest.mark.parametrize(
    ("grid", "text"), [((3, 5, 7), (0, False)), ((2, 6, 5), (9, True)), ((4, 5, 3), (4, False))]
)
def test_reorder_window_attention_equals_token_definition(impl, grid, text) -> None:
    """Kernel with the layer's perm + permuted mask == fp64 attention with the token-level definition:
    original tokens i, j meet iff either is text or their permuted positions are <= `blocks` blocks apart."""
    bs, blocks = 16, 1
    layout = MaskLayout(grid, num_text=text[0], text_first=text[1], block_size=bs)
    heads = [("reorder_window", {"order": o, "blocks": blocks}) for o in ("HWF", "WFH")] + [("dense", {})]
    mask = build_layer_mask(heads, layout, "cpu")  # (1, 3, nB, nB) permuted order
    perm = build_layer_perm(heads, layout, "cpu")  # (1, 3, N)
    assert perm is not None and torch.equal(perm[0, 2], torch.arange(layout.seq_len))
    n = layout.seq_len
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 3, n, 32, generator=g) for _ in range(3))
    import dit_sparse

    out = dit_sparse.sparse_attention(q, k, v, mask, bs, impl=impl, perm=perm)

    is_text = layout.token_coords()[:, 0] < 0  # (N,)
    token = torch.ones(1, 3, n, n, dtype=torch.bool)
    for h, o in enumerate(("HWF", "WFH")):
        pos = torch.empty(n, dtype=torch.long)
        pos[axis_permutation(layout, o)] = torch.arange(n)  # permuted position of each original token
        blk = pos // bs
        near = (blk[:, None] - blk[None, :]).abs() <= blocks
        text_block = torch.zeros(n, dtype=torch.bool)  # tokens sharing a block with text are dense too
        text_blocks = set((pos[is_text] // bs).tolist())
        text_block[[i for i in range(n) if int(blk[i]) in text_blocks]] = True
        token[0, h] = near | text_block[:, None] | text_block[None, :]
    assert not token[0, 0].all()  # really sparse
    ref = reference_attention(q, k, v, None, token_mask=token)
    assert (out.double() - ref).abs().max().item() < 1e-5


def test_reorder_pattern_is_validated() -> None:
    from dit_sparse.patterns import validate_pattern

    with pytest.raises(ValueError, match="order must be one of"):
        validate_pattern("reorder_window", {"order": "FFW"})
    with pytest.raises(ValueError, match="blocks must be an integer"):
        validate_pattern("reorder_window", {"blocks": -1})
    assert len(set(itertools.permutations("FHW"))) == len(AXIS_ORDERS)


def test_wan_layer_passes_per_head_perm_to_kernel(monkeypatch) -> None:
    """Through the tiny Wan pipeline: head 0 reorders (HWF), head 1 keeps raster order; the kernel gets
    perm [1, 2, N] with the identity for head 1 and the output equals the fp64 reference with that perm."""
    from tiny_wan import run, tiny_wan_pipeline

    import dit_sparse
    import dit_sparse.kernels as kernels
    from dit_sparse import Profile
    from dit_sparse.profile import HeadSpec

    pipe = tiny_wan_pipeline()
    prof = Profile.dense(pipe.transformer)
    prof.block_size = 16
    prof.layers = [
        [HeadSpec("reorder_window", {"order": "HWF", "blocks": 1}), HeadSpec("full")] for _ in range(2)
    ]
    prof.validate()
    real = kernels.sparse_attention
    seen = []

    def spy(q, k, v, mask, block_size, scale=None, *, impl="auto", perm=None, check_perm=False):
        out = real(q, k, v, mask, block_size, scale, impl=impl, perm=perm)
        ref = real(q, k, v, mask, block_size, scale, impl="reference", perm=perm)
        seen.append((perm, (out.double() - ref.double()).abs().max().item()))
        return out

    monkeypatch.setattr(kernels, "sparse_attention", spy)
    with dit_sparse.apply(pipe, prof) as handle:
        run(pipe, steps=1, height=48, width=64, frames=9)  # grid (3, 3, 4)
        rep = handle.report()
    assert seen and rep.sparse_density() < 1.0
    layout = MaskLayout((3, 3, 4), block_size=16)
    for perm, err in seen:
        assert perm.shape == (1, 2, 36)
        assert torch.equal(perm[0, 0], axis_permutation(layout, "HWF"))
        assert torch.equal(perm[0, 1], torch.arange(36))
        assert err < 1e-4
