"""LTX-Video family on a tiny offline ``LTXPipeline`` (``tokenizer=None, text_encoder=None, vae=None``: the pipeline
then assumes VAE factors 32 x 8; ``prompt_embeds`` + padded ``prompt_attention_mask``; ``output_type="latent"``).

Self-attention (``attn1``) is video only; ``attn2`` is cross-attention to the (padded) prompt and stays on the stock
processor. The grid comes from the ``num_frames``/``height``/``width`` kwargs, or from ``video_coords`` as
``LTXConditionPipeline`` passes them; that pipeline needs a real VAE to encode its conditions, so its transformer
call is reproduced in a short manual denoising loop (still through ``apply()`` and the root hook).
"""

from __future__ import annotations

import pytest
import torch
from family_checks import FULL_REL_TOL, check_family, rel_l2

import dit_sparse
from dit_sparse import Profile, SparseProcessor
from dit_sparse.pipelines import family_for
from dit_sparse.pipelines.ltx import grid_from_video_coords

TEXT_DIM = 16
TEXT_LEN = 8
IN_CH = 8
# latent grids (F', H', W') = (3, 5, 7) and (2, 3, 9): 105 and 54 tokens, not multiples of the 16-token block
RES = [dict(height=160, width=224, frames=17), dict(height=96, width=288, frames=9)]


def tiny_ltx_transformer(seed: int = 0):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=IN_CH,
        out_channels=IN_CH,
        num_attention_heads=2,
        attention_head_dim=64,
        cross_attention_dim=128,  # = heads x head_dim: attn2 attends to the projected caption
        num_layers=2,
        caption_channels=TEXT_DIM,
    ).eval()


def tiny_ltx_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_ltx_transformer(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int, valid: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    e = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, :valid] = True
    return e, mask


def run(pipe, height=160, width=224, frames=17, steps=2, cfg=3.0, batch=1, seed=0, valid=6, **kw):
    pe, pm = embeds(batch, valid, seed=1)
    if cfg > 1:
        ne, nm = embeds(batch, 3, seed=7)
        kw.update(negative_prompt_embeds=ne, negative_prompt_attention_mask=nm)
    return pipe(
        prompt_embeds=pe,
        prompt_attention_mask=pm,
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
    return tiny_ltx_pipeline()


def test_family_is_registered_and_fingerprint(pipe):
    fam = family_for(pipe.transformer)
    assert fam.name == "ltx" and fam.text_position == "none"
    fp = Profile.dense(pipe.transformer).fingerprint
    assert fp.num_layers == len(pipe.transformer.transformer_blocks) == 2
    assert (fp.num_heads, fp.head_dim, fp.patch_size) == (2, 64, [1, 1, 1])
    assert [n for n, _ in fam.self_attention_modules(pipe.transformer)] == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]


def test_standard_family_checks(pipe):
    res = check_family(pipe, run, RES, block_size=16)
    assert res["sparse_density"] is not None and res["sparse_density"] < 0.8


def test_cross_attention_is_left_alone(pipe):
    """apply() touches attn1 only; attn2 keeps its stock processor objects and the padded-prompt mask."""
    before = {n: m.processor for n, m in pipe.transformer.named_modules() if n.endswith("attn2")}
    sparse = Profile.uniform(pipe.transformer, "window", {"f": 0, "h": 1, "w": 1}, block_size=16)
    with dit_sparse.apply(pipe, sparse) as handle:
        for n, m in pipe.transformer.named_modules():
            if n.endswith("attn2"):
                assert m.processor is before[n]
            elif n.endswith("attn1"):
                assert isinstance(m.processor, SparseProcessor)
        a = run(pipe, steps=1, valid=6, **RES[1])
        b = run(pipe, steps=1, valid=4, **RES[1])
        assert not torch.equal(a, b)  # the cross-attention padding mask still reaches attn2
        rep = handle.report()
        assert rep.grids == [(2, 3, 9)] and rep.steps == 1 and rep.forwards == 1  # CFG batched in one forward


def test_batch_of_two_prompts(pipe):
    ref = run(pipe, batch=2, **RES[1])
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, batch=2, **RES[1]), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as handle:
        seen = []

        def grab(p, i, t, kw):  # the root hook's view of the forward that just ran (reset after the run)
            seen.append(handle.bindings[0].state.inputs)
            return {}

        assert rel_l2(run(pipe, batch=2, callback_on_step_end=grab, **RES[1]), ref) < FULL_REL_TOL
        assert seen[0].batch_size == 4 and seen[0].grid == (2, 3, 9)  # 2 prompts x (uncond, cond)


