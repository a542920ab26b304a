"""HunyuanVideo family: tiny HunyuanVideoPipeline (1 dual + 1 single block, 2 heads × 64) driven offline by
prompt embeddings (no tokenizers, text encoders or VAE: output_type="latent"), true CFG on (separate cond and
uncond forwards), text padded through the prompt attention masks."""

from __future__ import annotations

import pytest
import torch
from family_checks import check_family, rel_l2

import dit_sparse
from dit_sparse import Profile

TEXT_DIM, POOLED_DIM, TEXT_LEN = 16, 8, 8
# latent grids (F', H', W') = (5, 3, 5) and (4, 2, 7): 75 and 56 video tokens, neither a multiple of 16
RESOLUTIONS = [dict(height=48, width=80, frames=17), dict(height=32, width=112, frames=13)]
WINDOW = ("window", {"f": 0, "h": 1, "w": 1})


def tiny_pipeline(seed: int = 0):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=64,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=1.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=(16, 24, 24),
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int, seed: int, valid: list[int] | None = None, length: int = TEXT_LEN):
    """(prompt_embeds, pooled, mask): ``valid[b]`` real tokens then padding (random values, masked out)."""
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(batch, length, TEXT_DIM, generator=g)
    pooled = torch.randn(batch, POOLED_DIM, generator=g)
    mask = torch.ones(batch, length)
    for b, n in enumerate(valid or []):
        mask[b, n:] = 0
    return pe, pooled, mask


def run(pipe, height=48, width=80, frames=17, steps=2, cfg=2.0, batch=1, seed=0, prompt=None, negative=None):
    pe, pooled, mask = prompt if prompt is not None else embeds(batch, 1, [5] * batch)
    kw = {}
    if cfg > 1:
        npe, npooled, nmask = negative if negative is not None else embeds(batch, 7)
        kw = dict(
            negative_prompt_embeds=npe,
            negative_pooled_prompt_embeds=npooled,
            negative_prompt_attention_mask=nmask,
        )
    return pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        prompt_attention_mask=mask,
        true_cfg_scale=cfg,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kw,
    ).frames


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_layers_and_family(pipe):
    from dit_sparse.pipelines import family_for

    t = pipe.transformer
    fam = family_for(t)
    assert fam.name == "hunyuan_video"
    paths = [n for n, _ in fam.self_attention_modules(t)]
    assert paths == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]  # refiner not included
    assert Profile.dense(t).fingerprint.num_layers == 2
    assert Profile.dense(t).fingerprint.patch_size == [1, 2, 2]


def test_shared_checks(pipe):
    res = check_family(pipe, run, RESOLUTIONS, block_size=16, sparse_pattern=WINDOW)
    assert res["sparse_density"] is not None and res["sparse_density"] < 1.0
    for out, ref in zip(res["sparse_outs"], res["refs"]):
        assert rel_l2(out, ref) > 1e-4  # the window profile really changed something


def test_token_refiner_keeps_stock_processor(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    refiner = pipe.transformer.context_embedder.token_refiner.refiner_blocks[0].attn
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, *WINDOW, block_size=16)):
        assert type(refiner.processor) is AttnProcessor2_0
        run(pipe, steps=1)


def test_two_prompts_match_dense(pipe):
    # B=2 per forward with different padding per prompt (5 and 8 real tokens)
    prompt = embeds(2, 3, [5, 8])
    negative = embeds(2, 9, [2, 6])
    ref = run(pipe, prompt=prompt, negative=negative)
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, prompt=prompt, negative=negative), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as handle:
        assert rel_l2(run(pipe, prompt=prompt, negative=negative), ref) < 1e-4  # per-sample padded path
        assert handle.report().density


def test_padded_prompt_equals_unpadded(pipe):
    """HunyuanVideo ignores padded text (key-padding mask, masked pooling): so must the sparse attention."""
    pe, pooled, _ = embeds(1, 11, length=TEXT_LEN)
    n = 5
    short = (pe[:, :n], pooled, torch.ones(1, n))
    padded_mask = torch.ones(1, TEXT_LEN)
    padded_mask[:, n:] = 0
    padded = (pe, pooled, padded_mask)  # the padded rows hold random values: the mask must hide them
    neg = embeds(1, 12, length=n)
    neg_padded = (torch.cat([neg[0], torch.randn(1, TEXT_LEN - n, TEXT_DIM)], 1), neg[1], padded_mask)

    dense_short = run(pipe, prompt=short, negative=neg)
    dense_padded = run(pipe, prompt=padded, negative=neg_padded)
    assert rel_l2(dense_padded, dense_short) < 1e-5  # the model itself ignores padding

    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, *WINDOW, block_size=16)):
        sparse_short = run(pipe, prompt=short, negative=neg)
        sparse_padded = run(pipe, prompt=padded, negative=neg_padded)
    assert rel_l2(sparse_padded, sparse_short) < 1e-5
    assert rel_l2(sparse_short, dense_short) > 1e-4  # and it did run sparse


def test_single_stream_block_runs_sparse(pipe):
    """Only the single-stream layer (profile layer 1) sparse: the kernel runs there and changes the output."""
    ref = run(pipe)
    prof = Profile.uniform(pipe.transformer, *WINDOW, block_size=16)
    prof.schedule.dense_layers = [0]
    with dit_sparse.apply(pipe, prof) as handle:
        out = run(pipe)
        rep = handle.report()
    assert set(rep.per_layer()) == {0, 1}
    assert {layer for layer, _ in rep.density} == {1}
    assert all(reason == "dense layer" for (layer, _), reason in rep.dense.items() if layer == 0)
    assert rel_l2(out, ref) > 1e-4
    assert rep.steps == 2 and rep.forwards == 4  # 2 steps × (cond, uncond)
