"""diffusers integration on a tiny Wan pipeline: apply(), the one-liner, the root hook, remove(), the report."""

from __future__ import annotations

import pytest
import torch
from family_checks import FULL_REL_TOL, check_family, rel_l2
from tiny_wan import prompt_embeds, run, tiny_wan_pipeline, tiny_wan_transformer

import dit_sparse
from dit_sparse import Profile
from dit_sparse.integration import ROOT_HOOK_NAME, SparseApplyError
from dit_sparse.pipelines import UnsupportedModelError
from dit_sparse.profile import ProfileError

# latent grids (F', H', W') = (4, 4, 5) and (3, 3, 4): 80 and 36 tokens, not multiples of the 16-token block
RES = [dict(height=64, width=80, frames=13), dict(height=48, width=64, frames=9)]


@pytest.fixture(scope="module")
def pipe():
    return tiny_wan_pipeline()


def test_standard_family_checks(pipe):
    res = check_family(pipe, lambda p, **kw: run(p, steps=2, **kw), RES, block_size=16)
    assert res["sparse_outs"][0].shape == res["refs"][0].shape
    assert res["first_block_cache"] == "checked"


def test_report_measures_attention_time_when_asked(pipe):
    prof = Profile.uniform(pipe.transformer, "window", {"f": 0, "h": 1, "w": 1}, block_size=16, dense_steps=1)
    with dit_sparse.apply(pipe, prof, timing=True) as handle:
        run(pipe, steps=2, **RES[0])
        rep = handle.report()
    assert set(rep.attention_seconds) == {(0, 0), (1, 0), (0, 1), (1, 1)}  # dense and sparse calls both timed
    assert all(t > 0 for t in rep.attention_seconds.values())
    assert rep.to_dict()["attention_seconds"] > 0 and "attention time" in rep.summary()
    with dit_sparse.apply(pipe, prof) as handle:  # off by default: no timing, no synchronisation
        run(pipe, steps=2, **RES[0])
        assert handle.report().attention_seconds == {}


def test_window_profile_is_really_sparse_and_close(pipe):
    ref = run(pipe, steps=2, **RES[0])
    prof = Profile.uniform(pipe.transformer, "window", {"f": 1, "h": 1, "w": 1}, block_size=16)
    with dit_sparse.apply(pipe, prof) as handle:
        out = run(pipe, steps=2, **RES[0])
        rep = handle.report()
    assert 0.0 < rep.sparse_density() < 0.9
    assert not torch.equal(out, ref)  # a sparse mask changes the result a little ...
    assert rel_l2(out, ref) < 0.5  # ... but not into something else


def test_batch_of_two_prompts_and_no_cfg(pipe):
    for batch, cfg in ((2, 5.0), (2, 1.0), (1, 1.0)):
        ref = run(pipe, steps=2, batch=batch, cfg=cfg, **RES[1])
        with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
            assert torch.equal(run(pipe, steps=2, batch=batch, cfg=cfg, **RES[1]), ref)
        with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as h:
            assert rel_l2(run(pipe, steps=2, batch=batch, cfg=cfg, **RES[1]), ref) < FULL_REL_TOL
            assert h.report().forwards == (4 if cfg > 1 else 2)


def test_step_schedule_and_report(pipe):
    prof = Profile.uniform(pipe.transformer, "window", {"f": 0, "h": 1, "w": 1}, block_size=16, dense_steps=1)
    prof.schedule.dense_layers = [1]
    with dit_sparse.apply(pipe, prof) as handle:
        run(pipe, steps=3, **RES[0])
        rep = handle.report()
        assert rep.steps == 3 and rep.forwards == 6  # CFG: two forwards per step, one step index
        assert rep.dense[(0, 0)] == "warm-up step" and rep.dense[(1, 0)] == "warm-up step"
        assert rep.dense[(1, 1)] == "dense layer" and rep.dense[(1, 2)] == "dense layer"
        assert set(rep.density) == {(0, 1), (0, 2)}
        assert rep.grids == [(4, 4, 5)]
        d = rep.to_dict()
        assert d["steps"] == 3 and "0,1" in d["per_layer_step_density"]
        assert "mean density" in rep.summary()
        # a second call is a new run (the pipeline resets stateful hooks): steps count from 0 again
        run(pipe, steps=2, **RES[1])
        rep2 = handle.report()
        assert rep2 is not rep and rep2.steps == 2 and rep2.grids == [(3, 3, 4)]


