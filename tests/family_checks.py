"""Shared dense-equivalence checks every model family must pass (tiny models, CPU, offline).

``run(pipe, **resolution) -> Tensor`` must be deterministic (seeded) and return the pipeline output (latents are
fine). Oracles: the same pipeline without the plugin (exact equality for dense profiles and after remove()), and
within a kernel-level tolerance for an all-blocks-allowed sparse profile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import dit_sparse
from dit_sparse import Profile

# An all-blocks sparse profile differs from dense only by fp32 kernel rounding (~1e-7 relative per attention),
# amplified through a few layers and steps; 1e-4 relative L2 is far above that and far below any real change.
FULL_REL_TOL = 1e-4


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_family(
    pipe: Any,
    run: Callable[..., torch.Tensor],
    resolutions: list[dict[str, Any]],
    block_size: int = 16,
    sparse_pattern: tuple[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the standard checks; returns a few numbers for the caller to assert on further."""
    transformer = pipe.transformer
    refs = [run(pipe, **res) for res in resolutions]

    # 1. dense profile == no plugin, bit for bit, at every resolution in one process
    handle = dit_sparse.apply(pipe, Profile.dense(transformer))
    for res, ref in zip(resolutions, refs):
        assert torch.equal(run(pipe, **res), ref), f"dense profile changed the output at {res}"
    handle.remove()

    # 2. all-blocks sparse profile ~= dense, through the sparse kernel
    full = Profile.uniform(transformer, "full", block_size=block_size)
    handle = dit_sparse.apply(pipe, full)
    for res, ref in zip(resolutions, refs):
        out = run(pipe, **res)
        err = rel_l2(out, ref)
        assert err < FULL_REL_TOL, f"all-blocks sparse profile differs from dense by {err:.2e} at {res}"
    rep = handle.report()
    assert rep.density, "the sparse kernel never ran"
    handle.remove()

    # 3. remove() restores bit-identical dense
    for res, ref in zip(resolutions, refs):
        assert torch.equal(run(pipe, **res), ref), "remove() did not restore the original output"

    # 4. a really sparse profile runs, is not dense, and the one-liner gives the same output as apply()
    name, params = sparse_pattern or ("window", {"f": 0, "h": 1, "w": 1})
    sparse = Profile.uniform(transformer, name, params, block_size=block_size)
    handle = dit_sparse.apply(pipe, sparse)
    outs = [run(pipe, **res) for res in resolutions]
    density = handle.report().sparse_density()
    handle.remove()
    originals = dict(transformer.attn_processors) if hasattr(transformer, "attn_processors") else None
    if originals is not None:
        transformer.set_attn_processor(dit_sparse.SparseProcessor(sparse))
        for res, out in zip(resolutions, outs):
            assert torch.equal(run(pipe, **res), out), "one-liner differs from apply()"
        transformer.set_attn_processor(originals)
        from dit_sparse.integration import _remove_root_hook

        _remove_root_hook(transformer)
    # 5. diffusers' FirstBlockCache at the same time does not confuse the step count
    fbc = check_first_block_cache(pipe, run, resolutions[0], sparse)
    return {"refs": refs, "sparse_outs": outs, "sparse_density": density, "first_block_cache": fbc}


def check_first_block_cache(
    pipe: Any, run: Callable[..., torch.Tensor], res: dict[str, Any], profile: Profile
) -> str:
    """With FirstBlockCache on, later blocks are skipped on some steps; the hook must still count every step.

    Returns "checked" or why it does not apply (transformers without CacheMixin, e.g. SD3 and PixArt, set no
    cache context, which FirstBlockCache requires)."""
    from diffusers import FirstBlockCacheConfig

    transformer = pipe.transformer
    if not hasattr(transformer, "enable_cache"):
        return f"{type(transformer).__name__} has no CacheMixin: FirstBlockCache does not apply"
    prof = Profile.from_dict(profile.to_dict())
    prof.schedule.dense_steps = 1
    handle = dit_sparse.apply(pipe, prof)
    try:
        run(pipe, **res)
        base = handle.report()
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.9))
        try:
            run(pipe, **res)
            cached = handle.report()
        finally:
            transformer.disable_cache()
    finally:
        handle.remove()
    assert cached is not base
    assert cached.steps == base.steps, (
        f"FirstBlockCache changed the step count: {base.steps} -> {cached.steps}"
    )
    assert cached.forwards == base.forwards
    calls = len(cached.density) + len(cached.dense)
    assert calls <= len(base.density) + len(base.dense)
    return "checked"
