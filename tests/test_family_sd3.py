"""SD3 family: a tiny StableDiffusion3Pipeline, offline.

The transformer is built from a config (2 heads × 64, 2 MMDiT blocks; block 0 is an SD3.5-Medium style dual-attention
block with the image-only ``attn2``, qk-norm ``rms_norm``; block 1 is the ``context_pre_only`` last block). The
pipeline runs with no tokenizers or text encoders (``prompt_embeds`` + ``pooled_prompt_embeds`` and their negatives),
no VAE (``output_type="latent"``), CFG on (one batched cond/uncond forward per step).
"""

from __future__ import annotations

import pytest
import torch
from family_checks import FULL_REL_TOL, check_family, rel_l2

import dit_sparse
from dit_sparse import Profile
from dit_sparse.pipelines import family_for

TEXT_LEN = 10
TEXT_DIM = 32
POOLED_DIM = 32
# latents 22×18 and 14×18 → grids 11×9 and 7×9 → 99 + 10 and 63 + 10 tokens: neither a multiple of the 16-token block
RESOLUTIONS = [{"height": 176, "width": 144}, {"height": 112, "width": 144}]
WINDOW = ("window", {"f": 0, "h": 1, "w": 1})


def tiny_sd3_transformer(
    seed: int = 0, dual_attention_layers: tuple[int, ...] = (0,), qk_norm: str | None = "rms_norm"
):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=128,  # = heads × head_dim (the context stream has the model width)
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(batch, POOLED_DIM, generator=g)


def run(pipe, height=176, width=144, steps=2, cfg=5.0, batch=1, seed=0, **kwargs):
    prompt, pooled = embeds(batch, seed=1)
    neg, neg_pooled = embeds(batch, seed=7)
    out = pipe(
        prompt_embeds=prompt,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    )
    return out.images


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


def test_family_checks(pipe):
    result = check_family(pipe, run, RESOLUTIONS, block_size=16, sparse_pattern=WINDOW)
    assert result["sparse_density"] is not None and result["sparse_density"] < 1.0
    for ref, out in zip(result["refs"], result["sparse_outs"]):
        assert not torch.equal(ref, out)  # the window profile really changed something


def test_layers_and_fingerprint(pipe):
    t = pipe.transformer
    family = family_for(t)
    assert family.name == "sd3" and family.text_position == "last"
    paths = [p for p, _ in family.self_attention_modules(t)]
    # the joint attention of every block, then SD3.5-M's image-only attn2 layers
    assert paths == ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.0.attn2"]
    assert Profile.dense(t).fingerprint.num_layers == 3
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    attn2_proc = t.transformer_blocks[0].attn2.processor
    assert isinstance(attn2_proc, JointAttnProcessor2_0)
    with dit_sparse.apply(pipe, Profile.uniform(t, *WINDOW, block_size=16)):
        assert isinstance(t.transformer_blocks[0].attn2.processor, dit_sparse.SparseProcessor)
    assert t.transformer_blocks[0].attn2.processor is attn2_proc  # restored exactly
    assert isinstance(family.dense_processor(t.transformer_blocks[0].attn2), JointAttnProcessor2_0)


def test_image_only_attn2_runs_sparse_without_text(pipe):
    """Only layer 2 (block 0's image-only attn2) sparse: it runs with num_text=0 and changes the output; the
    joint layers stay dense."""
    t = pipe.transformer
    res = RESOLUTIONS[0]
    ref = run(pipe, **res)
    prof = Profile.dense(t)
    prof.block_size = 16
    prof.layers[2] = Profile.uniform(t, *WINDOW, block_size=16).layers[2]
    with dit_sparse.apply(pipe, prof) as handle:
        out = run(pipe, **res)
        rep = handle.report()
    assert {layer for layer, _ in rep.density} == {2}
    assert all(reason == "all heads dense" for reason in rep.dense.values())
    assert 0 < rep.sparse_density() < 1 and not torch.equal(out, ref)


def test_read_inputs_text_last_no_padding(pipe):
    t = pipe.transformer
    hs = torch.zeros(2, 4, 23, 18)  # odd latent height: PatchEmbed keeps floor(23 / 2) rows
    ehs = torch.zeros(2, TEXT_LEN, TEXT_DIM)
    inputs = family_for(t).read_inputs(
        t, (hs,), {"encoder_hidden_states": ehs, "timestep": torch.tensor([500.0] * 2)}
    )
    assert inputs.grid == (1, 11, 9)
    assert inputs.num_text == TEXT_LEN and inputs.text_first is False  # [image, text]
    assert inputs.text_valid is None and inputs.batch_size == 2


def test_two_prompts_dense_and_full(pipe):
    ref = run(pipe, batch=2, **RESOLUTIONS[1])
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, batch=2, **RESOLUTIONS[1]), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as handle:
        assert rel_l2(run(pipe, batch=2, **RESOLUTIONS[1]), ref) < FULL_REL_TOL
        assert handle.report().density


def test_new_run_detected_without_cache_reset(pipe):
    """SD3's transformer has no CacheMixin (no hook reset between calls): a rising timestep starts a new run."""
    family = family_for(pipe.transformer)
    assert family.resets_each_run is False
    res = RESOLUTIONS[1]
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, *WINDOW, block_size=16)) as handle:
        run(pipe, steps=2, **res)
        rep = handle.report()
        assert (rep.steps, rep.forwards) == (2, 2)  # CFG batched: one forward per step
        assert sorted(k[1] for k in rep.density) == [0, 0, 0, 1, 1, 1]  # 3 layers × 2 steps
        run(pipe, steps=3, **res)
        rep = handle.report()
        assert (rep.steps, rep.forwards) == (3, 3)
        assert len(handle.bindings[0].runs) == 2
        # skip-layer guidance adds a batch-1 forward at the same timestep (steps 1 and 2 here): not a new step
        run(pipe, steps=3, skip_guidance_layers=[0], skip_layer_guidance_stop=0.9, **res)
        rep = handle.report()
        assert (rep.steps, rep.forwards) == (3, 5)
        assert len(handle.bindings[0].runs) == 3


def test_sd3_medium_config_transformer():
    """SD3-medium layout (no qk-norm, no dual attention), transformer called directly through the root hook."""
    t = tiny_sd3_transformer(seed=3, dual_attention_layers=(), qk_norm=None)
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(2, 4, 14, 18, generator=g),
        "encoder_hidden_states": torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g),
        "pooled_projections": torch.randn(2, POOLED_DIM, generator=g),
        "timestep": torch.tensor([700.0, 700.0]),
    }
    with torch.no_grad():
        ref = t(**kwargs).sample
        with dit_sparse.apply(t, Profile.dense(t)):
            assert torch.equal(t(**kwargs).sample, ref)
        with dit_sparse.apply(t, Profile.uniform(t, "full", block_size=16)) as handle:
            assert rel_l2(t(**kwargs).sample, ref) < FULL_REL_TOL
            assert handle.report().grids == [(1, 7, 9)]
        assert torch.equal(t(**kwargs).sample, ref)
