"""Qwen-Image family on a tiny offline QwenImagePipeline (2 layers, 2 heads × 64; prompt_embeds + masks, no VAE).

The pipeline runs with ``tokenizer``/``text_encoder`` ``None`` and ``output_type="latent"``; true CFG (a negative
prompt) gives separate cond / uncond forwards. Text padding goes through ``prompt_embeds_mask``.
"""

from __future__ import annotations

import pytest
import torch
from family_checks import FULL_REL_TOL, check_family, rel_l2

import dit_sparse
from dit_sparse import Profile
from dit_sparse.pipelines import family_for
from dit_sparse.pipelines.qwen_image import grid_from_img_shapes

# latent grids (H', W') = (7, 9) and (10, 6): 63 and 60 image tokens (+ text), not multiples of the 16-token block
RES = [dict(height=112, width=144), dict(height=160, width=96)]
TEXT_DIM = 32
WINDOW = ("window", {"f": 0, "h": 1, "w": 1})


def tiny_qwen_transformer(num_layers: int = 2, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2×2 by the pipeline
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(16, 24, 24),
    ).eval()


def embeds(lengths: list[int], seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeds (len(lengths), seq, D) whose row b has lengths[b] real tokens, then random padding, + mask."""
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(len(lengths), seq, TEXT_DIM, generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return pe, mask


def run(pipe, height=112, width=144, steps=2, cfg=4.0, lengths=(8,), seq=None, seed=0, neg_lengths=None):
    lengths = list(lengths)
    seq = seq or max(lengths)
    pe, mask = embeds(lengths, seq, 1)
    pe = pe.clone()
    for b, n in enumerate(lengths):  # real tokens do not depend on how much padding follows
        pe[b, :n] = embeds([n], n, 11 + b)[0][0]
    kw = {}
    if cfg > 1:
        npe, nmask = embeds(list(neg_lengths or [6] * len(lengths)), 6, 7)
        kw = dict(negative_prompt_embeds=npe, negative_prompt_embeds_mask=nmask, true_cfg_scale=cfg)
    return pipe(
        prompt_embeds=pe,
        prompt_embeds_mask=mask,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kw,
    ).images


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    p = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=tiny_qwen_transformer(),
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_standard_family_checks(pipe):
    res = check_family(pipe, run, RES, block_size=16)
    assert res["sparse_density"] is not None and res["sparse_density"] < 1.0


def test_batch_of_two_prompts_with_different_padding(pipe):
    kw = dict(lengths=(8, 5), seq=10, neg_lengths=(6, 3), **RES[1])  # every prompt padded, differently
    ref = run(pipe, **kw)
    with dit_sparse.apply(pipe, Profile.dense(pipe.transformer)):
        assert torch.equal(run(pipe, **kw), ref)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "full", block_size=16)) as h:
        assert rel_l2(run(pipe, **kw), ref) < FULL_REL_TOL
        rep = h.report()
        assert rep.steps == 2 and rep.forwards == 4 and rep.grids == [(1, 10, 6)]


def test_padded_prompt_matches_unpadded_prompt(pipe):
    # the model itself ignores padded text: padded and unpadded prompts give the same image (up to rounding) ...
    plain = run(pipe, lengths=(8,), **RES[0])
    padded = run(pipe, lengths=(8,), seq=13, **RES[0])
    assert rel_l2(padded, plain) < 1e-5
    # ... and so does the sparse path: padded text keys are dropped, real tokens run on the unpadded layout
    prof = Profile.uniform(pipe.transformer, *WINDOW, block_size=16)
    with dit_sparse.apply(pipe, prof) as h:
        sparse_plain = run(pipe, lengths=(8,), **RES[0])
        sparse_padded = run(pipe, lengths=(8,), seq=13, **RES[0])
        assert h.report().sparse_density() < 1.0
    assert not torch.equal(sparse_plain, plain)
    assert rel_l2(sparse_padded, sparse_plain) < 1e-5


def test_layers_and_fingerprint(pipe):
    tr = pipe.transformer
    assert [n for n, _ in family_for(tr).self_attention_modules(tr)] == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
    ]
    assert Profile.dense(tr).fingerprint.num_layers == 2
    fp = Profile.dense(tiny_qwen_transformer(num_layers=3)).fingerprint
    assert fp.num_layers == 3 and fp.num_heads == 2 and fp.head_dim == 64
    assert type(family_for(tr).dense_processor(tr.transformer_blocks[0].attn)).__name__ == (
        "QwenDoubleStreamAttnProcessor2_0"
    )


def test_grid_from_img_shapes():
    assert grid_from_img_shapes([[(1, 7, 9)]] * 2) == (1, 7, 9)  # QwenImagePipeline
    assert grid_from_img_shapes([(1, 7, 9)] * 2) == (1, 7, 9)  # controlnet pipelines
    assert grid_from_img_shapes([[(1, 5, 4), (1, 5, 4)]]) == (2, 5, 4)  # edit: same-size reference image
    with pytest.raises(ValueError, match="different sizes"):
        grid_from_img_shapes([[(1, 5, 4), (1, 4, 5)]])
    with pytest.raises(ValueError, match="img_shapes"):
        grid_from_img_shapes(None)


def test_edit_style_reference_image_direct_forward(pipe):
    """Target + same-size reference image (img_shapes with two entries), driven through the transformer directly."""
    tr = pipe.transformer
    g = torch.Generator().manual_seed(3)
    pe, mask = embeds([5], 8, 4)
    kw = dict(
        hidden_states=torch.randn(1, 2 * 35, 16, generator=g),
        encoder_hidden_states=pe,
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 5, 7), (1, 5, 7)]],
        return_dict=False,
    )
    with torch.no_grad():
        ref = tr(**kw)[0]
        with dit_sparse.apply(tr, Profile.dense(tr)):
            assert torch.equal(tr(**kw)[0], ref)
        with dit_sparse.apply(tr, Profile.uniform(tr, "full", block_size=16)) as h:
            assert rel_l2(tr(**kw)[0], ref) < FULL_REL_TOL
            assert h.report().grids == [(2, 5, 7)]
