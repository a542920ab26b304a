"""FLUX family on a tiny offline FluxPipeline (1 dual + 1 single block, 2 heads × 64; prompt_embeds, no VAE).

The pipeline runs with ``tokenizer``/``text_encoder`` ``None`` and ``output_type="latent"``; true CFG (a negative
prompt) gives separate cond / uncond forwards, as in real FLUX.1 use.
"""

from __future__ import annotations

import pytest
import torch
from family_checks import FULL_REL_TOL, check_family, rel_l2

import dit_sparse
from dit_sparse import Profile
from dit_sparse.pipelines import family_for
from dit_sparse.pipelines.flux import grid_from_img_ids

# latent grids (H', W') = (7, 9) and (10, 6): 63 and 60 image tokens (+ 8 text), not multiples of the 16-token block
RES = [dict(height=112, width=144), dict(height=160, width=96)]
TEXT_DIM = 32


def tiny_flux_transformer(num_layers: int = 1, num_single_layers: int = 1, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2×2 by the pipeline
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=(16, 24, 24),
    ).eval()


def embeds(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, TEXT_DIM, generator=g), torch.randn(batch, TEXT_DIM, generator=g)


def run(pipe, height=112, width=144, steps=2, cfg=4.0, batch=1, seed=0):
    pe, pooled = embeds(batch, 8, 1)
    kw = {}
    if cfg > 1:
        npe, npooled = embeds(batch, 8, 7)  # FluxPipeline needs the same shape as prompt_embeds
        kw = dict(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled, true_cfg_scale=cfg)
    return pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kw,
    ).images


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    p = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux_transformer(),
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_standard_family_checks(pipe):
    res = check_family(pipe, run, RES, block_size=16)
    assert res["sparse_density"] is not None and res["sparse_density"] < 1.0


def test_batch_of_two_prompts(pipe):
    ref = run(pipe, batch=2, **RES[1])
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, batch=2, **RES[1]), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as h:
        assert rel_l2(run(pipe, batch=2, **RES[1]), ref) < FULL_REL_TOL
        rep = h.report()
        assert rep.steps == 2 and rep.forwards == 4 and rep.grids == [(1, 10, 6)]


def test_single_stream_blocks_are_sparsified(pipe):
    tr = pipe.transformer
    fam = family_for(tr)
    assert [n for n, _ in fam.self_attention_modules(tr)] == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
    ]
    ref = run(pipe, **RES[0])
    for sparse_layer in (0, 1):  # only the dual block, then only the single block, runs sparse
        prof = Profile.uniform(tr, "window", {"f": 0, "h": 1, "w": 1}, block_size=16)
        prof.schedule.dense_layers = [1 - sparse_layer]
        with dit_sparse.apply(pipe, prof) as h:
            out = run(pipe, **RES[0])
            rep = h.report()
        assert {layer for layer, _ in rep.density} == {sparse_layer}
        assert all(layer == 1 - sparse_layer for layer, _ in rep.dense)
        assert not torch.equal(out, ref) and rel_l2(out, ref) < 0.5


def test_fingerprint_counts_dual_and_single_layers():
    tr = tiny_flux_transformer(num_layers=2, num_single_layers=3)
    fp = Profile.dense(tr).fingerprint
    assert fp.num_layers == 5 and fp.num_heads == 2 and fp.head_dim == 64
    assert family_for(tr).name == "flux"


def _ids(frames: list[tuple[int, int]], dtype=torch.float32) -> torch.Tensor:
    parts = []
    for f, (h, w) in enumerate(frames):
        ids = torch.zeros(h, w, 3)
        ids[..., 0] = f
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        parts.append(ids.reshape(h * w, 3))
    return torch.cat(parts).to(dtype)


def test_grid_from_img_ids():
    assert grid_from_img_ids(_ids([(7, 9)]), 63) == (1, 7, 9)
    assert grid_from_img_ids(_ids([(7, 9)])[None], 63) == (1, 7, 9)  # deprecated 3-D ids
    # Kontext: a reference image of the same size is a second frame
    assert grid_from_img_ids(_ids([(5, 4), (5, 4)]), 40) == (2, 5, 4)
    assert grid_from_img_ids(_ids([(2, 300)], torch.bfloat16), 600) == (1, 2, 300)  # bf16 ids round above 256
    with pytest.raises(ValueError, match="different sizes"):
        grid_from_img_ids(_ids([(5, 4), (4, 5)]), 40)
    with pytest.raises(ValueError, match="raster"):
        grid_from_img_ids(_ids([(5, 4)]).flip(0), 20)
    with pytest.raises(ValueError, match="image tokens"):
        grid_from_img_ids(_ids([(5, 4)]), 21)


def test_kontext_style_reference_image_direct_forward(pipe):
    """Target + same-size reference image (frame ids 0 and 1), driven through the transformer directly."""
    tr = pipe.transformer
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(1, 2 * 35, 16, generator=g)
    ehs, pooled = embeds(1, 8, 4)
    kw = dict(
        hidden_states=hs,
        encoder_hidden_states=ehs,
        pooled_projections=pooled,
        timestep=torch.tensor([0.5]),
        img_ids=_ids([(5, 7), (5, 7)]),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
    with torch.no_grad():
        ref = tr(**kw)[0]
        with dit_sparse.apply(tr, Profile.dense(tr)):
            assert torch.equal(tr(**kw)[0], ref)
        with dit_sparse.apply(tr, Profile.uniform(tr, "full", block_size=16)) as h:
            assert rel_l2(tr(**kw)[0], ref) < FULL_REL_TOL
            assert h.report().grids == [(2, 5, 7)]
        window = Profile.uniform(tr, "window", {"f": 0, "h": 1, "w": 1}, block_size=16)
        with dit_sparse.apply(tr, window) as h:
            out = tr(**kw)[0]
            assert h.report().sparse_density() < 1.0 and not torch.equal(out, ref)
        with (
            dit_sparse.apply(tr, Profile.dense(tr)),
            pytest.raises(NotImplementedError, match="attention_mask"),
        ):
            tr(**kw, joint_attention_kwargs={"attention_mask": torch.ones(1, 1, 1, 78, dtype=torch.bool)})
        with dit_sparse.apply(tr, Profile.dense(tr)), pytest.raises(NotImplementedError, match="IP-Adapter"):
            tr(**kw, joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(1, 4)]})
