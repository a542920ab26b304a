"""The profiler: statistics vs brute force, the search on planted heads, the tiny model end to end, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dit_sparse import Profile, apply
from dit_sparse.kernels import reference_attention
from dit_sparse.patterns import (
    PATTERNS,
    MaskLayout,
    build_layer_mask,
    build_pattern_perm,
    force_text_dense,
    is_dynamic,
    validate_pattern,
)
from dit_sparse.profiler import (
    CostModel,
    ProfileConfig,
    ProfilerError,
    call_stats,
    candidate_blocks,
    candidate_dynamic,
    candidate_grid,
    candidate_masks,
    candidate_perms,
    choose_heads,
    profile_pipeline,
    read_prompts,
    search,
)
from dit_sparse.profiler.run import default_encoder
from dit_sparse.profiler.search import is_step_cached
from dit_sparse.profiler.stats import block_rows, sample_query_blocks

CHEAP_SPARSE = CostModel(overhead_s=0.0, per_block_s=1e-6, dense_s=1.0)  # deterministic: sparse always pays


# ------------------------------------------------------------------------------------------------ statistics
def _oracle_errors(q, k, v, masks, bs, rows):
    """fp64 brute force: per candidate and head, ||O_c - O|| / ||O|| over ``rows``."""
    n = q.shape[2]
    dense = reference_attention(q, k, v, None, bs)[:, :, rows]  # (B, H, R, D) fp64
    out = []
    for m in masks:
        o = reference_attention(q, k, v, m[None, None], bs)[:, :, rows]
        out.append(((o - dense) ** 2).sum(dim=(0, 2, 3)).sqrt() / (dense**2).sum(dim=(0, 2, 3)).sqrt())
    del n
    return torch.stack(out)  # (C, H)


@pytest.mark.parametrize("max_blocks", [100, 3])
def test_call_stats_matches_brute_force(max_blocks):
    torch.manual_seed(0)
    bs, n = 16, 75  # partial last block
    nb = -(-n // bs)
    q, k, v = (torch.randn(2, 3, n, 32) for _ in range(3))
    masks = torch.rand(4, nb, nb) > 0.5
    masks[:, torch.arange(nb), torch.arange(nb)] = True
    masks[0] = True
    st = call_stats(q, k, v, masks, bs, max_query_blocks=max_blocks, chunk_elems=500)  # many chunks
    sel = sample_query_blocks(nb, max_blocks)
    rows = block_rows(sel, bs, n)
    expect = _oracle_errors(q.double(), k.double(), v.double(), masks, bs, rows)
    got = (st.err_sq / st.ref_sq).sqrt()
    torch.testing.assert_close(got, expect, atol=2e-5, rtol=1e-4)
    # pooled mass: mean softmax row of each sampled block, summed per key block (brute force)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(32), dim=-1)  # (B, H, N, N)
    pooled = torch.zeros(2, 3, n, nb, dtype=torch.float64).index_add_(3, torch.arange(n) // bs, p)
    per_block = torch.stack(
        [pooled[:, :, block_rows(sel[i : i + 1], bs, n)].mean(2) for i in range(len(sel))], 2
    )
    torch.testing.assert_close(st.mass, per_block.mean(0), atol=1e-5, rtol=1e-5)
    assert torch.allclose(st.mass.sum(-1), torch.ones_like(st.mass.sum(-1)), atol=1e-5)


def _fourier(coord: torch.Tensor, dim: int, omega: float) -> torch.Tensor:
    """Features whose dot product is sum_j cos(omega_j (x - y)): peaked at x == y."""
    freqs = omega * torch.linspace(0.5, 1.0, dim // 2)
    ang = coord[:, None].double() * freqs[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1)


def _planted_qkv(layout: MaskLayout, dim: int = 48, sharp: float = 6.0):
    """Head 0 local (attention peaks at the query's own (f, h, w) and decays within ~1 latent unit), head 1 global
    (q = 0: uniform attention)."""
    coords = layout.token_coords()  # (N, 3)
    feats = torch.cat([_fourier(coords[:, a], dim // 3, 0.4) for a in range(3)], dim=1)  # (N, dim)
    local = (sharp * feats).float()
    torch.manual_seed(1)
    v = torch.randn(1, 2, layout.seq_len, dim)
    q = torch.stack([local, torch.zeros_like(local)])[None]  # (1, 2, N, dim)
    k = torch.stack([local, torch.randn_like(local)])[None]
    return q, k, v


def test_search_assigns_local_pattern_to_planted_local_head_and_keeps_global_head_dense():
    layout = MaskLayout((6, 12, 10), block_size=32)  # 720 tokens, 23 blocks, 3.75 blocks per frame
    q, k, v = _planted_qkv(layout)
    cands, masks = candidate_masks(candidate_grid(layout), layout)
    st = call_stats(q, k, v, masks, layout.block_size, max_query_blocks=64)
    err = (st.err_sq / st.ref_sq).sqrt()  # (C, H)
    blocks = masks.flatten(1).sum(1).double()
    dense_index = [n for n, _ in cands].index("dense")
    choice = choose_heads(err[None], blocks, 0.05, dense_index)
    local_name, local_params = cands[int(choice[0])]
    assert local_name in ("window", "tile_window", "radial"), cands[int(choice[0])]
    assert float(blocks[choice[0]]) / layout.num_blocks**2 < 0.6
    assert cands[int(choice[1])][0] == "dense"
    # the chosen pattern's error, measured independently in fp64, fits the budget
    m = build_layer_mask([(local_name, local_params)], layout, "cpu")[0, 0]
    oracle = _oracle_errors(
        q.double(), k.double(), v.double(), m[None], layout.block_size, torch.arange(layout.seq_len)
    )
    assert float(oracle[0, 0]) <= 0.05


def test_call_stats_of_reordering_candidates_match_brute_force_in_permuted_order():
    torch.manual_seed(3)
    bs, n = 16, 70  # partial last block
    nb = -(-n // bs)
    q, k, v = (torch.randn(1, 2, n, 24) for _ in range(3))
    masks = torch.rand(4, nb, nb) > 0.6
    masks[:, torch.arange(nb), torch.arange(nb)] = True
    p1, p2 = torch.randperm(n), torch.randperm(n)
    perms = [None, p1, p2, p1]
    for max_blocks in (100, 2):
        st = call_stats(q, k, v, masks, bs, max_query_blocks=max_blocks, chunk_elems=300, perms=perms)
        rows = block_rows(sample_query_blocks(nb, max_blocks), bs, n)  # rows of the (permuted) sequence
        got = (st.err_sq / st.ref_sq).sqrt()  # (C, H)
        for c, perm in enumerate(perms):
            idx = torch.arange(n) if perm is None else perm
            qq, kk, vv = (x.double()[:, :, idx] for x in (q, k, v))
            expect = _oracle_errors(qq, kk, vv, masks[c : c + 1], bs, rows)[0]
            torch.testing.assert_close(got[c], expect, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="permutations"):
        call_stats(q, k, v, masks, bs, perms=[None])


def test_search_reorders_a_planted_temporal_head():
    """A head that attends the same (h, w) in every frame is a strided pattern in raster order and a band in the
    H-W-F order: the search gives it a reordering whose error, measured independently in fp64, fits the budget."""
    layout = MaskLayout((8, 6, 6), block_size=16)  # 288 tokens, 18 blocks; a frame is 2.25 blocks
    coords = layout.token_coords()
    feats = torch.cat([_fourier(coords[:, a], 24, 0.5) for a in (1, 2)], dim=1)  # (h, w) only
    q = k = (8.0 * feats).float()[None, None]  # (1, 1, N, 48)
    v = torch.randn(1, 1, layout.seq_len, 48, generator=torch.Generator().manual_seed(0))
    cands, masks = candidate_masks(candidate_grid(layout), layout)
    perms = candidate_perms(cands, layout)
    names = [c[0] for c in cands]
    assert names.count("reorder_window") >= 5, (
        "the six axis orders (raster order dropped when it repeats a mask)"
    )
    st = call_stats(q, k, v, masks, layout.block_size, max_query_blocks=64, perms=perms)
    err = (st.err_sq / st.ref_sq).sqrt()  # (C, 1)
    blocks = masks.flatten(1).sum(1).double()
    reorders = torch.tensor([p is not None for p in perms])
    r = search(err[None, None], [0], 4, blocks, names.index("dense"), CHEAP_SPARSE, 0.05, reorders)
    name, params = cands[r.choice[0][0]]
    assert name == "reorder_window" and params["order"] in ("HWF", "WHF"), (name, params)
    raster_fits = [c for c in range(len(cands)) if not reorders[c] and float(err[c, 0]) <= 0.05]
    assert float(blocks[r.choice[0][0]]) < min(float(blocks[c]) for c in raster_fits)
    perm = perms[r.choice[0][0]]
    qq, kk, vv = (x.double()[:, :, perm] for x in (q, k, v))
    oracle = _oracle_errors(
        qq, kk, vv, masks[r.choice[0][0]][None], layout.block_size, torch.arange(layout.seq_len)
    )
    assert float(oracle[0, 0]) <= 0.05
    # the permutation's cost counts: when it is dearer than the blocks it saves, the layer stays in raster order
    dear = CostModel(0.0, 1e-6, 1.0, permute_s=1e-6 * float(blocks.max()))
    r2 = search(err[None, None], [0], 4, blocks, names.index("dense"), dear, 0.05, reorders)
    assert not bool(reorders[r2.choice[0][0]])
    assert r2.predicted_seconds == pytest.approx(4 * 1e-6 * min(float(blocks[c]) for c in raster_fits))


def test_call_stats_of_draft_candidates_match_brute_force_with_the_step_mask():
    """A dynamic candidate's error is that of the mask its builder makes from this call's q/k (in its own token
    order), against fp64 dense attention; partial last block, batch of two, sampled and all query blocks."""
    from dit_sparse.patterns.dynamic import draft_mask

    torch.manual_seed(5)
    layout = MaskLayout((3, 5, 7), block_size=16)  # 105 tokens: 7 blocks, the last partial
    n, nb = layout.seq_len, 7
    q, k, v = (torch.randn(2, 3, n, 24) for _ in range(3))
    cands = [
        ("dense", {}),
        ("draft", {"budget": 0.3, "refresh": 1}),
        ("draft", {"budget": 0.3, "patch": [5, 3]}),
    ]
    kept, masks = candidate_masks(cands, layout)
    perms, dyn = candidate_perms(kept, layout), candidate_dynamic(kept)
    assert dyn[0] is None and dyn[1] == kept[1] and perms[2] is not None  # a 5×3 patch order is not raster
    for max_blocks in (100, 2):
        st = call_stats(q, k, v, masks, 16, max_blocks, perms=perms, dynamic=dyn, layout=layout)
        rows = block_rows(sample_query_blocks(nb, max_blocks), 16, n)
        got = (st.err_sq / st.ref_sq).sqrt()  # (C, H)
        for c in (1, 2):
            params = dict(kept[c][1])
            perm = perms[c]
            m = draft_mask(
                layout, q, k, perm, params["budget"], None
            )  # (B, H, nB, nB) in the candidate's order
            idx = torch.arange(n) if perm is None else perm
            qq, kk, vv = (x.double()[:, :, idx] for x in (q, k, v))
            dense = reference_attention(qq, kk, vv, None, 16)[:, :, rows]
            o = reference_attention(qq, kk, vv, m, 16)[:, :, rows]
            expect = ((o - dense) ** 2).sum(dim=(0, 2, 3)).sqrt() / (dense**2).sum(dim=(0, 2, 3)).sqrt()
            torch.testing.assert_close(got[c], expect, atol=2e-5, rtol=1e-4)
            assert bool((got[c] > 0).all())  # 30 % of the blocks: really sparse
    with pytest.raises(ValueError, match="layout"):
        call_stats(q, k, v, masks, 16, perms=perms, dynamic=dyn)


def test_search_gives_draft_guidance_to_a_planted_scattered_head():
    """Head 0: each query block attends one key block chosen at random (no window, band, diagonal or stripe
    covers that), head 1 attends uniformly: head 0 gets draft guidance, head 1 stays dense."""
    layout = MaskLayout((4, 8, 8), block_size=16)  # 256 tokens, 16 blocks
    n, nb = layout.seq_len, 16
    cands, masks = candidate_masks(candidate_grid(layout), layout)
    perms, dyn = candidate_perms(cands, layout), candidate_dynamic(cands)
    c_draft = cands.index(("draft", {"budget": 0.1, "refresh": 1}))
    order = perms[c_draft] if perms[c_draft] is not None else torch.arange(n)
    block_of = torch.empty(n, dtype=torch.long)
    block_of[order] = torch.arange(n) // 16  # each token's block in the draft candidate's token order
    target = torch.randperm(nb, generator=torch.Generator().manual_seed(0))
    eye = 8.0 * torch.eye(32)[:nb]  # (nB, 32) one feature per block
    q = torch.stack([eye[target[block_of]], torch.zeros(n, 32)])[None]  # (1, 2, N, 32)
    k = torch.stack([eye[block_of], torch.randn(n, 32)])[None]
    v = torch.randn(1, 2, n, 32, generator=torch.Generator().manual_seed(1))
    st = call_stats(q, k, v, masks, 16, 64, perms=perms, dynamic=dyn, layout=layout)
    err = (st.err_sq / st.ref_sq).sqrt()  # (C, 2)
    blocks = candidate_blocks(cands, masks)
    reorders = torch.tensor([p is not None for p in perms])
    cached = torch.tensor([d is not None and is_step_cached(d) for d in dyn])
    dynamic = torch.tensor([d is not None for d in dyn]) & ~cached
    names = [c[0] for c in cands]
    every = err[None, None].expand(1, 4, -1, -1)  # the same statistics at every step of 4
    flags = (reorders, dynamic, cached)
    r = search(every, [0, 1, 2, 3], 4, blocks, names.index("dense"), CHEAP_SPARSE, 0.05, *flags)
    head0, head1 = (cands[c] for c in r.choice[0])
    assert head0[0] == "draft" and head1 == ("dense", {}), (head0, head1)
    static_fits = [c for c in range(len(cands)) if dyn[c] is None and float(err[c, 0]) <= 0.05]
    assert [cands[c][0] for c in static_fits] == ["dense"]  # nothing static but dense catches head 0
    # independently: head 0 with its draft mask, fp64 over every row, in the candidate's token order
    from dit_sparse.patterns.dynamic import draft_mask

    chosen = r.choice[0][0]
    perm = perms[chosen]
    m = draft_mask(layout, q, k, perm, cands[chosen][1]["budget"], None)[:, :1]
    idx = torch.arange(n) if perm is None else perm
    qq, kk, vv = (x.double()[:, :1, idx] for x in (q, k, v))
    dense = reference_attention(qq, kk, vv, None, 16)
    oracle = float((reference_attention(qq, kk, vv, m, 16) - dense).norm() / dense.norm())
    assert oracle <= 0.05
    assert float(m.float().mean()) < 0.25  # and it is sparse
    # the mask building counts: when it costs more than the blocks it saves, head 0 stays dense
    dear = CostModel(0.0, 1e-6, 1.0, draft_s=1.0)
    r2 = search(every, [0, 1, 2, 3], 4, blocks, names.index("dense"), dear, 0.05, *flags)
    assert cands[r2.choice[0][0]][0] == "lse_topk"  # the step-cached exact top blocks catch it too, ...
    assert r2.predicted_seconds == pytest.approx(4 * 1e-6 * float(blocks[r2.choice[0]].sum()))
    dearer = CostModel(0.0, 1e-6, 1.0, draft_s=1.0, lse_s=2.0)  # ... unless their exact block mass costs more
    r3 = search(every, [0, 1, 2, 3], 4, blocks, names.index("dense"), dearer, 0.05, *flags)
    assert [cands[c][0] for c in r3.choice[0]] == ["dense", "dense"] and r3.dense_layers == [0]
    assert CostModel(0.0, 1e-6, 1.0, lse_s=0.4).sparse_call(100, cached=True) == pytest.approx(1e-4 + 0.2)


def test_step_cached_candidates_are_measured_with_the_mask_of_the_step_before():
    """lse_topk(refresh=2) at sampled step 1 runs the mask step 0 built: the collector builds it at step 0 (not a
    sampled step) and measures it on step 1's q/k/v. Oracle: fp64 block mass of step 0, top 2 blocks per row plus
    the diagonal, fp64 attention error on step 1."""
    from types import SimpleNamespace

    from dit_sparse.profiler.run import Collector

    layout = MaskLayout((3, 5, 6), block_size=16)  # 90 tokens, 6 blocks (the last partial)
    n, nb, bs = layout.seq_len, 6, 16
    g = torch.Generator().manual_seed(4)
    q0, k0, v1 = (torch.randn(1, 2, n, 24, generator=g) for _ in range(3))
    q1, k1 = q0 + 0.7 * torch.randn(q0.shape, generator=g), k0 + 0.7 * torch.randn(k0.shape, generator=g)
    collector = Collector(_cfg(sample_steps=[1]), {"cost": CHEAP_SPARSE.to_dict()})
    inputs = SimpleNamespace(grid=layout.grid, num_text=0, text_first=False)
    capture = collector.bind(SimpleNamespace(state=SimpleNamespace(inputs=inputs)))
    capture(0, 0, q0, k0, torch.randn(1, 2, n, 24), "bhsd")
    capture(0, 1, q1, k1, v1, "bhsd")
    errors = collector.errors()
    assert list(errors) == ["0,1"]  # step 0 only built masks
    specs = collector.state["candidate_specs"]
    c = next(i for i, (name, p) in enumerate(specs) if name == "lse_topk" and p["budget"] == 0.2)
    got = torch.tensor(errors["0,1"][c])

    def top2_mask(q, k):
        p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(24), dim=-1)  # (1, 2, N, N)
        pad = nb * bs - n
        per_key = torch.nn.functional.pad(p, (0, pad)).view(1, 2, n, nb, bs).sum(-1)  # (1, 2, N, nB)
        rows = torch.nn.functional.pad(per_key, (0, 0, 0, pad)).view(1, 2, nb, bs, nb).sum(3)
        mass = rows / torch.tensor([bs] * (nb - 1) + [n - (nb - 1) * bs]).view(1, 1, nb, 1)
        keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, mass.topk(2, dim=-1).indices, True)
        return keep | torch.eye(nb, dtype=torch.bool)

    def rel(mask):
        qq, kk, vv = (x.double() for x in (q1, k1, v1))
        dense = reference_attention(qq, kk, vv, None, bs)
        diff = reference_attention(qq, kk, vv, mask, bs) - dense
        return (diff**2).sum(dim=(0, 2, 3)).sqrt() / (dense**2).sum(dim=(0, 2, 3)).sqrt()

    torch.testing.assert_close(got.double(), rel(top2_mask(q0, k0)), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got.double(), rel(top2_mask(q1, k1)), atol=1e-3)  # not the fresh mask's error


def test_choose_heads_and_search_rules():
    # candidates: 0 dense (100 blocks), 1 cheap (10), 2 medium (40)
    blocks = torch.tensor([100.0, 10.0, 40.0])
    err = torch.tensor([[[0.0, 0.0], [0.2, 0.01], [0.04, 0.3]]])  # (S=1, C, H)
    assert choose_heads(err, blocks, 0.05, 0).tolist() == [2, 1]
    assert choose_heads(err, blocks, 0.0, 0).tolist() == [0, 0]  # nothing fits: dense
    # warm-up: step 0 bad for the cheap candidate, later steps fine -> one dense step is cheaper overall
    errors = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.3, 0.3]])[None, None].repeat(
        1, 3, 1, 1
    )  # (L=1,S=3,C=3,H=2)
    errors = errors.clone()
    errors[0, 1:, 1] = 0.01
    cost = CostModel(0.0, 0.001, 1.0)
    r = search(errors, [0, 1, 2], 10, blocks, 0, cost, 0.05)
    assert r.dense_steps == 1 and r.choice == [[1, 1]] and r.dense_layers == []
    assert r.predicted_seconds == pytest.approx(1 * 1.0 + 9 * (0.001 * 20))
    # a per-call overhead larger than dense SDPA makes the layer dense
    r = search(errors, [0, 1, 2], 10, blocks, 0, CostModel(2.0, 0.001, 1.0), 0.05)
    assert r.dense_layers == [0] and r.choice == [[0, 0]]
    with pytest.raises(ValueError, match="budget"):
        search(errors, [0, 1, 2], 10, blocks, 0, cost, -0.1)


# ------------------------------------------------------------------------------------------------ tiny model
SIZE = dict(height=48, width=48, frames=9, steps=3, guidance=1.0)  # latent 3×6×6 = 108 tokens, no CFG


def _cfg(**kw):
    base = dict(prompts=["a red fox in the snow"], holdout=None, sample_steps=[0, 1, 2], budget=0.3, **SIZE)
    base.update(kw)
    return ProfileConfig(**base)


@pytest.fixture(scope="module")
def tiny_pipe():
    from dit_sparse.pipelines.tiny import load_tiny_pipeline

    return load_tiny_pipeline()


def _run(pipe, cfg, out, encode, **kw):
    """``profile_pipeline`` on the tiny model with the deterministic cost model, quietly."""
    kw = {"model_id": "tiny", "cost": CHEAP_SPARSE, "command": "x", "progress": False, **kw}
    return profile_pipeline(pipe, cfg, out, encode=encode, **kw)


def _strip_volatile(d):
    d = json.loads(json.dumps(d))
    d["calibration"].pop("date")
    return d


def test_tiny_profile_is_deterministic_and_meets_its_budget(tiny_pipe, tmp_path):
    enc = default_encoder("tiny", tiny_pipe)
    a = _run(tiny_pipe, _cfg(), tmp_path / "a.json", encode=enc)
    b = _run(tiny_pipe, _cfg(), tmp_path / "b.json", encode=enc)
    assert _strip_volatile(a.to_dict()) == _strip_volatile(b.to_dict())
    assert not (tmp_path / "a.json.ckpt.json").exists()  # removed on success
    prof = Profile.load(tmp_path / "a.json")
    sparse_heads = [
        (li, h) for li, heads in enumerate(prof.layers) for h, s in enumerate(heads) if s.pattern != "dense"
    ]
    assert sparse_heads, "at budget 0.3 the tiny model still has heads that fit a sparse pattern"

    # re-measure every head's error on a fresh dense run, independently (fp64 reference with the profile's masks)
    captured = {}
    handle = apply(tiny_pipe, Profile.dense(tiny_pipe.transformer))
    binding = handle.bindings[0]

    def grab(layer, step, q, k, v, layout):
        if step >= prof.schedule.dense_steps:
            t = lambda x: (x.transpose(1, 2) if layout == "bshd" else x).double()  # noqa: E731
            captured.setdefault((layer, step), []).append((t(q), t(k), t(v), binding.state.inputs))

    binding.capture = grab
    try:
        tiny_pipe(**enc("a red fox in the snow"), **_kwargs())
    finally:
        handle.remove()
    for (layer, step), calls in captured.items():
        if layer in prof.schedule.dense_layers:
            continue
        specs = prof.layers[layer]
        num = torch.zeros(len(specs), dtype=torch.float64)
        den = torch.zeros_like(num)
        for call, (q, k, v, inputs) in enumerate(calls):  # CogVideoX: joint attention, text first
            layout = MaskLayout(inputs.grid, inputs.num_text, inputs.text_first, prof.block_size)
            for h, spec in enumerate(specs):  # each head in its own token order, with its own (step) mask
                perm = build_pattern_perm(spec.pattern, spec.params, layout, "cpu")
                idx = torch.arange(layout.seq_len) if perm is None else perm
                qh, kh, vh = (x[:, h : h + 1, idx] for x in (q, k, v))
                if is_dynamic(spec.pattern):  # built at the last refresh step (sparse steps w, w + r, ...)
                    builder = PATTERNS[spec.pattern].dynamic
                    params = validate_pattern(spec.pattern, spec.params)
                    r, w = max(1, params["refresh"] or 1), prof.schedule.dense_steps
                    qr, kr, _, _ = captured[(layer, w + (step - w) // r * r)][call]
                    mask = builder(layout, qr[:, h : h + 1].float(), kr[:, h : h + 1].float(), perm, **params)
                    mask = force_text_dense(mask, layout)  # as the integration runs it
                else:
                    mask = build_layer_mask([(spec.pattern, spec.params)], layout, "cpu")
                o = reference_attention(qh, kh, vh, mask, prof.block_size)
                d = reference_attention(qh, kh, vh, None, prof.block_size)
                num[h] += ((o - d) ** 2).sum()
                den[h] += (d**2).sum()
        err = (num / den).sqrt()
        for h, s in enumerate(specs):
            assert float(err[h]) <= s.rel_error + 1e-4 and float(err[h]) <= 0.3 + 1e-4, (layer, step, h, s)

    # applies: the sparse run computes less than dense
    handle = apply(tiny_pipe, prof)
    try:
        tiny_pipe(**enc("a red fox in the snow"), **_kwargs())
        assert handle.report().mean_density() < 1.0
    finally:
        handle.remove()


def _kwargs():
    return dict(
        height=SIZE["height"],
        width=SIZE["width"],
        num_frames=SIZE["frames"],
        num_inference_steps=SIZE["steps"],
        guidance_scale=SIZE["guidance"],
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )


def test_resume_continues_from_checkpoint(tiny_pipe, tmp_path):
    enc = default_encoder("tiny", tiny_pipe)
    cfg = lambda: _cfg(prompts=["a red fox", "a blue boat"])  # noqa: E731
    calls: list[str] = []

    def failing(prompt):
        calls.append(prompt)
        if prompt == "a blue boat":
            raise RuntimeError("simulated crash")
        return enc(prompt)

    out = tmp_path / "p.json"
    with pytest.raises(RuntimeError, match="simulated"):
        _run(tiny_pipe, cfg(), out, encode=failing)
    ckpt = tmp_path / "p.json.ckpt.json"
    assert ckpt.is_file() and not out.exists()
    assert list(json.loads(ckpt.read_text())["samples"]) == ["0"]
    ckpt_text = ckpt.read_text()
    calls.clear()

    def counting(prompt):
        calls.append(prompt)
        return enc(prompt)

    resumed = _run(tiny_pipe, cfg(), out, encode=counting, resume=True)
    assert calls == ["a blue boat"]  # the first sample came from the checkpoint
    fresh = _run(tiny_pipe, cfg(), tmp_path / "q.json", encode=enc)
    assert _strip_volatile(resumed.to_dict()) == _strip_volatile(fresh.to_dict())
    # a checkpoint made with other settings is refused
    (tmp_path / "r.json.ckpt.json").write_text(ckpt_text)
    with pytest.raises(ProfilerError, match="other calibration settings"):
        _run(tiny_pipe, _cfg(steps=4, sample_steps=[0]), tmp_path / "r.json", encode=enc, resume=True)


THREE = ["a red fox", "a blue boat", "a green tree"]


def _profile_on_rank(rank: int, world: int, pipe, out: Path) -> None:
    enc = default_encoder("tiny", pipe)
    seen: list[str] = []

    def counting(prompt):
        seen.append(prompt)
        return enc(prompt)

    _run(pipe, _cfg(prompts=THREE), out, encode=counting, resume=True)
    (out.parent / f"seen{rank}.json").write_text(json.dumps(seen))


def test_two_processes_split_the_samples_and_write_the_one_process_profile(tiny_pipe, tmp_path):
    """Two gloo ranks resume a one-process checkpoint (sample 0 done): rank 0 calibrates sample 2, rank 1 sample
    1, the statistics are merged, and rank 0 writes the same profile one process writes from scratch."""
    from ranks import run_ranks, worker_threads

    # the one-process runs use the workers' thread count, or a rel_error rounded to 1e-6 can land one unit off
    enc = default_encoder("tiny", tiny_pipe)
    out = tmp_path / "p.json"

    def crash_after_first(prompt):
        if prompt != THREE[0]:
            raise RuntimeError("simulated crash")
        return enc(prompt)

    with pytest.raises(RuntimeError, match="simulated"), worker_threads():
        _run(tiny_pipe, _cfg(prompts=THREE), out, encode=crash_after_first)
    assert list(json.loads((tmp_path / "p.json.ckpt.json").read_text())["samples"]) == ["0"]

    run_ranks(_profile_on_rank, 2, tiny_pipe, out)
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    assert seen == [[THREE[2]], [THREE[1]]]
    assert not list(tmp_path.glob("p.json.ckpt*"))  # every rank's checkpoint and the old one are gone
    two = Profile.load(out).to_dict()
    assert two["calibration"].pop("processes") == 2
    with worker_threads():
        one = _run(tiny_pipe, _cfg(prompts=THREE), tmp_path / "one.json", encode=enc).to_dict()
    assert one["calibration"].pop("processes") == 1
    assert _strip_volatile(two) == _strip_volatile(one)


@pytest.fixture(scope="module")
def random_pipe():
    """The bundled pipeline with a seeded random-weight transformer of the same config. Its heads are near-uniform,
    so every budget of the ladder gives another profile and another PSNR, whatever the shipped weights learned (the
    text-sink model of 2026-12-04 gave every budget the same all-skip profile at the test canvas)."""
    from dit_sparse.pipelines.tiny import load_tiny_pipeline

    pipe = load_tiny_pipeline()
    torch.manual_seed(0)
    pipe.transformer = type(pipe.transformer).from_config(pipe.transformer.config).eval()
    return pipe


def test_target_psnr_picks_the_sparsest_budget_that_reaches_it(random_pipe, tmp_path):
    """Oracle: every budget of the ladder profiled and verified on its own; the target sits between two of them."""
    from dit_sparse.profiler.run import PSNR_BUDGETS

    enc = default_encoder("tiny", random_pipe)
    kw = dict(prompts=["a red fox", "a blue boat"], holdout="a green tree")

    def psnr(summary):
        return math.inf if summary["psnr_mean"] == "inf" else summary["psnr_mean"]

    ladder = {}
    for b in PSNR_BUDGETS:
        prof = _run(random_pipe, _cfg(budget=b, **kw), tmp_path / f"b{b}.json", encode=enc)
        ladder[b] = psnr(prof.summary)
    values = [ladder[b] for b in PSNR_BUDGETS]
    assert values == sorted(values), values  # sparser budgets lose PSNR on this model (bisection's premise)
    # a target between the two adjacent budgets with the widest finite gap
    gaps = [(values[i + 1] - values[i], i) for i in range(len(values) - 1) if math.isfinite(values[i + 1])]
    assert len({v for v in values if math.isfinite(v)}) > 2, values  # a ladder to bisect, not one step
    _, i = max(gaps)
    target = (values[i] + values[i + 1]) / 2
    want = next(b for b in PSNR_BUDGETS if ladder[b] >= target)
    assert want == PSNR_BUDGETS[i + 1]

    got = _run(random_pipe, _cfg(budget=None, target_psnr=target, **kw), tmp_path / "t.json", encode=enc)
    assert got.summary["budget"] == want and got.summary["target_psnr"] == target
    assert psnr(got.summary) == ladder[want] >= target
    same = Profile.load(tmp_path / f"b{want}.json")
    assert [[(h.pattern, h.params) for h in layer] for layer in got.layers] == [
        [(h.pattern, h.params) for h in layer] for layer in same.layers
    ]
    tried = {row["budget"]: row for row in got.summary["psnr_search"]}
    assert len(tried) < len(PSNR_BUDGETS)  # bisection, not a sweep
    for b, row in tried.items():
        assert row["reaches_target"] == (ladder[b] >= target), (b, row)


def test_unsupported_model_names_families(tmp_path):
    from dit_sparse.pipelines import UnsupportedModelError

    class Fake:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="WanTransformer3DModel"):
        profile_pipeline(
            Fake(), _cfg(), tmp_path / "x.json", model_id="fake", encode=lambda p: {}, progress=False
        )


# ------------------------------------------------------------------------------------------------ CLI
def _cli(*argv):
    from dit_sparse.cli import main

    return main(list(argv))


def _cli_small(out, *extra):
    """The cli_profile run's settings (same prompts file, size and steps) writing ``out``."""
    return _cli(
        "profile", "tiny", "-o", str(out), "--prompts", str(out.parent / "prompts.txt"), "--height", "48",
        "--width", "48", "--frames", "9", "--steps", "2", "--guidance", "1", "--budget", "0.2", "--quiet", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cli_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny.json"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("# calibration\na red fox in the snow\n\na blue boat on a lake\n")
    rc = _cli_small(out)  # the settings the --cost-model test repeats
    assert rc == 0
    return out


def test_cli_profile_writes_verified_profile(cli_profile, capsys):
    prof = Profile.load(cli_profile)
    cal, s = prof.calibration, prof.summary
    assert cal["prompts"] == ["a red fox in the snow"] and cal["holdout_prompt"] == "a blue boat on a lake"
    assert cal["latent_grid"] == [3, 6, 6] and cal["steps"] == 2 and cal["frames"] == 9
    assert "dit-sparse profile tiny" in cal["command"] and "--budget 0.2" in cal["command"]
    for key in (
        "predicted_mean_density",
        "measured_mean_density",
        "measured_speedup",
        "psnr_mean",
        "ssim_mean",
    ):
        assert key in s
    assert s["max_head_rel_error"] <= 0.2


def test_cli_cost_model_reuse_repeats_the_search_exactly(cli_profile, tmp_path, capsys):
    """--cost-model PROFILE: no kernel timing, the earlier cost model (so the same heads, schedule and predicted
    numbers, bit for bit); a cost model of another size or device, or a file without one, is refused up front."""
    first = Profile.load(cli_profile)
    (tmp_path / "prompts.txt").write_bytes((cli_profile.parent / "prompts.txt").read_bytes())
    again = tmp_path / "again.json"
    assert _cli_small(again, "--cost-model", str(cli_profile)) == 0
    second = Profile.load(again)
    assert second.layers == first.layers and second.schedule == first.schedule
    cm1, cm2 = first.calibration["cost_model"], second.calibration["cost_model"]
    assert {k: v for k, v in cm2.items() if k != "source"} == {k: v for k, v in cm1.items() if k != "source"}
    assert cm2["source"].startswith(f"reused from {cli_profile.name} (timed ")
    assert second.summary["predicted_mean_density"] == first.summary["predicted_mean_density"]
    capsys.readouterr()
    other = tmp_path / "other.json"
    assert _cli_small(other, "--cost-model", str(cli_profile), "--height", "64") == 2
    assert "timed at 48×48 px, 9 frames; this run is 64×48 px, 9 frames" in capsys.readouterr().err
    moved = json.loads(cli_profile.read_text())
    moved["calibration"]["device"] = "NVIDIA H100 80GB HBM3"
    gpu_made = tmp_path / "gpu.json"
    gpu_made.write_text(json.dumps(moved))
    assert _cli_small(other, "--cost-model", str(gpu_made)) == 2
    assert "timed on NVIDIA H100 80GB HBM3; this run is on cpu" in capsys.readouterr().err
    del moved["calibration"]["cost_model"]
    gpu_made.write_text(json.dumps(moved))
    assert _cli_small(other, "--cost-model", str(gpu_made)) == 2
    assert "records no cost model" in capsys.readouterr().err
    assert not other.exists()


def test_cli_refuses_overwrite_and_bad_input(cli_profile, tmp_path, capsys):
    before = cli_profile.read_bytes()
    # checked before the model loads: a missing model would fail later with another message
    assert _cli("profile", "no/such-model", "-o", str(cli_profile)) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli_profile.read_bytes() == before
    out = tmp_path / "p.json"
    assert _cli("profile", "tiny", "-o", str(out), "--budget", "-0.1") == 2
    assert "--budget" in capsys.readouterr().err
    assert _cli("profile", "tiny", "-o", str(out), "--target-psnr", "0") == 2
    assert "--target-psnr must be" in capsys.readouterr().err
    assert _cli("profile", "tiny", "-o", str(out), "--target-psnr", "30", "--no-verify") == 2
    assert "drop --no-verify" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one target at a time
        _cli("profile", "tiny", "-o", str(out), "--target-psnr", "30", "--budget", "0.1")
    assert "not allowed with" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    assert _cli("profile", "tiny", "-o", str(out), "--prompts", str(empty)) == 2
    assert "no prompts" in capsys.readouterr().err
    (tmp_path / "p.json.ckpt.json").write_text("{}")
    assert _cli("profile", "tiny", "-o", str(out)) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="offline"):
        _cli("profile", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "q.json"))
    with pytest.raises(ProfilerError, match="UTF-8"):
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"\xff\xfe\x00bad")
        read_prompts(bad)


def test_cli_inspect_prints_and_writes_pngs(cli_profile, tmp_path, capsys):
    from PIL import Image

    assert _cli("inspect", str(cli_profile), "--png-dir", str(tmp_path / "png")) == 0
    text = capsys.readouterr().out
    assert "pattern mix" in text and "layer" in text
    prof = Profile.load(cli_profile)
    dens = Image.open(tmp_path / "png" / "density.png")
    assert dens.size == (prof.fingerprint.num_heads * 16, prof.fingerprint.num_layers * 16)
    masks = sorted(p.name for p in (tmp_path / "png").glob("mask_*.png"))
    distinct = {s.pattern for heads in prof.layers for s in heads}
    assert len(masks) >= len(distinct)
    # the shipped profile (made by the profiler for the bundled model): table and heatmaps work
    shipped = Path(__file__).parents[1] / "profiles" / "tiny-cogvideox.json"
    assert _cli("inspect", str(shipped), "--png-dir", str(tmp_path / "png2")) == 0
    assert (tmp_path / "png2" / "patterns.png").is_file()
