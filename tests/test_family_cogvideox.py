"""CogVideoX family on tiny offline pipelines: joint attention with text FIRST, the pipeline's RoPE, CogVideoX 1.5's
temporal patch (latent frames padded to a multiple of ``patch_size_t`` by the pipeline), and 2B-style sincos
positions (no RoPE). ``CogVideoXPipeline`` runs with ``tokenizer=None, text_encoder=None, vae=None`` and
``prompt_embeds`` (the pipeline then assumes VAE factors 8 x 4), ``output_type="latent"``.
"""

from __future__ import annotations

import pytest
import torch
from family_checks import FULL_REL_TOL, check_family, rel_l2

import dit_sparse
from dit_sparse import Profile
from dit_sparse.pipelines import family_for

TEXT_DIM = 16
TEXT_LEN = 8
# latent (F, H, W) = (3, 6, 10) and (3, 10, 8) -> grids (3, 3, 5) and (3, 5, 4) after the 2x2 patch:
# 45 + 8 and 60 + 8 tokens, not multiples of the 16-token block
RES = [dict(height=48, width=80, frames=9), dict(height=80, width=64, frames=9)]


def tiny_cogvideox_pipeline(seed: int = 0, rope: bool = True, patch_size_t: int | None = None):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=9,
        patch_size=2,
        patch_size_t=patch_size_t,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=rope,
    ).eval()
    pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int, seq: int = TEXT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def run(pipe, height=48, width=80, frames=9, steps=2, cfg=5.0, batch=1, seq=TEXT_LEN, seed=0, **kw):
    if cfg > 1:
        kw["negative_prompt_embeds"] = embeds(batch, seq, seed=7)
    return pipe(
        prompt_embeds=embeds(batch, seq),
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kw,
    ).frames


@pytest.fixture(scope="module")
def pipe():
    return tiny_cogvideox_pipeline()


def test_family_is_registered_and_fingerprint(pipe):
    fam = family_for(pipe.transformer)
    assert fam.name == "cogvideox" and fam.text_position == "first"
    fp = Profile.dense(pipe.transformer).fingerprint
    assert fp.num_layers == len(pipe.transformer.transformer_blocks) == 2
    assert (fp.num_heads, fp.head_dim, fp.patch_size) == (2, 64, [1, 2, 2])


def test_standard_family_checks(pipe):
    res = check_family(pipe, run, RES, block_size=16)
    assert res["sparse_density"] is not None and res["sparse_density"] < 1.0


def test_grid_and_text_span_come_from_the_inputs(pipe):
    seen = []

    def grab(p, i, t, kw):  # the root hook's view of the forward that just ran (state is reset after the run)
        seen.append(handle.bindings[0].state.inputs)
        return {}

    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as handle:
        run(pipe, callback_on_step_end=grab, **RES[0])
        rep = handle.report()
        assert (
            rep.grids == [(3, 3, 5)] and rep.steps == 2 and rep.forwards == 2
        )  # CFG batched: 1 forward/step
        assert (seen[0].num_text, seen[0].text_first, seen[0].batch_size) == (TEXT_LEN, True, 2)
        # any prompt length works: the text span is read from encoder_hidden_states, not the config
        run(pipe, seq=5, callback_on_step_end=grab, **RES[1])
        assert seen[-1].num_text == 5 and seen[-1].grid == (3, 5, 4)
        assert handle.report().grids == [(3, 5, 4)]


def test_batch_of_two_prompts(pipe):
    ref = run(pipe, batch=2, **RES[1])
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, batch=2, **RES[1]), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as handle:
        seen = []
        out = run(
            pipe,
            batch=2,
            callback_on_step_end=lambda p, i, t, kw: seen.append(handle.bindings[0].state.inputs) or {},
            **RES[1],
        )
        assert rel_l2(out, ref) < FULL_REL_TOL
        assert seen[0].batch_size == 4  # 2 prompts x (uncond, cond) in one forward


def test_cogvideox15_temporal_patch():
    """CogVideoX 1.5: patch_size_t=2; 3 latent frames are padded to 4 by the pipeline -> F' = 2."""
    pipe15 = tiny_cogvideox_pipeline(patch_size_t=2)
    fam = family_for(pipe15.transformer)
    assert Profile.dense(pipe15.transformer).fingerprint.patch_size == [2, 2, 2]
    grids = []
    hook = pipe15.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: grids.append(fam.read_inputs(m, args, kwargs).grid), with_kwargs=True
    )
    res = [dict(height=48, width=80, frames=9), dict(height=80, width=48, frames=13)]
    try:
        check_family(pipe15, lambda p, **kw: run(p, steps=1, **kw), res, block_size=16)
    finally:
        hook.remove()
    assert set(grids) == {(2, 3, 5), (2, 5, 3)}  # 3 latent frames padded to 4 -> 2 temporal patches
    # the demo predicts the same grid before generating (mask picture, density knob)
    from dit_sparse.app.core import Settings, demo_layout

    for r, grid in zip(res, ((2, 3, 5), (2, 5, 3))):
        layout = demo_layout(pipe15, Settings(**r), 16)
        assert (layout.grid, layout.num_text) == (grid, TEXT_LEN)


def test_sincos_positions_without_rope():
    """CogVideoX-2B style: absolute sincos positions in the patch embedding, image_rotary_emb=None."""
    pipe2b = tiny_cogvideox_pipeline(rope=False)
    ref = run(pipe2b, **RES[0])
    with dit_sparse.apply(pipe2b, Profile.dense(pipe2b.transformer)):
        assert torch.equal(run(pipe2b, **RES[0]), ref)
    with dit_sparse.apply(pipe2b, Profile.uniform(pipe2b.transformer, "full", block_size=16)) as handle:
        assert rel_l2(run(pipe2b, **RES[0]), ref) < FULL_REL_TOL
        assert handle.report().density


def test_attention_mask_runs_dense_and_says_so(pipe):
    """An attention_mask passed through attention_kwargs cannot be a block mask: dense, with a warning."""
    s = TEXT_LEN + 45
    mask = torch.ones(2, 1, s, dtype=torch.bool)
    mask[:, :, 3:TEXT_LEN] = False  # hide some text keys
    ref = run(pipe, steps=1, attention_kwargs={"attention_mask": mask}, **RES[0])
    sparse = Profile.uniform(pipe.transformer, "window", {"f": 0, "h": 1, "w": 1}, block_size=16)
    with dit_sparse.apply(pipe, sparse) as handle, pytest.warns(UserWarning, match="attention_mask"):
        out = run(pipe, steps=1, attention_kwargs={"attention_mask": mask}, **RES[0])
        rep = handle.report()
    assert torch.equal(out, ref)
    # the fallback is in the run report too, for every layer, and no call ran sparse
    assert not rep.density and all("attention_mask" in why for why in rep.dense.values())
    assert any("attention_mask" in line for line in rep.fallbacks)


def test_fused_qkv_projections():
    """After fuse_qkv_projections() the stock processor uses to_qkv: the dense profile must still be bit-identical."""
    pipef = tiny_cogvideox_pipeline()
    pipef.transformer.fuse_qkv_projections()
    ref = run(pipef, steps=1, **RES[0])
    with dit_sparse.apply(pipef, Profile.dense(pipef.transformer)):
        assert torch.equal(run(pipef, steps=1, **RES[0]), ref)
    with dit_sparse.apply(pipef, Profile.uniform(pipef.transformer, "full", block_size=16)):
        assert rel_l2(run(pipef, steps=1, **RES[0]), ref) < FULL_REL_TOL
