"""Draft guidance (brute-force top-k / mass on the pooled map), patch tiling, step-cached dynamic masks (refresh on
schedule, reset between runs), and skip(mode="reuse") in the processor (previous output reused, bounded cache)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dit_sparse.kernels.permutation import check_permutation
from dit_sparse.patterns import PATTERNS, MaskLayout, validate_pattern
from dit_sparse.patterns.dynamic import draft_mask, patch_permutation


def _brute_pooled_map(q: torch.Tensor, k: torch.Tensor, bs: int) -> torch.Tensor:
    """float64 (B, H, nB, nB) by explicit loops over blocks: softmax_j(mean_q(block i) · mean_k(block j) / sqrt(D))."""
    n, d = q.shape[2], q.shape[3]
    nb = -(-n // bs)
    qp = torch.stack([q[:, :, i * bs : (i + 1) * bs].double().mean(2) for i in range(nb)], dim=2)
    kp = torch.stack([k[:, :, i * bs : (i + 1) * bs].double().mean(2) for i in range(nb)], dim=2)
    return torch.softmax(qp @ kp.transpose(-1, -2) / math.sqrt(d), dim=-1)


def _brute_select(probs: torch.Tensor, budget: float, mass: float | None) -> torch.Tensor:
    bsz, heads, nb, _ = probs.shape
    out = torch.zeros(bsz, heads, nb, nb, dtype=torch.bool)
    for b in range(bsz):
        for h in range(heads):
            for i in range(nb):
                ranked = sorted(range(nb), key=lambda j: -float(probs[b, h, i, j]))
                if mass is None:
                    chosen = ranked[: math.ceil(budget * nb)]
                else:
                    chosen, total = [], 0.0
                    for j in ranked:
                        chosen.append(j)
                        total += float(probs[b, h, i, j])
                        if total >= mass:
                            break
                out[b, h, i, [*chosen, i]] = True  # plus the diagonal
    return out


@pytest.mark.parametrize(
    ("budget", "mass"), [(0.25, None), (0.5, None), (1.0, None), (0.25, 0.6), (0.25, 0.95)]
)
@pytest.mark.parametrize("patch", ["none", [2, 4]])
def test_draft_picks_brute_force_top_blocks(budget, mass, patch) -> None:
    layout = MaskLayout((3, 6, 9), num_text=0, block_size=16)  # 162 tokens, last block short
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, layout.seq_len, 32, generator=g) for _ in range(2))
    perm = None if patch == "none" else patch_permutation(layout, *patch)
    got = draft_mask(layout, q, k, perm, budget=budget, mass=mass)
    qq, kk = (q, k) if perm is None else (q[:, :, perm], k[:, :, perm])
    want = _brute_select(_brute_pooled_map(qq, kk, 16), budget, mass)
    assert torch.equal(got, want)
    assert got.diagonal(dim1=-2, dim2=-1).all()


def test_patch_permutation_makes_one_patch_one_block() -> None:
    """Grid divisible by 8×16 patches and 128-token blocks: every block is exactly one (frame, patch)."""
    layout = MaskLayout((2, 16, 32), num_text=0, block_size=128)
    perm = patch_permutation(layout, 8, 16)
    check_permutation(perm.view(1, 1, -1))
    coords = layout.token_coords()[perm]  # (N, 3) coordinates in permuted order
    tile = torch.stack([coords[:, 0], coords[:, 1] // 8, coords[:, 2] // 16], dim=1).view(-1, 128, 3)
    assert (tile == tile[:, :1]).all()  # one (frame, patch) per block
    assert len({tuple(t[0].tolist()) for t in tile}) == tile.shape[0]


def test_patch_permutation_any_grid_keeps_text() -> None:
    layout = MaskLayout((3, 5, 7), num_text=11, text_first=False, block_size=32)
    perm = patch_permutation(layout, 4, 8)
    check_permutation(perm.view(1, 1, -1))
    assert torch.equal(perm[-11:], torch.arange(layout.num_video, layout.seq_len))


def test_draft_validation() -> None:
    assert validate_pattern("draft", {})["budget"] == 0.25
    for bad in ({"budget": 0}, {"mass": 1.5}, {"patch": [8]}, {"refresh": -1}):
        with pytest.raises(ValueError, match="draft parameter"):
            validate_pattern("draft", bad)


# ---------------------------------------------------------------------------------------------- in the processor
RES = dict(height=48, width=64, frames=9)  # grid (3, 3, 4) = 36 tokens, 3 blocks of 16


@pytest.fixture(scope="module")
def pipe():
    from tiny_wan import tiny_wan_pipeline

    return tiny_wan_pipeline()


def _profile(pipe, heads, dense_steps=0, refresh=0):
    from dit_sparse import Profile
    from dit_sparse.profile import HeadSpec

    prof = Profile.dense(pipe.transformer)
    prof.block_size = 16
    prof.schedule.dense_steps = dense_steps
    prof.schedule.refresh_interval = refresh
    prof.layers = [[HeadSpec(n, dict(p)) for n, p in heads] for _ in range(prof.fingerprint.num_layers)]
    prof.validate()
    return prof


def test_draft_runs_and_is_sparse(pipe) -> None:
    from tiny_wan import run

    import dit_sparse

    prof = _profile(pipe, [("draft", {"budget": 0.34, "patch": [2, 8]}), ("full", {})])
    with dit_sparse.apply(pipe, prof) as handle:
        out = run(pipe, steps=2, **RES)
        rep = handle.report()
    assert torch.isfinite(out).all()
    assert 0.5 < rep.sparse_density() < 1.0


def test_draft_on_every_head_or_some_builds_the_same_head_masks(pipe, monkeypatch) -> None:
    """Every head dynamic (q/k used in place) or one of two (q/k heads selected): a head's draft mask depends on
    its own q/k only, so layer 0 at step 0 gets the same head-0 mask; the report's density is the mask's own."""
    from tiny_wan import run

    import dit_sparse
    from dit_sparse.integration import TransformerBinding
    from dit_sparse.kernels import token_density

    seen: dict[str, list] = {}
    real = TransformerBinding._step_mask

    def spy(self, layer, plan, mlayout, q, k, *args, **kwargs):
        mask, density = real(self, layer, plan, mlayout, q, k, *args, **kwargs)
        seen[tag].append((layer, self.state.step, self.state.context_name, mask.clone(), mlayout))
        return mask, density

    monkeypatch.setattr(TransformerBinding, "_step_mask", spy)
    draft = ("draft", {"budget": 0.34, "patch": [2, 2]})
    reports = {}
    for tag, heads in (("all", [draft, draft]), ("one", [draft, ("full", {})])):
        seen[tag] = []
        with dit_sparse.apply(pipe, _profile(pipe, heads)) as handle:
            run(pipe, steps=1, **RES)
            reports[tag] = handle.report()
    first = {
        tag: [m for layer, step, _, m, _ in calls if (layer, step) == (0, 0)] for tag, calls in seen.items()
    }
    assert first["all"] and len(first["all"]) == len(first["one"])
    for m_all, m_one in zip(first["all"], first["one"], strict=True):
        assert torch.equal(m_all[:, 0], m_one[:, 0])
        assert m_one[:, 1].all()  # the full head
        assert not m_all[:, 1].all()  # the draft head kept a budget's worth
    for tag, calls in seen.items():  # one call per (layer, step): CFG runs cond and uncond in one batch
        for layer, step, _, mask, mlayout in calls:
            want = float(token_density(mask, mlayout.block_size, mlayout.seq_len, mlayout.seq_len))
            assert reports[tag].density[(layer, step)] == pytest.approx(want, rel=1e-12)


def test_run_report_reads_device_densities_when_asked() -> None:
    from dit_sparse.integration import RunReport

    rep = RunReport("T")
    rep.record_density((0, 1), torch.tensor(0.25, dtype=torch.float64))
    rep.record_density((1, 1), 0.5)
    rep.dense[(2, 1)] = "dense layer"
    rep.record_density((1, 2), 0.75)
    rep.record_density((1, 2), torch.tensor([0.125]))  # a later record replaces the earlier one
    assert rep.density == {(0, 1): 0.25, (1, 1): 0.5, (1, 2): 0.125}
    assert all(type(v) is float for v in rep.density.values())
    assert rep.mean_density() == pytest.approx((0.25 + 0.5 + 0.125 + 1.0) / 4)
    rep.record_density((0, 1), 1.0)  # a float after a tensor: the float wins
    assert rep.per_layer() == {0: 1.0, 1: pytest.approx(0.3125), 2: 1.0}
    assert rep.to_dict()["per_layer_step_density"]["0,1"] == 1.0


def test_step_cached_masks_refresh_on_schedule_and_reset_between_runs(pipe, monkeypatch) -> None:
    from tiny_wan import run

    import dit_sparse

    calls: list[int] = []
    spec = PATTERNS["draft"]
    binding_box = {}

    def counting(*args, **kwargs):
        calls.append(binding_box["b"].state.step)
        return spec.dynamic(*args, **kwargs)

    monkeypatch.setitem(PATTERNS, "draft", dataclasses.replace(spec, dynamic=counting))
    # dense step 0; sparse steps 1..3; refresh every 2 sparse steps -> masks built at steps 1 and 3
    prof = _profile(pipe, [("draft", {"patch": "none"}), ("full", {})], dense_steps=1, refresh=2)
    with dit_sparse.apply(pipe, prof) as handle:
        binding_box["b"] = handle.bindings[0]
        for _ in range(2):
            calls.clear()
            run(pipe, steps=4, **RES)  # CFG: cond and uncond forwards keep their own masks
            assert sorted(set(calls)) == [1, 3]
            assert len(calls) == 2 * 2 * 2  # refresh steps × layers × CFG contexts
            assert not handle.bindings[0].step_masks  # cleared at the end of the run
    # a per-pattern refresh overrides the schedule; refresh larger than the run: built once per run
    prof = _profile(
        pipe, [("draft", {"patch": "none", "refresh": 50}), ("full", {})], dense_steps=1, refresh=2
    )
    with dit_sparse.apply(pipe, prof) as handle:
        binding_box["b"] = handle.bindings[0]
        for _ in range(2):
            calls.clear()
            run(pipe, steps=3, **RES)
            assert sorted(set(calls)) == [1]  # rebuilt in the second run: the cache was reset


def _capture_core(monkeypatch):
    from dit_sparse.integration import TransformerBinding

    seen: list[tuple[int, int, str | None, torch.Tensor]] = []
    real = TransformerBinding._core

    def spy(self, layer, *args, **kwargs):  # pass everything through: independent of _core's exact signature
        out = real(self, layer, *args, **kwargs)
        seen.append((layer, self.state.step, self.state.context_name, out.detach().clone()))
        return out

    monkeypatch.setattr(TransformerBinding, "_core", spy)
    return seen


def test_skip_reuse_returns_previous_step_output(pipe, monkeypatch) -> None:
    from tiny_wan import run

    import dit_sparse

    seen = _capture_core(monkeypatch)
    prof = _profile(pipe, [("skip", {"mode": "reuse"}), ("window", {"f": 0, "h": 1, "w": 1})], dense_steps=1)
    with dit_sparse.apply(pipe, prof) as handle:
        run(pipe, steps=3, **RES)
        rep = handle.report()
        assert not handle.bindings[0].reuse_cache  # cleared at the end of the run
    by = {(layer, step, ctx): out for layer, step, ctx, out in seen}  # out (B, S, H, D)
    assert {v for v in rep.reuse.values()} == {"reused"}
    for (layer, step, ctx), out in by.items():
        if step >= 1:  # head 0 is exactly the dense warm-up output of the same layer and CFG context
            assert torch.equal(out[:, :, 0], by[(layer, 0, ctx)][:, :, 0])
            assert not torch.equal(out[:, :, 1], by[(layer, 0, ctx)][:, :, 1])
    assert rep.cache_bytes["reuse"] > 0 and "reuse" in rep.to_dict()["cache_bytes"]


def test_skip_reuse_miss_and_full_cache_compute_and_say_so(pipe, monkeypatch) -> None:
    from tiny_wan import run

    import dit_sparse

    seen = _capture_core(monkeypatch)
    prof = _profile(
        pipe, [("skip", {"mode": "reuse"}), ("full", {})]
    )  # no warm-up: step 0 has nothing to reuse
    with dit_sparse.apply(pipe, prof) as handle:
        with pytest.warns(UserWarning, match="no previous output"):
            run(pipe, steps=2, **RES)
        rep = handle.report()
    assert rep.reuse[(0, 0)].startswith("computed dense") and rep.reuse[(0, 1)] == "reused"
    by = {(layer, step, ctx): out for layer, step, ctx, out in seen}
    for (layer, step, ctx), out in by.items():
        if step == 1:
            assert torch.equal(out[:, :, 0], by[(layer, 0, ctx)][:, :, 0])
    with dit_sparse.apply(pipe, prof) as handle:
        handle.bindings[0].reuse_cache_max_bytes = 16  # too small for one layer's heads
        with pytest.warns(UserWarning, match="more than the reuse cache"):
            run(pipe, steps=2, **RES)
        rep = handle.report()
    assert rep.reuse[(0, 0)] == "computed dense: cache empty or evicted"  # first step: nothing yet
    assert rep.reuse[(0, 1)].startswith("computed dense: cache full")  # then: it did not fit
    assert any("reuse" in f for f in rep.fallbacks)
