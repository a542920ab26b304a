"""The bundled tiny text-to-video model: a stock diffusers ``CogVideoXPipeline`` small enough for a CPU.

Its weights live in ``pipelines/tiny_model/`` as a ``from_pretrained`` folder made by
:mod:`~dit_sparse.pipelines.tiny_train` (model card and training figures inside). At the default canvas
(:data:`DEFAULTS`: 33 frames × 176², latent 9 × 22 × 22) every self-attention sees 4,356 video tokens (+ 16 text
tokens), so attention dominates its cost as in a real video DiT.

Why CogVideoX and not Wan: the CogVideoX-2B-style transformer adds *absolute* 3-D sin-cos positions to its tokens,
so it can learn where the shape is in every frame directly; Wan's relative 3-D RoPE forces the model to agree on one
path across all frames, which a 4-layer model trained on a CPU did not learn beyond 3–5 latent frames
(docs/tiny-model-training-notes.md). The positions are normalised to the canvas (:func:`position_scales`), which is
what lets the training script learn on small clips and then fine-tune at the default canvas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_DIR = Path(__file__).parent / "tiny_model"
TEXT_DIM = 64
# prompt padding in training and generation (``max_sequence_length``; the transformer's ``max_text_seq_length``)
TEXT_LENGTH = 16
# the canvas spans this many units of the sin-cos position grid across, and this many along time, whatever its size
SPACE_EXTENT = 4.0
TIME_EXTENT = 3.0
SPATIAL_COMPRESSION = 8
TEMPORAL_COMPRESSION = 4

# the canvas the model is trained for (33 frames × 176²: latent 9 × 22 × 22 = 4,356 tokens), the default of
# `dit-sparse generate`
TRAINED_CANVAS: dict[str, int] = dict(height=176, width=176, num_frames=33)
DEFAULTS: dict[str, Any] = dict(**TRAINED_CANVAS, num_inference_steps=16, guidance_scale=5.0)


def latent_shape(height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a canvas."""
    return (
        (num_frames - 1) // TEMPORAL_COMPRESSION + 1,
        height // SPATIAL_COMPRESSION,
        width // SPATIAL_COMPRESSION,
    )


def latent_position_scales(latent_frames: int, latent_rows: int) -> tuple[float, float]:
    """``(spatial_interpolation_scale, temporal_interpolation_scale)`` that map a latent grid of this many frames
    and rows onto the same normalised position range (:data:`SPACE_EXTENT` down the frame, :data:`TIME_EXTENT` along
    time): CogVideoX's sin-cos grid is ``index / scale``. Columns share the rows' scale, so a wide canvas shows a
    wider view at the same scale."""
    return latent_rows / SPACE_EXTENT, latent_frames / TIME_EXTENT


def position_scales(height: int, width: int, num_frames: int) -> tuple[float, float]:
    """:func:`latent_position_scales` of a canvas in pixels and frames."""
    frames, rows, _ = latent_shape(height, width, num_frames)
    return latent_position_scales(frames, rows)


def normalise_positions(transformer: Any) -> Any:
    """Make ``transformer`` (the bundled ``CogVideoXTransformer3DModel``) normalise its sin-cos positions to the
    canvas of every call, as in training, by a forward pre-hook on this instance's ``patch_embed`` (nothing global
    changes). Without it a canvas other than the trained one shows a crop or a tiling of the trained canvas. At the
    trained canvas the positions are the configured ones either way. Returns the hook's removable handle."""
    embed = transformer.patch_embed

    def set_scales(module: Any, args: tuple[Any, ...]) -> None:
        image_embeds = args[1]  # (batch, latent frames, channels, rows, columns)
        module.spatial_interpolation_scale, module.temporal_interpolation_scale = latent_position_scales(
            int(image_embeds.shape[1]), int(image_embeds.shape[3])
        )

    return embed.register_forward_pre_hook(set_scales)


_SPATIAL_SCALE, _TEMPORAL_SCALE = position_scales(**TRAINED_CANVAS)
_LATENT = latent_shape(**TRAINED_CANVAS)

TRANSFORMER_CONFIG: dict[str, Any] = dict(
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    time_embed_dim=128,
    text_embed_dim=TEXT_DIM,
    num_layers=4,
    sample_width=_LATENT[2],
    sample_height=_LATENT[1],
    sample_frames=TRAINED_CANVAS["num_frames"],
    patch_size=1,  # 1×1 patches: one token per latent cell
    max_text_seq_length=TEXT_LENGTH,
    use_rotary_positional_embeddings=False,  # CogVideoX-2B style: absolute 3-D sin-cos positions
    spatial_interpolation_scale=_SPATIAL_SCALE,
    temporal_interpolation_scale=_TEMPORAL_SCALE,
)
# 8× spatial (four levels), 4× causal temporal compression, 16 latent channels
VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    latent_channels=16,
    layers_per_block=1,
    norm_num_groups=8,
    temporal_compression_ratio=TEMPORAL_COMPRESSION,
    sample_height=TRAINED_CANVAS["height"],
    sample_width=TRAINED_CANVAS["width"],
)
# CogVideoX-2B's scheduler: v-prediction, zero terminal SNR, SNR shift 3, trailing timesteps
SCHEDULER_CONFIG: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=3.0,
    steps_offset=0,
    timestep_spacing="trailing",
)


def is_trained() -> bool:
    return (MODEL_DIR / "model_index.json").is_file()


def load_tiny_pipeline() -> Any:
    """The bundled trained ``CogVideoXPipeline`` from ``pipelines/tiny_model/`` (offline), its positions normalised
    to the canvas of each call (:func:`normalise_positions`), so any square canvas of 8k+1 frames shows the whole
    scene."""
    from diffusers import CogVideoXPipeline

    if not is_trained():
        raise FileNotFoundError(
            f"the bundled tiny model is missing from {MODEL_DIR} (a broken install or checkout?); reinstall "
            "dit-sparse, or train it: python -m dit_sparse.pipelines.tiny_train --out "
            f"{MODEL_DIR} (about an hour on a 2-core CPU)"
        )
    pipe = CogVideoXPipeline.from_pretrained(str(MODEL_DIR), local_files_only=True)
    normalise_positions(pipe.transformer)
    return pipe


def prompt_kwargs(pipe: Any, prompt: str, negative_prompt: str = "") -> dict[str, Any]:
    """The prompt arguments of a call of the bundled pipeline: its own tokenizer and text encoder with its training
    padding (``max_sequence_length`` = :data:`TEXT_LENGTH`, which its transformer requires)."""
    return {"prompt": prompt, "negative_prompt": negative_prompt, "max_sequence_length": TEXT_LENGTH}