# ------------------------------------------------------------------------------------------- video_coords
def condition_coords(batch: int, f: int, h: int, w: int, cond_frames: int) -> torch.Tensor:
    """video_coords as LTXConditionPipeline builds them: condition tokens (frame_index 0) prepended to the video."""
    from diffusers import LTXConditionPipeline as P

    coords = P._scale_video_ids(P._prepare_video_ids(batch, f, h, w), 32, 8, 0)
    if cond_frames:
        cond = P._scale_video_ids(P._prepare_video_ids(batch, cond_frames, h, w), 32, 8, 0)
        coords = torch.cat([cond, coords], dim=2)
    coords = coords.float()
    coords[:, 0] = coords[:, 0] / 25.0  # frame_rate
    return coords


def test_grid_from_video_coords():
    assert grid_from_video_coords(condition_coords(2, 3, 5, 7, 0)) == (3, 5, 7)
    assert grid_from_video_coords(condition_coords(1, 3, 5, 7, 1)) == (
        4,
        5,
        7,
    )  # prefix frame counts as a frame
    assert grid_from_video_coords(condition_coords(1, 2, 1, 6, 0)) == (2, 1, 6)
    assert grid_from_video_coords(condition_coords(1, 2, 4, 1, 0)) == (2, 4, 1)
    assert grid_from_video_coords(condition_coords(1, 1, 1, 1, 0)) == (1, 1, 1)
    # long multi-prompt pipeline: tail frames get other frames' time coordinates; the layout is unchanged
    c = condition_coords(1, 4, 3, 5, 0)
    c[:, 0, -15:] = c[:, 0, :15]
    assert grid_from_video_coords(c) == (4, 3, 5)
    with pytest.raises(ValueError, match="not a raster"):
        grid_from_video_coords(torch.rand(1, 3, 30))
    shuffled = c[:, :, torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="not a raster"):
        grid_from_video_coords(shuffled)


def test_video_coords_manual_loop():
    """LTXConditionPipeline's transformer call (video_coords, one prepended condition frame, per-token timestep)."""
    transformer = tiny_ltx_transformer()
    f, h, w, cond = 2, 3, 5, 1
    n_cond, s = cond * h * w, (cond + f) * h * w
    coords = condition_coords(2, f, h, w, cond)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, s, IN_CH, generator=g)
    text = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)
    text_mask = torch.ones(2, TEXT_LEN, dtype=torch.long)
    text_mask[0, 5:] = 0
    cond_mask = torch.zeros(1, s)
    cond_mask[:, :n_cond] = 1.0

    def loop() -> torch.Tensor:
        x = x0.clone()
        for t in (1000.0, 500.0):
            inp = torch.cat([x, x])
            timestep = torch.min(torch.full((2, 1), t), (1 - torch.cat([cond_mask, cond_mask])) * 1000.0)
            with torch.no_grad(), transformer.cache_context("cond_uncond"):
                out = transformer(
                    hidden_states=inp,
                    encoder_hidden_states=text,
                    timestep=timestep,
                    encoder_attention_mask=text_mask,
                    video_coords=coords,
                    return_dict=False,
                )[0]
            uncond, cond_out = out.chunk(2)
            x = x - 0.5 * (uncond + 3.0 * (cond_out - uncond))
        return x

    ref = loop()
    with dit_sparse.apply(transformer, Profile.dense(transformer)):
        assert torch.equal(loop(), ref)
    with dit_sparse.apply(transformer, Profile.uniform(transformer, "full", block_size=16)) as handle:
        assert rel_l2(loop(), ref) < FULL_REL_TOL
        assert handle.report().grids == [(cond + f, h, w)] and handle.report().steps == 2
    sparse = Profile.uniform(transformer, "window", {"f": 0, "h": 1, "w": 1}, block_size=16)
    with dit_sparse.apply(transformer, sparse) as handle:
        out = loop()
        assert handle.report().sparse_density() < 1.0
    assert not torch.equal(out, ref) and rel_l2(out, ref) < 0.5
    assert torch.equal(loop(), ref)  # removed


def test_missing_grid_is_a_clear_error():
    transformer = tiny_ltx_transformer()
    fam = family_for(transformer)
    kw = dict(hidden_states=torch.zeros(1, 6, IN_CH), encoder_hidden_states=torch.zeros(1, 2, TEXT_DIM))
    with pytest.raises(ValueError, match="num_frames/height/width or video_coords"):
        fam.read_inputs(transformer, (), dict(kw, timestep=torch.ones(1)))
    assert fam.read_inputs(transformer, (), dict(kw, num_frames=1, height=2, width=3)).grid == (1, 2, 3)
