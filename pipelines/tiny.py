"""The bundled tiny text-to-video model: a stock diffusers ``WanPipeline`` small enough for a CPU.

Until the trained weights land (they will live in ``pipelines/tiny_model/`` as a ``from_pretrained`` folder made by
:mod:`~dit_sparse.pipelines.tiny_train`), the default is an **untrained** model built from the configs below with a
fixed seed: its videos are noise, but the whole path (pipeline, hook, processors, kernels, metrics, mp4s) is the real
one, and attention dominates its cost exactly as in a real video DiT (4,352 video tokens per self-attention at the
default size). The training recipe targets :data:`TRAINED_CANVAS` (4,356 tokens), which becomes the default with
the weights.

Prompts become text embeddings through a tiny deterministic word embedding (each word hashed to a seeded vector), so
no tokenizer, text encoder or hub download is needed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

MODEL_DIR = Path(__file__).parent / "tiny_model"
TEXT_DIM = 64
TEXT_LEN = 16
# prompt padding of the training script's full-length fine-tune (``max_sequence_length`` for a trained model)
TEXT_LENGTH = 16

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 1, 1),  # 1×1 patches: 128×128 px → 16×16 tokens per latent frame, cheap VAE, many tokens
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=256,
)
# Wan 2.2-style pixel patchify (2×2) before two 2× downsamplings: 8× spatial, 4× causal temporal compression,
# cheap at full resolution (the first convolution runs at half resolution)
VAE_CONFIG: dict[str, Any] = dict(
    base_dim=16,
    z_dim=16,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[True, True],
    patch_size=2,
    in_channels=12,
    out_channels=12,
    scale_factor_spatial=8,
    scale_factor_temporal=4,
)
# the canvas the training recipe generates (33 frames × 176²: 9 × 22 × 22 = 4,356 tokens; the shape moves one latent
# cell per latent frame and its 64 px path fits); it replaces DEFAULTS' size when the trained weights ship
TRAINED_CANVAS: dict[str, int] = dict(height=176, width=176, num_frames=33)
DEFAULTS: dict[str, Any] = dict(
    height=128, width=128, num_frames=65, num_inference_steps=16, guidance_scale=5.0
)


def is_trained() -> bool:
    return (MODEL_DIR / "model_index.json").is_file()


def load_tiny_pipeline(seed: int = 0) -> Any:
    """The bundled model: trained weights from ``pipelines/tiny_model/`` when present, else the seeded untrained one."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    if is_trained():
        pipe = WanPipeline.from_pretrained(str(MODEL_DIR), local_files_only=True)
    else:
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG).eval()
            vae = AutoencoderKLWan(**VAE_CONFIG).eval()
        finally:
            torch.random.set_rng_state(gen_state)
        pipe = WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            transformer=transformer,
        )
    return pipe


def prompt_kwargs(pipe: Any, prompt: str, negative_prompt: str = "") -> dict[str, Any]:
    """The prompt arguments of a call of the bundled pipeline: a trained model's own tokenizer and text encoder
    with its training padding (``max_sequence_length`` = :data:`TEXT_LENGTH`), or the untrained model's seeded word
    embedding."""
    if getattr(pipe, "text_encoder", None) is not None:
        return {"prompt": prompt, "negative_prompt": negative_prompt, "max_sequence_length": TEXT_LENGTH}
    dtype = pipe.transformer.dtype
    return {
        "prompt_embeds": embed_prompt(prompt).to(pipe.device, dtype),
        "negative_prompt_embeds": embed_prompt(negative_prompt).to(pipe.device, dtype),
    }


def embed_prompt(prompt: str, length: int = TEXT_LEN, dim: int = TEXT_DIM) -> torch.Tensor:
    """``(1, length, dim)`` text embedding: one seeded vector per word (sha256 of the word), zero-padded."""
    words = prompt.lower().split()[:length]
    rows = []
    for word in words:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        rows.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    out = torch.zeros(1, length, dim)
    if rows:
        out[0, : len(rows)] = torch.stack(rows)
    return out
