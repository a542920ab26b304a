"""PixArt family: a tiny PixArtAlphaPipeline, offline.

The transformer is built from a config (2 heads × 64, 2 ``BasicTransformerBlock`` layers, ``ada_norm_single``,
learned sigma). The pipeline runs with no tokenizer or text encoder (``prompt_embeds`` + ``prompt_attention_mask``
and their negatives), no VAE (``output_type="latent"``), no resolution binning, CFG on (one batched cond/uncond
forward per step).
"""

from __future__ import annotations

import pytest
import torch
from family_checks import FULL_REL_TOL, check_family, rel_l2

import dit_sparse
from dit_sparse import Profile
from dit_sparse.pipelines import family_for

TEXT_LEN = 8
CAPTION_DIM = 32
# latents 22×18 and 14×18 → grids 11×9 and 7×9 → 99 and 63 tokens: not multiples of the 16-token block
RESOLUTIONS = [{"height": 176, "width": 144}, {"height": 112, "width": 144}]
WINDOW = ("window", {"f": 0, "h": 1, "w": 1})
# diffusers' DPMSolverMultistepScheduler.set_timesteps trips a NumPy 2 copy-keyword DeprecationWarning (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def tiny_pixart_transformer(seed: int = 0, head_dim: int = 64, num_layers: int = 2):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,  # learned sigma, as the real checkpoints
        num_layers=num_layers,
        cross_attention_dim=2 * head_dim,  # = heads × head_dim, as the real checkpoints
        caption_channels=CAPTION_DIM,
        sample_size=8,
        patch_size=2,
        norm_type="ada_norm_single",
    ).eval()


def tiny_pixart_pipeline(seed: int = 0):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=tiny_pixart_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int, seed: int, valid: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    mask[:, :valid] = 1
    return torch.randn(batch, TEXT_LEN, CAPTION_DIM, generator=g), mask


def run(pipe, height=176, width=144, steps=2, cfg=4.5, batch=1, seed=0, **kwargs):
    prompt, mask = embeds(batch, seed=1, valid=TEXT_LEN - 2)  # padded prompt: the cross-attention masks it
    neg, neg_mask = embeds(batch, seed=7)
    out = pipe(
        prompt_embeds=prompt,
        prompt_attention_mask=mask,
        negative_prompt=None,  # the default "" would need a tokenizer
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        use_resolution_binning=False,
        **kwargs,
    )
    return out.images


@pytest.fixture(scope="module")
def pipe():
    return tiny_pixart_pipeline()


def test_family_checks(pipe):
    result = check_family(pipe, run, RESOLUTIONS, block_size=16, sparse_pattern=WINDOW)
    assert result["sparse_density"] is not None and result["sparse_density"] < 1.0
    for ref, out in zip(result["refs"], result["sparse_outs"]):
        assert not torch.equal(ref, out)  # the window profile really changed something


def test_layers_and_fingerprint(pipe):
    t = pipe.transformer
    family = family_for(t)
    assert family.name == "pixart" and family.text_position == "none"
    paths = [p for p, _ in family.self_attention_modules(t)]
    assert paths == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]  # attn2 = cross-attention
    assert Profile.dense(t).fingerprint.num_layers == len(t.transformer_blocks) == 2
    from diffusers.models.attention_processor import AttnProcessor2_0

    cross = t.transformer_blocks[0].attn2
    cross_proc = cross.processor
    with dit_sparse.apply(pipe, Profile.uniform(t, *WINDOW, block_size=16)):
        assert cross.processor is cross_proc  # cross-attention is not touched
    assert isinstance(family.dense_processor(cross), AttnProcessor2_0)


def test_read_inputs(pipe):
    t = pipe.transformer
    hs = torch.zeros(2, 4, 23, 18)  # odd latent height: the model keeps floor(23 / 2) rows
    inputs = family_for(t).read_inputs(t, (hs,), {"timestep": torch.tensor([500, 500])})
    assert inputs.grid == (1, 11, 9)
    assert inputs.num_text == 0 and inputs.text_valid is None and inputs.batch_size == 2


def test_two_prompts_dense_and_full(pipe):
    ref = run(pipe, batch=2, **RESOLUTIONS[1])
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, batch=2, **RESOLUTIONS[1]), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as handle:
        assert rel_l2(run(pipe, batch=2, **RESOLUTIONS[1]), ref) < FULL_REL_TOL
        assert handle.report().density


def test_new_run_detected_without_cache_reset(pipe):
    """PixArt's transformer has no CacheMixin (no hook reset between calls): a rising timestep starts a new run."""
    assert family_for(pipe.transformer).resets_each_run is False
    res = RESOLUTIONS[1]
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, *WINDOW, block_size=16)) as handle:
        run(pipe, steps=2, **res)
        rep = handle.report()
        assert (rep.steps, rep.forwards) == (2, 2)  # CFG batched: one forward per step
        assert sorted(k[1] for k in rep.density) == [0, 0, 1, 1]
        run(pipe, steps=3, **res)
        rep = handle.report()
        assert (rep.steps, rep.forwards) == (3, 3)
        assert len(handle.bindings[0].runs) == 2


def _transformer_inputs(height=14, width=18, attention_mask=None):
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(2, 4, height, width, generator=g),
        "encoder_hidden_states": torch.randn(2, TEXT_LEN, CAPTION_DIM, generator=g),
        "timestep": torch.tensor([700, 700]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return kwargs


def test_real_head_dim_72_transformer():
    """Real PixArt checkpoints use head_dim 72: the kernels pad it. Transformer called directly (root hook)."""
    t = tiny_pixart_transformer(seed=3, head_dim=72, num_layers=1)
    kwargs = _transformer_inputs()
    with torch.no_grad():
        ref = t(**kwargs).sample
        with dit_sparse.apply(t, Profile.dense(t)):
            assert torch.equal(t(**kwargs).sample, ref)
        with dit_sparse.apply(t, Profile.uniform(t, "full", block_size=16)) as handle:
            assert rel_l2(t(**kwargs).sample, ref) < FULL_REL_TOL
            assert handle.report().grids == [(1, 7, 9)] and handle.report().density
        assert torch.equal(t(**kwargs).sample, ref)


def test_self_attention_key_mask_is_not_ignored():
    """An image-token key mask (PixArt forward's optional attention_mask) is applied on dense layers and refused by
    sparse ones, never silently dropped."""
    t = tiny_pixart_transformer(seed=4, num_layers=1)
    mask = torch.ones(2, 7 * 9, dtype=torch.long)
    mask[:, -5:] = 0
    kwargs = _transformer_inputs(attention_mask=mask)
    with torch.no_grad():
        ref = t(**kwargs).sample
        with dit_sparse.apply(t, Profile.dense(t)):
            assert torch.equal(t(**kwargs).sample, ref)
        with (
            dit_sparse.apply(t, Profile.uniform(t, "full", block_size=16)),
            pytest.raises(RuntimeError, match="attention_mask"),
        ):
            t(**kwargs)
