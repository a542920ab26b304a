"""Train the bundled tiny text-to-video model from scratch, reproducibly from a seed, on procedural clips.

    python -m dit_sparse.pipelines.tiny_train --out pipelines/tiny_model --checkpoints ckpt   # ≈ 1 h, 2-core CPU
    python -m dit_sparse.pipelines.tiny_train --out /tmp/m --device cuda                       # minutes on a GPU
    python -m dit_sparse.pipelines.tiny_train --out /tmp/m --quick                             # a smoke run (seconds)

Every part is a stock diffusers / transformers component, saved as one ``CogVideoXPipeline.save_pretrained`` folder:

1. **tokenizer**: a word-level ``PreTrainedTokenizerFast`` over the project's own vocabulary
   (:data:`~dit_sparse.pipelines.tiny_data.VOCAB`), lower-cased, ``</s>`` appended like T5's.
2. **text encoder**: a 2-layer ``T5EncoderModel`` (d_model 64), seeded and *frozen*: a fixed random feature map of
   the vocabulary that the transformer learns to read. Prompts are padded to
   :data:`~dit_sparse.pipelines.tiny.TEXT_LENGTH` tokens (``max_sequence_length``) in training and generation.
3. **VAE**: a small ``AutoencoderKLCogVideoX`` (8× spatial, 4× causal temporal compression, 16 latent channels)
   trained with L1 + MSE + a tiny KL on random crops of clips (most of them on the shape); its ``scaling_factor`` is
   measured on the training latents (unit second moment).
4. **transformer**: the CogVideoX-2B-style ``CogVideoXTransformer3DModel`` of :mod:`~dit_sparse.pipelines.tiny`
   (absolute 3-D sin-cos positions, normalised to the canvas by :func:`~dit_sparse.pipelines.tiny.position_scales`)
   trained with the pipeline's own ``CogVideoXDDIMScheduler`` objective (v-prediction, uniform timesteps, zero
   terminal SNR), 10 % empty prompts for classifier-free guidance. Stages (:class:`Stage`): many cheap steps on
   small, short clips, then a fine-tune at the default canvas, then a short fine-tune there with a locality term
   (:class:`LocalityProbe`) that gives the heads the local attention real video DiTs have. Because positions are
   canvas-relative and so is the data, what the model learns on 64-px clips of 9 frames already holds, roughly, at
   176 px and 33 frames.

Data: :func:`~dit_sparse.pipelines.tiny_data.centred_clip` clips of every prompt "a {colour} {shape} moving
{direction}": the shape crosses half the frame on a path centred in it, seeded radius. Why this design:
docs/tiny-model-training-notes.md. At the end the script generates one clip per evaluation prompt with the trained
pipeline and checks it with the detector; the figures go into the model card (``README.md`` in the folder) and
``training.json``.

``--checkpoints DIR`` saves every finished stage there; running the same command again continues after the last
finished stage and writes the same weights as an uninterrupted run (every stage draws from its own seeded generator).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..patterns import MaskLayout
from .tiny import (
    DEFAULTS,
    SCHEDULER_CONFIG,
    TEXT_DIM,
    TEXT_LENGTH,
    TRAINED_CANVAS,
    TRANSFORMER_CONFIG,
    VAE_CONFIG,
    latent_shape,
    position_scales,
)
from .tiny_data import BACKGROUND, VOCAB, ClipSpec, all_specs, centred_clip, detect, eval_prompts

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0
)
MAX_SEQUENCE_LENGTH = 512  # the tokenizer's model_max_length


@dataclass
class Stage:
    """One transformer stage: ``steps`` AdamW steps (fresh optimizer, ``warmup`` steps then cosine to 10 % of
    ``lr``) on whole clips of ``frames`` frames at ``size``×``size`` px, positions normalised to that canvas."""

    name: str
    size: int
    frames: int
    batch: int
    steps: int
    lr: float
    warmup: int = 50
    # weight of the attention-locality term (:class:`LocalityProbe`): 0 = the plain diffusion objective
    locality: float = 0.0


@dataclass
class Recipe:
    """Everything that decides the trained weights (with the code and the torch version)."""

    seed: int = 0
    # the generation canvas (the default of `dit-sparse generate`): VAE crops and evaluation
    frames: int = TRAINED_CANVAS["num_frames"]
    height: int = TRAINED_CANVAS["height"]
    width: int = TRAINED_CANVAS["width"]
    radius: tuple[float, float] = (0.126, 0.154)  # shape radius, share of the frame's side
    travel: float = 0.5  # share of the frame the shape crosses over a clip
    clips_per_prompt: int = 4
    vae_steps: int = 1500
    vae_batch: int = 4
    vae_crop: tuple[int, int, int] = (9, 48, 48)  # frames, height, width
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    shape_crops: float = 0.9  # share of VAE / decoder training crops that hold the shape
    stages: list[Stage] = field(
        default_factory=lambda: [
            Stage("A", 64, 9, 8, 2400, 1e-3),
            Stage("B", TRAINED_CANVAS["height"], TRAINED_CANVAS["num_frames"], 2, 300, 3e-4),
            Stage("C", TRAINED_CANVAS["height"], TRAINED_CANVAS["num_frames"], 2, 400, 1e-3, locality=1.0),
        ]
    )
    # per head (frames, rows, cols) of latent cells around each query that a locality stage asks its attention to
    # keep its attention on the video within (the text keys are left out): head 0 a near spatial window, head 1 a
    # longer temporal one
    locality_windows: list[tuple[int, int, int]] = field(default_factory=lambda: [(1, 3, 3), (2, 2, 2)])
    locality_queries: int = 128  # query tokens sampled per attention call for the locality term
    dit_weight_decay: float = 0.01
    cfg_dropout: float = 0.1
    # optional decoder-only fine-tune on the frozen encoder's latents after the transformer (0: none)
    decoder_steps: int = 0
    decoder_batch: int = 4
    decoder_crop: tuple[int, int, int] = (9, 64, 64)
    decoder_lr: float = 3e-4
    eval_prompts: int = 12
    eval_steps: int = DEFAULTS["num_inference_steps"]

    @classmethod
    def quick(cls) -> Recipe:
        return cls(
            frames=9,
            height=48,
            width=48,
            clips_per_prompt=1,
            vae_steps=2,
            vae_batch=2,
            vae_crop=(9, 32, 32),
            stages=[
                Stage("A", 32, 9, 2, 2, 1e-3, 1),
                Stage("B", 48, 9, 2, 2, 3e-4, 1),
                Stage("C", 48, 9, 2, 2, 3e-4, 1, locality=1.0),
            ],
            decoder_steps=2,
            decoder_batch=2,
            decoder_crop=(9, 32, 32),
            eval_prompts=2,
            eval_steps=2,
        )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, mininterval=5.0, disable=os.environ.get("CI") == "true")


def _optimise(
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    steps: int,
    desc: str,
    step_loss: Callable[[], torch.Tensor],
) -> list[float]:
    """``steps`` optimizer steps on ``step_loss()`` (gradients clipped to norm 1), with a progress bar; the losses."""
    losses: list[float] = []
    bar = _progress(steps, desc)
    for _ in range(steps):
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{_tail_mean(losses):.4f}")
    bar.close()
    return losses


def _tail_mean(losses: list[float], n: int = 50) -> float:
    tail = losses[-n:]
    return sum(tail) / max(len(tail), 1)


def _cosine(steps: int) -> Callable[[int], float]:
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))


# ------------------------------------------------------------------------------------------------ text
def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((*SPECIAL_TOKENS, *VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_text_encoder(vocab_size: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = T5EncoderModel(T5Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG))
    return enc.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ data
def clip_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def training_clips(recipe: Recipe) -> list[tuple[ClipSpec, int]]:
    """(spec, clip seed) for every training clip: each prompt ``clips_per_prompt`` times."""
    specs = all_specs()
    return [
        (spec, clip_seed(recipe.seed, i * len(specs) + j))
        for i in range(recipe.clips_per_prompt)
        for j, spec in enumerate(specs)
    ]


def recipe_clip(
    recipe: Recipe, spec: ClipSpec, seed: int, frames: int, height: int, width: int
) -> torch.Tensor:
    """One training clip ``(3, F, H, W)`` in [-1, 1] (the VAE's layout and range)."""
    clip = centred_clip(spec, frames, height, width, seed=seed, radius=recipe.radius, travel=recipe.travel)
    return clip.permute(1, 0, 2, 3) * 2 - 1


# ------------------------------------------------------------------------------------------------ VAE
def train_vae(vae: Any, recipe: Recipe, device: torch.device) -> dict[str, float]:
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(recipe.vae_steps))

    def step_loss() -> torch.Tensor:
        x = _crops(recipe, recipe.vae_crop, recipe.vae_batch, g, device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        return (rec - x).abs().mean() + F.mse_loss(rec, x) + recipe.vae_kl * post.kl().mean()

    vae.train()
    losses = _optimise(list(vae.parameters()), opt, sched, recipe.vae_steps, "VAE", step_loss)
    vae.eval()
    return {"final_loss": _tail_mean(losses), "steps": recipe.vae_steps}


def _crops(
    recipe: Recipe, crop: tuple[int, int, int], batch: int, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Random crops of random training clips at the default canvas; ``recipe.shape_crops`` of them hold the shape
    (a crop window drawn among those that contain a random shape pixel of the crop's middle frame): the shape covers
    about 1 % of the canvas, so uniform crops would teach the VAE little but background."""
    clips = training_clips(recipe)
    cf, ch, cw = crop
    background = torch.tensor(BACKGROUND).view(3, 1, 1) * 2 - 1
    out = []
    for _b in range(batch):
        spec, seed = clips[int(torch.randint(len(clips), (1,), generator=g))]
        clip = recipe_clip(recipe, spec, seed, recipe.frames, recipe.height, recipe.width)
        f0 = int(torch.randint(recipe.frames - cf + 1, (1,), generator=g))
        on_shape = float(torch.rand(1, generator=g)) < recipe.shape_crops
        ys, xs = ((clip[:, f0 + cf // 2] - background).abs().amax(0) > 0.05).nonzero(as_tuple=True)
        if on_shape and len(ys):
            k = int(torch.randint(len(ys), (1,), generator=g))
            y0 = _window_start(int(ys[k]), ch, recipe.height, g)
            x0 = _window_start(int(xs[k]), cw, recipe.width, g)
        else:
            y0 = int(torch.randint(recipe.height - ch + 1, (1,), generator=g))
            x0 = int(torch.randint(recipe.width - cw + 1, (1,), generator=g))
        out.append(clip[:, f0 : f0 + cf, y0 : y0 + ch, x0 : x0 + cw])
    return torch.stack(out).to(device)


def _window_start(pixel: int, window: int, size: int, g: torch.Generator) -> int:
    """A uniform start among the windows of ``window`` px inside ``size`` that contain ``pixel``."""
    lo, hi = max(pixel - window + 1, 0), min(pixel, size - window)
    return lo + int(torch.randint(hi - lo + 1, (1,), generator=g))


def finetune_decoder(vae: Any, recipe: Recipe, device: torch.device) -> dict[str, float]:
    """Decoder-only fine-tune on the frozen encoder's posterior means (what the transformer learned to generate):
    sharper, truer colours without changing the latent space. Its own generator, so it can run after any stage."""
    g = torch.Generator().manual_seed(recipe.seed + 3)
    params = list(vae.decoder.parameters())
    if vae.post_quant_conv is not None:
        params += list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(recipe.decoder_steps))

    def step_loss() -> torch.Tensor:
        x = _crops(recipe, recipe.decoder_crop, recipe.decoder_batch, g, device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        return (rec - x).abs().mean() + F.mse_loss(rec, x)

    vae.train()
    losses = _optimise(params, opt, sched, recipe.decoder_steps, "VAE decoder", step_loss)
    vae.eval()
    return {"final_loss": _tail_mean(losses), "steps": recipe.decoder_steps}


@torch.no_grad()
def encode_clips(
    vae: Any, recipe: Recipe, size: int, frames: int, device: torch.device
) -> tuple[torch.Tensor, list[ClipSpec]]:
    """Posterior means of every training clip made at ``size``×``size`` px, ``frames`` frames: ``(N, C, F', H', W')``
    (the VAE's layout, unscaled)."""
    clips = training_clips(recipe)
    out, specs = [], []
    bar = _progress(len(clips), f"encode {frames}×{size}²")
    for i in range(0, len(clips), 4):
        chunk = clips[i : i + 4]
        x = torch.stack([recipe_clip(recipe, s, seed, frames, size, size) for s, seed in chunk]).to(device)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
        specs.extend(s for s, _ in chunk)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out), specs


@torch.no_grad()
def vae_psnr(vae: Any, recipe: Recipe, device: torch.device, n: int = 4) -> float:
    """Reconstruction PSNR (dB, [0, 1] range) on held-out clips (seeds never used for training)."""
    values = []
    for i, spec in enumerate(all_specs()[:: max(len(all_specs()) // n, 1)][:n]):
        x = (
            recipe_clip(recipe, spec, -1 - i, recipe.frames, recipe.height, recipe.width)
            .unsqueeze(0)
            .to(device)
        )
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = float(((rec - x) / 2).pow(2).mean())
        values.append(10 * math.log10(1.0 / max(mse, 1e-12)))
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------------ DiT
def _text_table(pipe: Any, specs: list[ClipSpec]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    prompts = sorted({s.prompt for s in specs})
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH, device="cpu"
        )
        empty, _ = pipe.encode_prompt(
            "", do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH, device="cpu"
        )
    return {p: e for p, e in zip(prompts, embeds)}, empty[0]


@dataclass
class LatentData:
    latents: torch.Tensor  # scaled posterior means (N, F', C, H', W'): CogVideoX's layout and scale
    texts: torch.Tensor  # (N, TEXT_LENGTH, text dim) prompt embeddings, padded as the pipeline pads them
    empty: torch.Tensor  # the empty prompt's embedding (classifier-free guidance dropout)


@contextmanager
def canvas_positions(transformer: Any, size: int, frames: int) -> Iterator[None]:
    """Within the block the transformer's sin-cos positions are normalised to a ``size``² canvas of ``frames``
    frames (:func:`~dit_sparse.pipelines.tiny.position_scales`) instead of its configured canvas."""
    embed = transformer.patch_embed
    saved = embed.spatial_interpolation_scale, embed.temporal_interpolation_scale
    embed.spatial_interpolation_scale, embed.temporal_interpolation_scale = position_scales(
        size, size, frames
    )
    try:
        yield
    finally:
        embed.spatial_interpolation_scale, embed.temporal_interpolation_scale = saved


class LocalityProbe:
    """A training-only attention processor for the transformer's self-attention: computes the layer exactly as the
    stock ``CogVideoXAttnProcessor2_0`` (no RoPE in this model) and, for ``queries`` video tokens drawn from
    ``generator``, the share of each head's attention *on video keys* that falls *outside* its window (``windows[h]``
    = frames, rows, cols of latent cells either side of the query). The text keys are left out (the share is
    renormalised over the video keys), so the term neither rewards nor punishes attending to the text: an earlier
    version counted the text as inside, and the model met it by sending 98-99.9 % of every head's attention to the
    16 text tokens instead of becoming local (2026-12-05, ``benchmarks/tiny_attention_mass.py``). :meth:`take`
    returns the mean of those shares over the calls since the last take: the locality term of a stage with
    ``locality > 0``.

    Why: trained briefly on a CPU, the 4-layer model spreads its attention almost uniformly over the clip (normalised
    entropy 0.85-0.99, 90 % of the mass in 50-90 % of the blocks), unlike the real video DiTs dit-sparse is for,
    whose heads are mostly local. A short fine-tune with this term gives the tiny model local heads
    (docs/tiny-model-training-notes.md); the shipped model keeps the stock processor."""

    def __init__(
        self,
        grid: tuple[int, int, int],
        windows: list[tuple[int, int, int]],
        queries: int,
        generator: torch.Generator,
    ) -> None:
        self.grid, self.windows, self.queries, self.generator = grid, windows, queries, generator
        self.coords = MaskLayout(grid).token_coords()  # (N_video, 3): (frame, row, col) per video token
        self.outside: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        out = torch.stack(self.outside).mean()
        self.outside.clear()
        return out

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if image_rotary_emb is not None or attention_mask is not None:
            raise ValueError(
                "LocalityProbe is for the tiny model's self-attention (no RoPE, no attention mask)"
            )
        text = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b, n, _ = x.shape
        if n - text != len(self.coords):
            raise ValueError(
                f"LocalityProbe built for a {self.grid} latent grid, got {n - text} video tokens"
            )
        q, k, v = (
            proj(x).view(b, n, attn.heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        o = F.scaled_dot_product_attention(q, k, v)
        if torch.is_grad_enabled():
            rows = torch.randint(len(self.coords), (self.queries,), generator=self.generator)
            p = (q[:, :, text + rows] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(
                -1
            )  # (b, H, Q, n)
            dist = (self.coords[None, :, :] - self.coords[rows][:, None, :]).abs()  # (Q, N_video, 3)
            on_video = p[..., text:]  # (b, H, Q, N_video): the text keys are left out of the term
            shares = []
            for h in range(attn.heads):
                window = torch.tensor(self.windows[h % len(self.windows)])
                inside = (dist <= window).all(dim=-1).to(p.device)  # (Q, N_video)
                mass = on_video[:, h]
                shares.append(1.0 - ((mass * inside).sum(-1) / mass.sum(-1)).mean())
            self.outside.append(torch.stack(shares).mean())
        o = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, n, -1)))
        return o[:, text:], o[:, :text]


def v_loss(
    transformer: Any,
    alphas_cumprod: torch.Tensor,
    data: LatentData,
    batch: int,
    recipe: Recipe,
    device: torch.device,
    g: torch.Generator,
) -> torch.Tensor:
    """The pipeline scheduler's objective on a random batch: ``x_t = √ᾱ·x0 + √(1-ᾱ)·ε`` at a uniform timestep,
    target ``v = √ᾱ·ε - √(1-ᾱ)·x0``."""
    idx = torch.randint(len(data.latents), (batch,), generator=g)
    x0 = data.latents[idx]
    ctx = data.texts[idx].clone()
    drop = torch.rand(batch, generator=g) < recipe.cfg_dropout
    ctx[drop] = data.empty
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(len(alphas_cumprod), (batch,), generator=g)
    a = alphas_cumprod[t].view(batch, 1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    pred = transformer(xt.to(device), ctx.to(device), t.to(device), return_dict=False)[0]
    return F.mse_loss(pred.float(), target.to(device))


def train_stage(
    transformer: Any,
    alphas_cumprod: torch.Tensor,
    data: LatentData,
    stage: Stage,
    index: int,
    recipe: Recipe,
    device: torch.device,
) -> dict[str, Any]:
    """One stage with a fresh AdamW and its own generator (so a run continued from a checkpoint is the same)."""
    g = torch.Generator().manual_seed(recipe.seed + 10 + index)
    opt = torch.optim.AdamW(transformer.parameters(), lr=stage.lr, weight_decay=recipe.dit_weight_decay)

    def lr_at(step: int) -> float:
        warm = min((step + 1) / max(stage.warmup, 1), 1.0)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(stage.steps, 1))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    probe = None
    blocks = transformer.transformer_blocks
    saved = [blk.attn1.processor for blk in blocks]
    if stage.locality > 0:
        grid = latent_shape(stage.size, stage.size, stage.frames)
        gen = torch.Generator().manual_seed(recipe.seed + 100 + index)
        probe = LocalityProbe(grid, [tuple(w) for w in recipe.locality_windows], recipe.locality_queries, gen)
        for blk in blocks:
            blk.attn1.set_processor(probe)
    v_losses: list[float] = []
    outside: list[float] = []

    def step_loss() -> torch.Tensor:
        loss = v_loss(transformer, alphas_cumprod, data, stage.batch, recipe, device, g)
        v_losses.append(loss.item())
        if probe is not None:
            term = probe.take()
            outside.append(term.item())
            loss = loss + stage.locality * term
        return loss

    transformer.train()
    try:
        with canvas_positions(transformer, stage.size, stage.frames):
            _optimise(
                list(transformer.parameters()),
                opt,
                sched,
                stage.steps,
                f"DiT {stage.name}: {stage.frames} frames at {stage.size} px",
                step_loss,
            )
    finally:
        for blk, proc in zip(blocks, saved):
            blk.attn1.set_processor(proc)
        transformer.eval()
    report: dict[str, Any] = {
        **asdict(stage),
        "final_loss": _tail_mean(v_losses),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if probe is not None:
        report["final_outside_share"] = round(_tail_mean(outside), 5)
    return report


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(
    pipe: Any, specs: list[ClipSpec], recipe: Recipe, seed: int = 0, chunk: int = 4
) -> dict[str, Any]:
    """Generate one clip per prompt at the default canvas (prompt ``k`` from seed ``seed + k``, in batches of
    ``chunk``) and check colour and direction with the detector."""
    rows = []
    for i in range(0, len(specs), chunk):
        part = specs[i : i + chunk]
        videos = pipe(
            prompt=[s.prompt for s in part],
            height=recipe.height,
            width=recipe.width,
            num_frames=recipe.frames,
            num_inference_steps=recipe.eval_steps,
            guidance_scale=DEFAULTS["guidance_scale"],
            generator=[torch.Generator().manual_seed(seed + i + k) for k in range(len(part))],
            output_type="pt",
            max_sequence_length=TEXT_LENGTH,
        ).frames  # (B, F, 3, H, W) in [0, 1]
        for spec, video in zip(part, videos):
            det = detect(video)
            rows.append(
                {
                    "prompt": spec.prompt,
                    "colour": det.colour,
                    "direction": det.direction,
                    "ok": det.matches(spec),
                }
            )
    return {"matches": sum(r["ok"] for r in rows), "total": len(rows), "clips": rows}


# ------------------------------------------------------------------------------------------------ main
def stage_depends(recipe: Recipe, name: str) -> dict[str, Any]:
    """The recipe fields stage ``name`` (``vae``, ``decoder`` or ``transformer-<stage>``) and the stages it builds on
    depend on: a checkpoint is reused only when they are unchanged, so a later stage can be changed and re-run alone."""
    r = json.loads(json.dumps(asdict(recipe)))
    data = ("seed", "frames", "height", "width", "radius", "travel", "clips_per_prompt", "shape_crops")
    vae = {k: r[k] for k in r if k in data or k.startswith("vae_")}
    if name == "vae":
        return vae
    if name == "decoder":
        return {**vae, **{k: r[k] for k in r if k.startswith("decoder_")}}
    names = [f"transformer-{s.name}" for s in recipe.stages]
    if name not in names:
        raise ValueError(f"unknown stage {name!r}; known: vae, decoder, {', '.join(names)}")
    dit = {k: r[k] for k in ("dit_weight_decay", "cfg_dropout")}
    upto = r["stages"][: names.index(name) + 1]
    if any(s.get("locality") for s in upto):
        dit.update({k: r[k] for k in ("locality_windows", "locality_queries")})
        # the term's share is over the video keys (before 2026-12-05 the text counted as inside)
        dit["locality_keys"] = "video"
    # a stage without a locality term records none, so checkpoints made before that field existed still match
    upto = [{k: v for k, v in s.items() if k != "locality" or v} for s in upto]
    return {**vae, **dit, "stages": upto}


class Checkpoints:
    """Finished stages in a folder (``NAME.safetensors`` + ``NAME.json``, written atomically); a later run loads a
    stage instead of training it again when the recipe fields it depends on (:func:`stage_depends`) are the same.
    ``folder=None``: nothing is saved or loaded."""

    def __init__(self, folder: Path | None, recipe: Recipe) -> None:
        self.folder = folder
        self.recipe = recipe
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> bool:
        return self.folder is not None and (self.folder / f"{name}.json").is_file()

    def saved_report(self, name: str) -> dict[str, Any]:
        """The report of finished stage ``name``, after checking it was made with this recipe."""
        assert self.folder is not None
        depends = stage_depends(self.recipe, name)
        saved = json.loads((self.folder / f"{name}.json").read_text())
        if saved.get("depends") != depends:
            theirs = saved.get("depends") or {}
            diff = sorted(k for k in depends if theirs.get(k) != depends[k])
            raise SystemExit(
                f"error: checkpoint {name!r} in {self.folder} was trained with another recipe (differs in "
                f"{', '.join(diff) or 'format'}); delete {name}.json and {name}.safetensors there (and those of "
                "the stages after it), or use another --checkpoints folder"
            )
        report: dict[str, Any] = saved["report"]
        return report

    def run(
        self, name: str, module: torch.nn.Module, fn: Callable[[], dict[str, Any]], load: bool = True
    ) -> dict[str, Any]:
        """``fn()``'s report, training ``module`` — or the saved report, loading ``module``'s saved weights (only the
        report with ``load=False``: a later stage's weights replace them anyway)."""
        from safetensors.torch import load_file, save_file

        depends = stage_depends(self.recipe, name)
        if self.done(name):
            report = self.saved_report(name)
            if load:
                assert self.folder is not None  # done() says so
                module.load_state_dict(load_file(self.folder / f"{name}.safetensors"))
                _log(f"stage {name}: loaded from {self.folder}")
            return report
        if not load:
            raise SystemExit(f"error: checkpoint {name!r} missing in {self.folder}")
        t0 = time.perf_counter()
        report = fn()
        report["seconds"] = round(time.perf_counter() - t0, 1)
        if self.folder is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            tmp = self.folder / f".{name}.safetensors.tmp"
            save_file(state, tmp)
            os.replace(tmp, self.folder / f"{name}.safetensors")
            blob = json.dumps({"depends": depends, "report": report}, indent=1)
            _write_atomic(self.folder / f"{name}.json", blob.encode())
        return report


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def transformer_config(recipe: Recipe) -> dict[str, Any]:
    """The tiny transformer's config with its sample canvas and position scales set to the recipe's canvas (the
    shipped model: :data:`~dit_sparse.pipelines.tiny.TRANSFORMER_CONFIG` itself)."""
    spatial, temporal = position_scales(recipe.height, recipe.width, recipe.frames)
    _, rows, cols = latent_shape(recipe.height, recipe.width, recipe.frames)
    return {
        **TRANSFORMER_CONFIG,
        "sample_height": rows,
        "sample_width": cols,
        "sample_frames": recipe.frames,
        "spatial_interpolation_scale": spatial,
        "temporal_interpolation_scale": temporal,
    }


def vae_config(recipe: Recipe) -> dict[str, Any]:
    return {**VAE_CONFIG, "sample_height": recipe.height, "sample_width": recipe.width}


def train(
    recipe: Recipe, out: Path, device: torch.device, force: bool = False, checkpoints: Path | None = None
) -> dict[str, Any]:
    """All stages: VAE (+ latent scale) → transformer stages → decoder fine-tune → evaluation → save."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"error: {out} exists and is not empty; pass --force to replace it")
    ck = Checkpoints(checkpoints, recipe)
    t_start = time.perf_counter()
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), recipe.seed)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed + 1)
        vae = AutoencoderKLCogVideoX(**vae_config(recipe)).to(device)
        torch.manual_seed(recipe.seed + 2)
        transformer = CogVideoXTransformer3DModel(**transformer_config(recipe)).to(device)
    scheduler = CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )

    def vae_stage() -> dict[str, Any]:
        _log(f"VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, {recipe.vae_steps} steps")
        report: dict[str, Any] = train_vae(vae, recipe, device)
        report["heldout_psnr_db"] = vae_psnr(vae, recipe, device)
        latents, _ = encode_clips(vae, recipe, recipe.height, recipe.frames, device)
        report["scaling_factor"] = round(1.0 / float(latents.pow(2).mean().sqrt()), 6)  # unit second moment
        return report

    vae_report = ck.run("vae", vae, vae_stage)
    vae.register_to_config(scaling_factor=vae_report["scaling_factor"])
    _log(f"VAE held-out reconstruction PSNR {vae_report['heldout_psnr_db']:.1f} dB")
    summary: dict[str, Any] = {
        "recipe": asdict(recipe),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "vae": vae_report,
        "transformer": [],
    }

    datasets: dict[tuple[int, int], LatentData] = {}

    def dataset(size: int, frames: int) -> LatentData:
        if (size, frames) not in datasets:
            latents, specs = encode_clips(vae, recipe, size, frames, device)
            table, empty = _text_table(pipe, specs)
            datasets[(size, frames)] = LatentData(
                (latents * vae_report["scaling_factor"]).permute(0, 2, 1, 3, 4).contiguous(),
                torch.stack([table[s.prompt] for s in specs]),
                empty,
            )
        return datasets[(size, frames)]

    alphas_cumprod = scheduler.alphas_cumprod.float()
    _log(f"transformer: {sum(p.numel() for p in transformer.parameters()):,} parameters")
    names = [f"transformer-{stage.name}" for stage in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        # a stage with a finished later stage is not loaded (nor trained): that stage's weights replace its own
        later_done = any(ck.done(n) for n in names[i + 1 :])
        report = ck.run(
            names[i],
            transformer,
            lambda stage=stage, i=i: train_stage(
                transformer, alphas_cumprod, dataset(stage.size, stage.frames), stage, i, recipe, device
            ),
            load=not later_done,
        )
        summary["transformer"].append(report)
        _log(f"DiT stage {stage.name}: loss {report['final_loss']:.4f} ({report['seconds']:.0f} s)")
    datasets.clear()

    def decoder_stage() -> dict[str, Any]:
        _log(f"VAE decoder fine-tune: {recipe.decoder_steps} steps")
        report: dict[str, Any] = finetune_decoder(vae, recipe, device)
        report["heldout_psnr_db"] = vae_psnr(vae, recipe, device)
        return report

    summary["decoder"] = ck.run("decoder", vae, decoder_stage)
    _log(
        f"VAE held-out reconstruction PSNR after the decoder fine-tune {summary['decoder']['heldout_psnr_db']:.1f} dB"
    )

    t0 = time.perf_counter()
    ev = evaluate(pipe, eval_prompts(recipe.eval_prompts), recipe)
    ev["seconds"] = round(time.perf_counter() - t0, 1)
    _log(f"detector: {ev['matches']}/{ev['total']} generated clips match their prompt")
    summary["eval"] = ev
    stages = [summary["vae"], *summary["transformer"], summary["decoder"], ev]
    summary["seconds"] = {
        "total": round(
            sum(s["seconds"] for s in stages), 1
        ),  # every stage, also those loaded from checkpoints
        "this_process": round(time.perf_counter() - t_start, 1),
    }
    pipe.to("cpu")
    _save(pipe, summary, out, force)
    return summary


def _save(pipe: Any, summary: dict[str, Any], out: Path, force: bool) -> None:
    """Write into a temporary sibling folder, then swap it in: a failed save never leaves half a model."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(summary))
        if out.exists():
            if not force:
                raise SystemExit(f"error: {out} exists; pass --force to replace it")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    _log(f"saved {out} ({size / 1e6:.1f} MB)")


def model_card(summary: dict[str, Any]) -> str:
    r = summary["recipe"]
    ev = summary["eval"]
    lf, rows, cols = latent_shape(r["height"], r["width"], r["frames"])
    tokens = lf * rows * cols
    stages = "\n".join(
        f"| {s['name']} | {s['size']}×{s['size']} × {s['frames']} | {s['batch']} | {s['steps']:,} | {s['lr']} | "
        f"{s.get('locality') or '–'} | {s['final_loss']:.4f} | "
        f"{'–' if s.get('final_outside_share') is None else format(s['final_outside_share'], '.3f')} | "
        f"{s['seconds']:.0f} |"
        for s in summary["transformer"]
    )
    this = summary["seconds"].get("this_process", summary["seconds"]["total"])
    resumed = (
        f" (each stage's own time; the process that wrote this folder took {this / 60:.1f} min, loading the finished "
        "stages from `--checkpoints`)"
        if this < 0.9 * summary["seconds"]["total"]
        else ""
    )
    windows = ", ".join(
        f"head {h}: ±{w[0]} frames, ±{w[1]} rows, ±{w[2]} columns"
        for h, w in enumerate(r.get("locality_windows") or [])
    )
    clips = "\n".join(
        f"| {c['prompt']} | {c['colour']} | {c['direction']} | {'yes' if c['ok'] else 'no'} |"
        for c in ev["clips"]
    )
    secs = {"vae": summary["vae"]["seconds"], "decoder": summary["decoder"]["seconds"], "eval": ev["seconds"]}
    dit_secs = sum(s["seconds"] for s in summary["transformer"])
    decoder = (
        f"- VAE decoder fine-tune (after the transformer; the encoder and so the latent space stay frozen): "
        f"{r['decoder_steps']} AdamW steps, batch {r['decoder_batch']}, crops {tuple(r['decoder_crop'])}, lr "
        f"{r['decoder_lr']} cosine, L1 + MSE on the posterior means. Held-out reconstruction PSNR "
        f"**{summary['decoder']['heldout_psnr_db']:.1f} dB**.\n\n"
        if r["decoder_steps"]
        else ""
    )
    return f"""# dit-sparse tiny text-to-video model

A stock diffusers `CogVideoXPipeline` small enough to run on a laptop CPU, trained from scratch by
`python -m dit_sparse.pipelines.tiny_train` (source: `pipelines/tiny_train.py`). It is the default model of
`dit-sparse generate`: big enough that attention dominates ({tokens:,} video tokens + {TEXT_LENGTH} text tokens per
self-attention at the default {r["frames"]} frames × {r["height"]}×{r["width"]}), small enough to run dense on a CPU
in about a minute.

```python
from diffusers import CogVideoXPipeline

pipe = CogVideoXPipeline.from_pretrained("pipelines/tiny_model")
video = pipe(
    "a red circle moving left",
    num_frames={r["frames"]},
    height={r["height"]},
    width={r["width"]},
    num_inference_steps={r["eval_steps"]},
    max_sequence_length={TEXT_LENGTH},
).frames[0]
```

`max_sequence_length={TEXT_LENGTH}` is required: the transformer was built for {TEXT_LENGTH} text tokens.

## Components

- transformer: `CogVideoXTransformer3DModel` (CogVideoX-2B style: absolute 3-D sin-cos positions, no RoPE), 4
  layers, 2 heads × 64, patch 1×1, text dim {TEXT_DIM} (trained). Its positions are normalised to the default canvas
  (`spatial_interpolation_scale` {TRANSFORMER_CONFIG["spatial_interpolation_scale"]:g}, `temporal_interpolation_scale`
  {TRANSFORMER_CONFIG["temporal_interpolation_scale"]:g}); at another size or length plain
  `from_pretrained` shows a crop or a tiling of the motion it learned;
  `dit_sparse.pipelines.tiny.load_tiny_pipeline()` (what `dit-sparse generate` uses) loads this folder and
  normalises the positions to every call's canvas, as in training, so any square canvas of 8k+1 frames works.
- VAE: `AutoencoderKLCogVideoX`, `block_out_channels` {list(VAE_CONFIG["block_out_channels"])}, 16 latent
  channels: 8× spatial / 4× causal temporal compression (trained); `scaling_factor`
  {summary["vae"]["scaling_factor"]:g} (measured: unit second moment of the training latents)
- text encoder: `T5EncoderModel`, 2 layers, d_model {TEXT_DIM}, seeded random and frozen (a fixed feature map the
  transformer learns to read); tokenizer: word level over the project's own vocabulary (`tiny_data.VOCAB`)
- scheduler: `CogVideoXDDIMScheduler` (CogVideoX-2B's settings: v-prediction, zero terminal SNR, SNR shift 3)

## Data

Procedural clips from `pipelines/tiny_data.py` (`centred_clip`): one shape (circle, square, triangle) of radius
{r["radius"][0]:g}–{r["radius"][1]:g} × the frame side in one of five colours (red, green, blue, yellow, white)
moving left, right, up or down across a dark background at constant speed, crossing {r["travel"]:g} of the frame on a
path centred in it: every clip of a prompt shows the same motion (only the radius is seeded), so a prompt always
gives about the same video. Prompt "a {{colour}} {{shape}} moving {{direction}}"; {r["clips_per_prompt"]} clips for
each of the 60 prompts at each stage's size. No other data was used.

## Recipe (seed {r["seed"]})

- VAE: {r["vae_steps"]} AdamW steps, batch {r["vae_batch"]}, random crops {tuple(r["vae_crop"])} (frames, h, w) of
  {r["frames"]}-frame {r["height"]}×{r["width"]} clips ({int(r["shape_crops"] * 100)} % of them on the shape), lr
  {r["vae_lr"]} cosine, loss L1 + MSE + {r["vae_kl"]}·KL. Held-out reconstruction PSNR
  **{summary["vae"]["heldout_psnr_db"]:.1f} dB**.
- Transformer: the scheduler's own objective (v-prediction at uniform timesteps), {int(r["cfg_dropout"] * 100)} %
  empty prompts; each stage a fresh AdamW (weight decay {r["dit_weight_decay"]}), warm-up then cosine to 10 % of its
  lr, on whole clips of the stage's size with positions normalised to that canvas. A stage with a *locality* weight
  adds that weight × the share of each head's attention on the video that falls outside a window of latent cells
  around the query ({windows}; the text keys are left out of the share, so attending to the text is neither
  rewarded nor punished), measured on {r.get("locality_queries")} sampled queries per
  attention call (`LocalityProbe`, training only: the saved model runs the stock processor). Without it the briefly
  trained model spreads attention almost uniformly over the clip, unlike the real video DiTs whose heads are mostly
  local; see `docs/tiny-model-training-notes.md`. Where the trained heads' attention goes (text, inside a window,
  elsewhere; per layer, head and step): `python benchmarks/tiny_attention_mass.py`.

| stage | clips (px × frames) | batch | steps | lr | locality | final loss (v) | outside share (of the video attention) | seconds |
|---|---|---:|---:|---:|---:|---:|---:|---:|
{stages}

{decoder}Trained on `{summary["device"]}` ({summary["threads"]} threads), torch {summary["torch"]}: VAE and latent scale
{secs["vae"]:.0f} s, transformer {dit_secs:.0f} s, decoder {secs["decoder"]:.0f} s, evaluation {secs["eval"]:.0f} s,
total {summary["seconds"]["total"] / 60:.1f} min{resumed}.
Reproduce: `python -m dit_sparse.pipelines.tiny_train --out pipelines/tiny_model --force --seed {r["seed"]}`
(add `--checkpoints DIR` to be able to continue an interrupted run).

## Metrics

Detector check (`tiny_data.detect`: dominant colour of the moving blob, direction of its centroid's motion) on
{ev["total"]} prompts, {r["frames"]} frames at {r["height"]}×{r["width"]}, {r["eval_steps"]} steps, guidance
{DEFAULTS["guidance_scale"]}, prompt k from seed k: **{ev["matches"]}/{ev["total"]} match their prompt**.

| prompt | detected colour | detected direction | match |
|---|---|---|---|
{clips}

## Sparse-attention profile

The profile shipped for this model, `profiles/tiny-cogvideox.json`, is made by the project's profiler at the
default canvas:

```
dit-sparse profile tiny -o profiles/tiny-cogvideox.json --force --num-prompts 2 --target-psnr 30.0
```

See `profiles/README.md` for the patterns it chose, the measured density, speed and PSNR vs dense.

## Limits

It knows only its 60 prompts' words (others map to `<unk>`) and one path per prompt; shapes are soft and colours
approximate. It is a test model for speed and quality comparisons of attention, not a generative model to use for
anything else.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dit_sparse.pipelines.tiny_train",
        description="Train the bundled tiny text-to-video CogVideoXPipeline from scratch on procedural clips.",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="folder to write (CogVideoXPipeline.save_pretrained layout)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of data, initialisation and training (default 0)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few steps at small sizes (seconds)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help="save every finished stage here; run the same command again to continue after the last one",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe.quick() if args.quick else Recipe()
    recipe.seed = args.seed
    summary = train(
        recipe, args.out, torch.device(args.device), force=args.force, checkpoints=args.checkpoints
    )
    ev = summary["eval"]
    print(f"done in {summary['seconds']['total'] / 60:.1f} min; detector {ev['matches']}/{ev['total']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