def test_first_block_cache_does_not_confuse_step_count():
    from diffusers import FirstBlockCacheConfig

    pipe = tiny_wan_pipeline(num_layers=3)
    prof = Profile.uniform(pipe.transformer, "window", {"f": 1, "h": 1, "w": 1}, block_size=16, dense_steps=2)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with dit_sparse.apply(pipe, prof) as handle:
        run(pipe, steps=6, **RES[0])
        rep = handle.report()
    # FBC skips the later blocks on most steps; the step index comes from distinct timesteps, not layer calls
    assert rep.steps == 6
    assert {s for (layer, s) in rep.density if layer == 0} == {2, 3, 4, 5}
    assert len(rep.density) < 3 * 4  # some (layer, step) calls were skipped by the cache


def test_wan22_two_transformers():
    pipe = tiny_wan_pipeline(transformer_2=True)
    ref = run(pipe, steps=4, **RES[1])
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)) as handle:
        assert len(handle.bindings) == 2
        assert torch.equal(run(pipe, steps=4, **RES[1]), ref)
        assert sum(r.steps for r in handle.reports()) == 4  # the boundary splits the steps between the two
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)):
        assert rel_l2(run(pipe, steps=4, **RES[1]), ref) < FULL_REL_TOL


def test_remove_restores_exact_processor_objects_and_hooks(pipe):
    before = dict(pipe.transformer.attn_processors)
    handle = dit_sparse.apply(pipe, Profile.dense(pipe.transformer))
    assert isinstance(pipe.transformer.blocks[0].attn1.processor, dit_sparse.SparseProcessor)
    assert (
        pipe.transformer.blocks[0].attn2.processor is before["blocks.0.attn2.processor"]
    )  # cross-attn untouched
    handle.remove()
    after = pipe.transformer.attn_processors
    assert all(after[k] is v for k, v in before.items())
    assert pipe.transformer._diffusers_hook.get_hook(ROOT_HOOK_NAME) is None
    handle.remove()  # idempotent


def test_apply_twice_is_a_clear_error(pipe):
    with (
        dit_sparse.apply(pipe, Profile.dense(pipe.transformer)),
        pytest.raises(SparseApplyError, match="already applied"),
    ):
        dit_sparse.apply(pipe, Profile.dense(pipe.transformer))
    # the failed second apply left the first one intact, and after removal applying works again
    dit_sparse.apply(pipe, Profile.dense(pipe.transformer)).remove()


def test_attention_backend_is_copied(pipe):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also switches diffusers' process-wide active backend, and reset_attention_backend does
    # not switch it back: restore it, or later tests (and forked workers) inherit "_native_math"
    previous = _AttentionBackendRegistry._active_backend
    pipe.transformer.set_attention_backend("_native_math")
    try:
        with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
            assert pipe.transformer.blocks[0].attn1.processor._attention_backend == "_native_math"
    finally:
        pipe.transformer.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(previous)


def test_profile_for_another_model_is_rejected(pipe):
    other = tiny_wan_transformer(num_layers=3)
    prof = Profile.dense(other)
    with pytest.raises(ProfileError, match=r"profile has 3 layers × 2 heads.*transformer has 2 × 2"):
        dit_sparse.apply(pipe, prof)
    assert not isinstance(pipe.transformer.blocks[0].attn1.processor, dit_sparse.SparseProcessor)


def test_unsupported_transformer_lists_supported():
    class NotADiT(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="WanTransformer3DModel"):
        Profile.dense(NotADiT())
    with pytest.raises(TypeError, match="pipeline"):
        dit_sparse.apply(object(), Profile.dense(tiny_wan_transformer()))


