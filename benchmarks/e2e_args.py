"""Options of ``dit-sparse bench e2e`` and the model configurations it builds.

Kept apart from :mod:`dit_sparse.benchmarks.e2e` so ``dit-sparse --help`` imports no diffusers, Triton or CUDA.

The configurations are the published ``transformer/config.json`` values of each checkpoint on the Hugging Face hub
(diffusers 0.42 class names and argument names), written out here so that nothing is downloaded: the benchmark
builds each transformer from its config with random weights. Real checkpoints load some modules in float32
(``_keep_in_fp32_modules``); the benchmark does the same.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .kernel_args import add_common_bench_args, parse_densities, positive_int


@dataclass(frozen=True)
class E2EModel:
    """One transformer at one generation size: its config, the latent it denoises and the text it reads."""

    name: str  # what --models takes (the same name as the bench kernel shape of this model and size)
    label: str  # what the tables print
    family: str  # "wan" | "hunyuan_video" | "cogvideox" | "flux": how its forward inputs are made
    transformer_class: str  # diffusers class name
    config: Mapping[str, Any]
    latent: tuple[
        int, int, int, int
    ]  # (C, F, H, W) VAE latent the transformer gets (FLUX: before 2×2 packing)
    text_len: int  # text tokens the pipeline passes (padded length)
    cfg: bool  # classifier-free guidance: the pipeline runs cond + uncond (batch 2) every step
    size: str  # pixels and frames, for the reader
    source: str = ""  # where the config comes from
    tiny: bool = False  # a CPU smoke-test config, not the real model

    @property
    def grid(self) -> tuple[int, int, int]:
        """(F', H', W') self-attention video tokens after patching."""
        _, f, h, w = self.latent
        cfg = self.config
        if self.family == "wan":
            pt, ph, pw = cfg["patch_size"]
        elif self.family == "hunyuan_video":
            pt, ph, pw = cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"]
        elif self.family == "cogvideox":
            pt, ph, pw = cfg.get("patch_size_t") or 1, cfg["patch_size"], cfg["patch_size"]
        else:  # flux: 2×2 packing of the latent, then patch_size 1
            pt, ph, pw = 1, 2 * cfg["patch_size"], 2 * cfg["patch_size"]
        return f // pt, h // ph, w // pw

    @property
    def num_text(self) -> int:
        """Text tokens inside self-attention (joint attention); 0 when text comes in by cross-attention."""
        return 0 if self.family == "wan" else self.text_len

    @property
    def seq_len(self) -> int:
        f, h, w = self.grid
        return f * h * w + self.num_text

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.config["attention_head_dim"])

    @property
    def batch(self) -> int:
        """Sequences per denoising step: 2 with classifier-free guidance (cond + uncond), else 1."""
        return 2 if self.cfg else 1


def _frozen(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kw))


_WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)

