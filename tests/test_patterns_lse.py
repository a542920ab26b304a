"""lse_topk: exact (true-LSE) block attention mass against a brute-force fp64 softmax, top blocks against brute
force, the Re-ttention statistics (exact = dense at the refresh step), and the step cache in the processor."""

from __future__ import annotations

import math

import pytest
import torch
from test_patterns_dynamic import _brute_select

from dit_sparse.kernels.reference import expand_block_mask, reference_attention
from dit_sparse.patterns import MaskLayout, validate_pattern
from dit_sparse.patterns import dynamic as dyn


def _brute_mass(q: torch.Tensor, k: torch.Tensor, bs: int) -> torch.Tensor:
    """float64 (B, H, nB, nB): full softmax rows in fp64, summed per key block, averaged per query block."""
    n = q.shape[2]
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B,H,N,N)
    nb = -(-n // bs)
    out = torch.zeros(q.shape[0], q.shape[1], nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            out[:, :, i, j] = p[:, :, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].sum(-1).mean(-1)
    return out


def _qk(n: int, seed: int = 0, heads: int = 3, dim: int = 24) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, heads, n, dim, generator=g) * 1.5 for _ in range(3))


@pytest.mark.parametrize(
    "chunk_scores", [1, 50_000, 1 << 24]
)  # 1 block per chunk, chunks of 3 blocks (ragged end), one chunk
def test_exact_block_mass_equals_brute_force(monkeypatch, chunk_scores) -> None:
    monkeypatch.setattr(dyn, "_LSE_CHUNK_SCORES", chunk_scores)
    q, k, _ = _qk(149)  # 10 blocks of 16, the last one 5 tokens
    got = dyn.exact_block_mass(q, k, 16)
    want = _brute_mass(q, k, 16)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1).double(), torch.ones_like(want[..., 0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("budget", "mass"), [(0.2, None), (0.5, None), (1.0, None), (0.25, 0.5), (0.25, 0.9)]
)
def test_lse_topk_keeps_brute_force_top_blocks(budget, mass) -> None:
    layout = MaskLayout((3, 5, 7), num_text=0, block_size=16)  # 105 tokens, last block short
    q, k, _ = _qk(layout.seq_len, seed=1)
    got = dyn.lse_topk_mask(layout, q, k, None, budget=budget, mass=mass)
    want = _brute_select(_brute_mass(q, k, 16), budget, mass)
    assert torch.equal(got, want)
    assert got.diagonal(dim1=-2, dim2=-1).all()


def test_lse_topk_validation() -> None:
    assert validate_pattern("lse_topk", {})["retention"] is False
    for bad in ({"budget": 0}, {"mass": 2}, {"refresh": -1}, {"retention": 1}, {"patch": "auto"}):
        with pytest.raises(ValueError, match="lse_topk"):
            validate_pattern("lse_topk", bad)


def test_retention_stats_make_the_refresh_step_dense() -> None:
    n, bs = 83, 16
    q, k, v = _qk(n, seed=2)
    mask = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(5)) < 0.4
    mask[0, 0, 2] = False  # a query block with no allowed key: r = 0, residual = the dense output
    sparse = reference_attention(q, k, v, mask, bs).float()
    r, residual = dyn.retention_stats(q, k, v, mask, bs, sparse)
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    allowed = expand_block_mask(mask, bs, n, n)
    want_r = (s.exp() * allowed).sum(-1) / s.exp().sum(-1)  # Z_in / Z
    torch.testing.assert_close(r.double(), want_r, rtol=1e-5, atol=1e-7)
    assert (r[0, 0, 32:48] == 0).all()
    dense = reference_attention(q, k, v, None)
    torch.testing.assert_close(dyn.apply_retention(sparse, r, residual).double(), dense, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- in the processor
RES = dict(height=48, width=64, frames=9)  # grid (3, 3, 4) = 36 tokens, 3 blocks of 16


@pytest.fixture(scope="module")
def pipe():
    from tiny_wan import tiny_wan_pipeline

    return tiny_wan_pipeline()


def _profile(pipe, heads, dense_steps=1, refresh=2):
    from dit_sparse import Profile
    from dit_sparse.profile import HeadSpec

    prof = Profile.dense(pipe.transformer)
    prof.block_size = 16
    prof.schedule.dense_steps = dense_steps
    prof.schedule.refresh_interval = refresh
    prof.layers = [[HeadSpec(n, dict(p)) for n, p in heads] for _ in range(prof.fingerprint.num_layers)]
    prof.validate()
    return prof


def _spy_retention(monkeypatch):
    from dit_sparse.integration import TransformerBinding

    seen: dict[tuple[int, int, str | None], tuple[torch.Tensor, ...]] = {}
    real = TransformerBinding._retention

    def spy(self, layer, plan, mlayout, q, k, v, mask, scale, out):
        before = out.detach().clone()  # the kernel's sparse output (B, H, N, D)
        res = real(self, layer, plan, mlayout, q, k, v, mask, scale, out)
        seen[(layer, self.state.step, self.state.context_name)] = (q, k, v, mask.clone(), before, res.clone())
        return res

    monkeypatch.setattr(TransformerBinding, "_retention", spy)
    return seen


def test_retention_in_the_processor_dense_at_refresh_corrected_between(pipe, monkeypatch) -> None:
    from tiny_wan import run

    import dit_sparse

    seen = _spy_retention(monkeypatch)
    # dense step 0; sparse steps 1..3; refresh every 2 sparse steps -> statistics at 1 and 3, corrected at 2
    prof = _profile(
        pipe, [("lse_topk", {"budget": 0.34, "retention": True}), ("window", {"f": 0, "h": 1, "w": 1})]
    )
    with dit_sparse.apply(pipe, prof) as handle:
        run(pipe, steps=4, **RES)
        rep = handle.report()
        assert not handle.bindings[0].retention_cache  # cleared at the end of the run
    layers = {key[0] for key in rep.density}
    assert rep.retention == {
        (lay, s): w for lay in layers for s, w in ((1, "refreshed"), (2, "corrected"), (3, "refreshed"))
    }
    for (layer, step, ctx), (q, k, v, mask, sparse, out) in seen.items():
        assert mask[:, 0].sum() < mask[:, 0].numel()  # head 0 really is sparse
        if step in (1, 3):  # head 0 is dense attention (to fp32), head 1 untouched
            torch.testing.assert_close(
                out[:, 0].double(), reference_attention(q, k, v, None)[:, 0], rtol=1e-4, atol=1e-5
            )
            assert torch.equal(out[:, 1], sparse[:, 1])
        else:  # r and residual of step 1 (brute force fp64) applied to step 2's sparse output of step 1's mask
            q1, k1, v1, mask1, sparse1, _ = seen[(layer, 1, ctx)]
            assert torch.equal(mask, mask1)
            s = q1[:, :1].double() @ k1[:, :1].double().transpose(-1, -2) / math.sqrt(q1.shape[-1])
            allowed = expand_block_mask(mask1[:, :1], 16, s.shape[-1], s.shape[-1])
            r1 = ((s.exp() * allowed).sum(-1) / s.exp().sum(-1))[..., None]  # (B, 1, N, 1)
            res1 = reference_attention(q1[:, :1], k1[:, :1], v1[:, :1], None) - r1 * sparse1[:, :1].double()
            want = r1 * reference_attention(q[:, :1], k[:, :1], v[:, :1], mask[:, :1], 16) + res1
            torch.testing.assert_close(out[:, :1].double(), want, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(out[:, :1], sparse[:, :1], atol=1e-3)  # the correction did something
    assert {key[1] for key in seen} == {1, 2, 3} and {key[2] for key in seen} == {"cond", "uncond"}
    n, d = seen[next(iter(seen))][0].shape[2:]
    per_entry = (
        1 * 1 * n * 4 * (1 + d)
    )  # r (B, R, N) + residual (B, R, N, D) in float32, batch 1 per CFG context
    assert rep.cache_bytes["retention"] == per_entry * len(layers) * 2  # layers × (cond, uncond)


def test_retention_over_budget_runs_uncorrected_and_says_so(pipe) -> None:
    from tiny_wan import run

    import dit_sparse

    prof = _profile(pipe, [("lse_topk", {"retention": True}), ("full", {})])
    with dit_sparse.apply(pipe, prof) as handle:
        handle.bindings[0].retention_cache_max_bytes = 16
        with pytest.warns(UserWarning, match="retention"):
            run(pipe, steps=3, **RES)
        rep = handle.report()
    assert {w for (_, s), w in rep.retention.items() if s == 2} == {
        "not applied: no cached statistics (evicted or over retention_cache_max_bytes)"
    }
    assert "retention" not in rep.cache_bytes