def test_transformer_alone_with_manual_loop():
    """apply() on a bare transformer; step index from distinct timesteps, new run when t rises."""
    t = tiny_wan_transformer()
    prof = Profile.uniform(t, "full", block_size=16, dense_steps=1)
    x = torch.randn(1, 16, 3, 6, 8)
    ctx = prompt_embeds(1)
    with dit_sparse.apply(t, prof) as handle, torch.no_grad():
        for step_t in (900.0, 600.0, 300.0):
            for _ in range(2):  # two forwards (cond/uncond) per step
                t(x, torch.tensor([step_t]), ctx)
        rep = handle.report()
        assert rep.steps == 3 and rep.forwards == 6
        assert (0, 0) in rep.dense and (0, 1) in rep.density
        handle.bindings[0].reset()  # what the pipeline's reset does
        t(x, torch.tensor([900.0]), ctx)
        assert handle.report().steps == 1


def test_each_layer_plan_is_built_once_in_a_deep_model(monkeypatch):
    """40 layers, each with its own head patterns (more plans than the old fixed cache of 32 held): one plan per
    layer, built at its first call and reused at every later step and CFG pass."""
    import dit_sparse.integration as integ
    from dit_sparse.profile import HeadSpec

    deep = tiny_wan_pipeline(num_layers=40)
    prof = Profile.dense(deep.transformer)
    prof.block_size = 16
    prof.layers = [
        [HeadSpec("window", {"f": layer % 3, "h": 1 + layer // 3 % 2, "w": layer // 6}), HeadSpec("full", {})]
        for layer in range(40)
    ]
    prof.validate()
    built: list[int] = []
    real = integ.build_layer_mask
    monkeypatch.setattr(integ, "build_layer_mask", lambda *a, **kw: built.append(1) or real(*a, **kw))
    with dit_sparse.apply(deep, prof) as handle:
        run(deep, steps=3, **RES[0])
        assert len(handle.report().density) == 40 * 3
    assert len(built) == len(
        {tuple((s.pattern, tuple(sorted(s.params.items()))) for s in h) for h in prof.layers}
    )


def test_triton_path_hands_the_kernel_each_plan_prepared_once(pipe, monkeypatch):
    """On the Triton path a static layer mask is turned into the kernel's index once per plan (not on every call),
    and the result is bit for bit the one the kernel gives when it builds the index itself."""
    from dit_sparse.kernels import triton_interpreting

    if not torch.cuda.is_available() and not triton_interpreting():
        pytest.skip("impl='triton' on CPU needs TRITON_INTERPRET=1")
    import dit_sparse.kernels.api as kapi
    import dit_sparse.kernels.triton_attention as ta

    prof = Profile.uniform(pipe.transformer, "window", {"f": 1, "h": 1, "w": 1}, block_size=16)
    builds: list[int] = []
    real_build = ta.build_block_index
    monkeypatch.setattr(ta, "build_block_index", lambda *a, **kw: builds.append(1) or real_build(*a, **kw))
    prepares: list[int] = []
    real_prepare = kapi.build_block_index
    monkeypatch.setattr(
        kapi, "build_block_index", lambda *a, **kw: prepares.append(1) or real_prepare(*a, **kw)
    )
    with dit_sparse.apply(pipe, prof, impl="triton") as handle:
        fast = run(pipe, steps=2, **RES[1])
        cache = handle.report().cache_bytes
    assert builds == [] and len(prepares) == 1  # both layers share one plan (same patterns, same layout)
    assert cache["index"] > 0
    monkeypatch.setattr(dit_sparse.integration.TransformerBinding, "_prepare_index", lambda *a: None)
    with dit_sparse.apply(pipe, prof, impl="triton"):
        slow = run(pipe, steps=2, **RES[1])
    assert len(builds) == 2 * 2 * 2  # 2 steps × 2 layers × cond and uncond: the index built on every call
    assert torch.equal(fast, slow)