GPU_MODELS: tuple[E2EModel, ...] = (
    E2EModel(
        "wan2.1-1.3b-480p",
        "Wan2.1-T2V-1.3B 480p 81f",
        "wan",
        "WanTransformer3DModel",
        _frozen(**_WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        (16, 21, 60, 104),  # 480×832 px, 81 frames: VAE 4× in time, 8× in space
        512,  # umt5 prompt embeddings, padded to max_sequence_length
        True,
        "480×832, 81 frames",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json",
    ),
    E2EModel(
        "wan2.1-14b-720p",
        "Wan2.1-T2V-14B 720p 81f",
        "wan",
        "WanTransformer3DModel",
        _frozen(**_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        (16, 21, 90, 160),  # 720×1280 px, 81 frames
        512,
        True,
        "720×1280, 81 frames",
        "Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json",
    ),
    E2EModel(
        "hunyuanvideo-720p",
        "HunyuanVideo 720p 129f",
        "hunyuan_video",
        "HunyuanVideoTransformer3DModel",
        _frozen(
            in_channels=16,
            out_channels=16,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=4096,
            pooled_projection_dim=768,
            rope_theta=256.0,
            rope_axes_dim=(16, 56, 56),
        ),
        (16, 33, 90, 160),  # 720×1280 px, 129 frames
        256,  # llama prompt embeddings, max_sequence_length 256 (all real tokens here: no key-padding mask)
        False,  # guidance-distilled: embedded guidance, one forward per step (true_cfg_scale=1)
        "720×1280, 129 frames",
        "hunyuanvideo-community/HunyuanVideo transformer/config.json",
    ),
    E2EModel(
        "cogvideox-5b",
        "CogVideoX-5B 49f",
        "cogvideox",
        "CogVideoXTransformer3DModel",
        _frozen(
            num_attention_heads=48,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            flip_sin_to_cos=True,
            freq_shift=0,
            time_embed_dim=512,
            text_embed_dim=4096,
            num_layers=42,
            dropout=0.0,
            attention_bias=True,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            patch_size_t=None,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            activation_fn="gelu-approximate",
            timestep_activation_fn="silu",
            norm_elementwise_affine=True,
            norm_eps=1e-5,
            spatial_interpolation_scale=1.875,
            temporal_interpolation_scale=1.0,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        ),
        (16, 13, 60, 90),  # 480×720 px, 49 frames
        226,  # T5 prompt embeddings, max_sequence_length 226
        True,
        "480×720, 49 frames",
        "THUDM/CogVideoX-5b transformer/config.json",
    ),
    E2EModel(
        "flux-1024",
        "FLUX.1-dev 1024²",
        "flux",
        "FluxTransformer2DModel",
        _frozen(
            patch_size=1,
            in_channels=64,
            out_channels=None,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        (16, 1, 128, 128),  # 1024×1024 px: 16-channel latent, packed 2×2 into 64×64 tokens of 64 channels
        512,  # T5 prompt embeddings, max_sequence_length 512
        False,  # guidance-distilled: one forward per step
        "1024×1024",
        "black-forest-labs/FLUX.1-dev transformer/config.json",
    ),
)


def _tiny_wan(key: str, layers: int, latent: tuple[int, int, int, int]) -> E2EModel:
    """A tiny Wan stand-in for ``key``: ``layers`` layers of 2 heads × 64 on a ``latent`` (C, F, H, W) input."""
    return E2EModel(
        key,
        f"tiny Wan ({layers} layers, 2×64)",
        "wan",
        "WanTransformer3DModel",
        _frozen(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=128,
            num_layers=layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        ),
        latent,
        16,
        True,
        "tiny",
        "tiny config",
        tiny=True,
    )


# Same classes and code path, a few hundred tokens each (grids not multiples of the block), 2 heads × 64.
TINY_MODELS: tuple[E2EModel, ...] = (
    _tiny_wan("wan2.1-1.3b-480p", 2, (16, 5, 16, 24)),
    _tiny_wan("wan2.1-14b-720p", 3, (16, 5, 16, 28)),
    E2EModel(
        "hunyuanvideo-720p",
        "tiny HunyuanVideo (1+1 blocks, 2×64)",
        "hunyuan_video",
        "HunyuanVideoTransformer3DModel",
        _frozen(
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
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(16, 24, 24),
        ),
        (4, 5, 16, 24),
        16,
        False,
        "tiny",
        "tiny config",
        tiny=True,
    ),
    E2EModel(
        "cogvideox-5b",
        "tiny CogVideoX (2 layers, 2×64)",
        "cogvideox",
        "CogVideoXTransformer3DModel",
        _frozen(
            num_attention_heads=2,
            attention_head_dim=64,
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=16,
            num_layers=2,
            sample_width=24,
            sample_height=16,
            sample_frames=17,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=True,
        ),
        (4, 5, 16, 24),
        16,
        True,
        "tiny",
        "tiny config",
        tiny=True,
    ),
    E2EModel(
        "flux-1024",
        "tiny FLUX (1+1 blocks, 2×64)",
        "flux",
        "FluxTransformer2DModel",
        _frozen(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(16, 24, 24),
        ),
        (4, 1, 32, 48),
        16,
        False,
        "tiny",
        "tiny config",
        tiny=True,
    ),
)

MODELS: dict[str, E2EModel] = {m.name: m for m in GPU_MODELS}
TINY: dict[str, E2EModel] = {m.name: m for m in TINY_MODELS}
PATTERN_CHOICES: tuple[str, ...] = ("radial", "window", "draft")
DEFAULT_E2E_DENSITIES: tuple[float, ...] = (0.25, 0.15, 0.1)
DEFAULT_BLOCK_SIZE = {"gpu": 128, "tiny": 32}


def unknown_model_message(name: str) -> str:
    return f"unknown model {name!r}; known models: {', '.join(MODELS)}"


def parse_model_names(text: str) -> list[str]:
    """A ``--models`` item: one name or a comma-separated list of names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty model name")
    for name in names:
        if name not in MODELS:
            raise argparse.ArgumentTypeError(unknown_model_message(name))
    return names


def parse_pattern_names(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty pattern name")
    for name in names:
        if name not in PATTERN_CHOICES:
            raise argparse.ArgumentTypeError(
                f"unknown pattern {name!r}; bench e2e runs: {', '.join(PATTERN_CHOICES)}"
            )
    return names


def add_e2e_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dit-sparse bench e2e`` to ``parser``."""
    parser.add_argument(
        "--models",
        nargs="+",
        type=parse_model_names,
        default=None,
        metavar="NAME",
        help=f"models to run (space- or comma-separated): {', '.join(MODELS)}. Default: all. With --tiny each "
        "name picks that model's tiny config",
    )
    parser.add_argument(
        "--densities",
        nargs="+",
        type=parse_densities,
        default=None,
        metavar="D",
        help="target attention densities of the sparse profiles, each in (0, 1] "
        f"(default: {' '.join(str(d) for d in DEFAULT_E2E_DENSITIES)}); static patterns get the parameters whose "
        "mask density is closest, draft gets budget D",
    )
    parser.add_argument(
        "--patterns",
        nargs="+",
        type=parse_pattern_names,
        default=None,
        metavar="NAME",
        help=f"uniform profiles to time: {', '.join(PATTERN_CHOICES)}; None: all",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time every configuration under torch.compile (eager is always timed)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend for --compile ('eager' / 'aot_eager' check tracing without code generation)",
    )
    parser.add_argument(
        "--schedule-steps",
        type=positive_int,
        default=50,
        help="denoising steps of the full-schedule estimate",
    )
    parser.add_argument(
        "--dense-steps",
        type=int,
        default=10,
        help="dense warm-up steps of the uniform profiles in the full-schedule estimate (the per-step sparse time "
        "is measured at a sparse step)",
    )
    add_common_bench_args(
        parser,
        tiny_help="tiny configs of the same transformer classes on the CPU (fp32): proves the benchmark runs, "
        "its timings are not GPU performance. The default when no CUDA device is present",
        seed_help="seed of the random weights and inputs",
    )
    # e2e defaults differ from the kernel benchmarks': a transformer forward takes seconds, not microseconds, and the
    # tiny configs need a smaller block to have several blocks per row
    parser.set_defaults(reps=3, warmup=1, block_size=None)
    for action in parser._actions:
        if action.dest == "reps":
            action.help = "timed denoising steps per configuration (median)"
        elif action.dest == "warmup":
            action.help = "untimed denoising steps before timing each configuration"
        elif action.dest == "block_size":
            action.help = (
                "tokens per mask block of the sparse profiles; None: 128, or 32 for the tiny configs"
            )
        elif action.dest == "dtype":
            action.help = "model dtype on CUDA (the CPU runs the tiny configs in float32)"
