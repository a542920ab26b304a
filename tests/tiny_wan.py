"""Tiny offline Wan pipeline (2 heads × 64, 2 layers) driven by prompt_embeds: no hub, no tokenizer."""

from __future__ import annotations

import torch


def tiny_wan_transformer(seed: int = 0, num_layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()


def tiny_wan_pipeline(seed: int = 0, num_layers: int = 2, transformer_2: bool = False):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    kwargs = {}
    if transformer_2:
        kwargs = {"transformer_2": tiny_wan_transformer(seed + 1, num_layers), "boundary_ratio": 0.5}
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(seed, num_layers),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_text_wan_pipeline(words: list[str]):
    """A tiny WanPipeline *with* a word-level tokenizer over ``words`` and a 2-layer UMT5 text encoder, as a user's
    saved pipeline would have: loads offline with ``from_pretrained`` once saved to a folder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(),
    )


def prompt_embeds(batch: int = 1, seq: int = 8, dim: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=g)


def run(pipe, height=32, width=48, frames=9, steps=3, cfg=5.0, batch=1, seed=0, output_type="latent"):
    kw = {}
    if cfg > 1:
        kw["negative_prompt_embeds"] = prompt_embeds(batch, seed=7)
    out = pipe(
        prompt_embeds=prompt_embeds(batch),
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        **kw,
    )
    return out.frames
