"""Mochi family: tiny MochiPipeline (2 layers, 2 heads × 64) driven offline by prompt embeddings and masks (no
tokenizer, text encoder or VAE: output_type="latent"); CFG batches uncond and cond in one forward (B=2) with a
different text padding per sample, which the stock processor handles in a per-sample loop."""

from __future__ import annotations

import pytest
import torch
from family_checks import check_family, rel_l2

import dit_sparse
from dit_sparse import Profile

TEXT_DIM, TEXT_LEN = 16, 8
# latent grids (F', H', W') = (5, 3, 5) and (4, 2, 7): 75 and 56 video tokens, neither a multiple of 16
RESOLUTIONS = [dict(height=48, width=80, frames=25), dict(height=32, width=112, frames=19)]
WINDOW = ("window", {"f": 0, "h": 1, "w": 1})
# diffusers' MochiRoPE runs torch.autocast(..., torch.float32) on CPU, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def tiny_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=64,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        qk_norm="rms_norm",
        text_embed_dim=TEXT_DIM,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=TEXT_LEN,
    ).eval()
    with torch.no_grad():  # zero-initialised learned RoPE frequencies would make RoPE the identity
        transformer.pos_frequencies.normal_(0.0, 1.0)
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int, seed: int, valid: list[int] | None = None, length: int = TEXT_LEN):
    """(prompt_embeds, mask): ``valid[b]`` real tokens then padding (random values, masked out)."""
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(batch, length, TEXT_DIM, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(valid or []):
        mask[b, n:] = 0
    return pe, mask


def run(pipe, height=48, width=80, frames=25, steps=2, cfg=4.5, batch=1, seed=0, prompt=None, negative=None):
    pe, mask = prompt if prompt is not None else embeds(batch, 1, [5] * batch)
    kw = {}
    if cfg > 1:
        npe, nmask = negative if negative is not None else embeds(batch, 7, [3] * batch)
        kw = dict(negative_prompt_embeds=npe, negative_prompt_attention_mask=nmask)
    return pipe(
        prompt_embeds=pe,
        prompt_attention_mask=mask,
        guidance_scale=cfg,
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
    assert fam.name == "mochi"
    assert [n for n, _ in fam.self_attention_modules(t)] == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]
    assert Profile.dense(t).fingerprint.num_layers == 2
    assert not hasattr(t, "attn_processors")  # no AttentionMixin: the shared one-liner check is skipped


def test_shared_checks(pipe):
    res = check_family(pipe, run, RESOLUTIONS, block_size=16, sparse_pattern=WINDOW)
    assert res["sparse_density"] is not None and res["sparse_density"] < 1.0
    for out, ref in zip(res["sparse_outs"], res["refs"]):
        assert rel_l2(out, ref) > 1e-4  # the window profile really changed something


def test_apply_remove_restores_processors(pipe):
    from dit_sparse.integration import SparseApplyError

    mods = [b.attn1 for b in pipe.transformer.transformer_blocks]
    originals = [m.processor for m in mods]
    handle = dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, *WINDOW, block_size=16))
    try:
        assert all(isinstance(m.processor, dit_sparse.SparseProcessor) for m in mods)
        with pytest.raises(SparseApplyError):
            dit_sparse.apply(pipe, Profile.dense(pipe.transformer))
    finally:
        handle.remove()
    assert all(m.processor is p for m, p in zip(mods, originals))
    assert "set_processor" not in type(mods[0]).__dict__  # only the instances got the method, not the class


def test_two_prompts_match_dense(pipe):
    # B=4 per forward ([uncond ×2, cond ×2]) with four different paddings
    prompt = embeds(2, 3, [5, 8])
    negative = embeds(2, 9, [2, 6])
    ref = run(pipe, prompt=prompt, negative=negative)
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, prompt=prompt, negative=negative), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as handle:
        assert rel_l2(run(pipe, prompt=prompt, negative=negative), ref) < 1e-4
        assert handle.report().density


def test_mask_with_holes_matches_stock(pipe):
    """The stock processor keeps nonzero(mask) wherever the zeros are and packs the valid text outputs first; the
    plugin mirrors that exactly (dense) and within kernel rounding (all blocks sparse)."""
    pe, _ = embeds(1, 5)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 0, 0]])
    npe, nmask = embeds(1, 6, [4])
    args = dict(prompt=(pe, mask), negative=(npe, nmask))
    ref = run(pipe, **args)
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, **args), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)):
        assert rel_l2(run(pipe, **args), ref) < 1e-4


def test_padded_prompt_equals_unpadded(pipe):
    """Mochi ignores padded text (dropped keys, masked pooling): so must the sparse attention."""
    n = 5
    pe, _ = embeds(1, 11)
    npe, _ = embeds(1, 12)
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    mask[:, :n] = 1
    short = dict(prompt=(pe[:, :n], torch.ones(1, n, dtype=torch.long)), negative=(npe[:, :n], mask[:, :n]))
    padded = dict(
        prompt=(pe, mask), negative=(npe, mask)
    )  # padded rows hold random values: the mask hides them

    dense_short = run(pipe, **short)
    assert rel_l2(run(pipe, **padded), dense_short) < 1e-5  # the model itself ignores padding

    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, *WINDOW, block_size=16)):
        sparse_short = run(pipe, **short)
        sparse_padded = run(pipe, **padded)
    assert rel_l2(sparse_padded, sparse_short) < 1e-5
    assert rel_l2(sparse_short, dense_short) > 1e-4  # and it did run sparse
