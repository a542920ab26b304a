"""Train the bundled tiny text-to-video model from scratch, reproducibly from a seed, on procedural clips.

    python -m dit_sparse.pipelines.tiny_train --out pipelines/tiny_model            # ≈ 1.5 h on a 2-core CPU
    python -m dit_sparse.pipelines.tiny_train --out /tmp/m --device cuda            # minutes on a GPU
    python -m dit_sparse.pipelines.tiny_train --out /tmp/m --quick                  # a smoke run (seconds)

Every part is a stock diffusers / transformers component, saved as one ``WanPipeline.save_pretrained`` folder:

1. **tokenizer**: a word-level ``PreTrainedTokenizerFast`` over the project's own vocabulary
   (:data:`~dit_sparse.pipelines.tiny_data.VOCAB`), lower-cased, ``</s>`` appended like T5's.
2. **text encoder**: a 2-layer ``UMT5EncoderModel`` (d_model 64), seeded and *frozen*: a fixed random feature
   map of the vocabulary that the transformer learns to read.
3. **VAE**: a small ``AutoencoderKLWan`` (2×2 pixel patchify like Wan 2.2's, then 4× more: 8× spatial, 4× causal
   temporal compression, 16 latent channels) trained
   with L1 + MSE + a tiny KL on random crops of clips; its ``latents_mean`` / ``latents_std`` are measured on the
   training latents.
4. **transformer**: the ``WanTransformer3DModel`` of :mod:`~dit_sparse.pipelines.tiny` trained with rectified flow
   (velocity target, logit-normal timesteps shifted like the scheduler's ``shift=3``), 10 % empty prompts for
   classifier-free guidance, and a length curriculum: latent prefixes of 5, then 9, then all 17 latent frames
   (the causal VAE makes a prefix of a clip's latents the latents of the clip's prefix).

Data: :func:`~dit_sparse.pipelines.tiny_data.make_clip` clips (65 frames, 128×128) of every prompt
"a {colour} {shape} moving {direction}" with seeded sizes, paths and speeds. At the end the script generates one
clip per evaluation prompt with the saved pipeline and checks it with the detector; the figures go into the
model card (``README.md`` in the folder) and ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .tiny import DEFAULTS, TEXT_DIM, TEXT_LENGTH, TRANSFORMER_CONFIG, VAE_CONFIG
from .tiny_data import VOCAB, ClipSpec, all_specs, detect, eval_prompts, make_clip

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0
)
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default: the transformer is trained with the padding it will see
SCHEDULER_SHIFT = 3.0


@dataclass
class Recipe:
    """Everything that decides the trained weights (with the code and the torch version)."""

    seed: int = 0
    frames: int = 65
    height: int = 128
    width: int = 128
    clips_per_prompt: int = 8
    vae_steps: int = 1800
    vae_batch: int = 4
    vae_crop: tuple[int, int, int] = (9, 48, 48)  # frames, height, width
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    # (latent frames, batch, steps): the length curriculum of the transformer
    dit_phases: list[tuple[int, int, int]] = field(
        default_factory=lambda: [(5, 8, 600), (9, 4, 450), (17, 2, 400)]
    )
    # optional full-length fine-tune of the transformer after the curriculum: fresh AdamW, constant lr, own generator
    # prompts padded to TEXT_LENGTH instead of 512: the cross-attention no longer spreads over 500 padding keys
    finetune_steps: int = 550
    finetune_batch: int = 4
    finetune_frames: int = 9
    finetune_lr: float = 3e-4
    finetune_text_length: int = TEXT_LENGTH
    decoder_steps: int = 600  # decoder-only fine-tune on the frozen encoder's latents, after the transformer
    decoder_batch: int = 4
    decoder_crop: tuple[int, int, int] = (9, 64, 64)
    decoder_lr: float = 3e-4
    dit_lr: float = 5e-4
    dit_warmup: int = 100
    cfg_dropout: float = 0.1
    eval_prompts: int = 12
    eval_frames: int = 33
    eval_steps: int = 16

    @classmethod
    def quick(cls) -> Recipe:
        return cls(
            frames=17,
            height=64,
            width=64,
            clips_per_prompt=1,
            vae_steps=2,
            vae_batch=2,
            vae_crop=(5, 32, 32),
            finetune_steps=2,
            finetune_batch=2,
            finetune_frames=3,
            decoder_steps=2,
            decoder_batch=2,
            decoder_crop=(5, 32, 32),
            dit_phases=[(2, 2, 2), (3, 2, 2)],
            dit_warmup=1,
            eval_prompts=2,
            eval_frames=9,
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
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG))
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


def _to_vae(clip: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) in [0, 1] → (3, F, H, W) in [-1, 1]."""
    return clip.permute(1, 0, 2, 3) * 2 - 1


# ------------------------------------------------------------------------------------------------ VAE
def train_vae(vae: Any, recipe: Recipe, device: torch.device, g: torch.Generator) -> dict[str, float]:
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(recipe.vae_steps, 1), 1.0)))
    )

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
    clips = training_clips(recipe)
    cf, ch, cw = crop
    out = []
    for _b in range(batch):
        spec, seed = clips[int(torch.randint(len(clips), (1,), generator=g))]
        clip = make_clip(spec, recipe.frames, recipe.height, recipe.width, seed=seed, travel_frames=65)
        f0 = int(torch.randint(recipe.frames - cf + 1, (1,), generator=g))
        y0 = int(torch.randint(recipe.height - ch + 1, (1,), generator=g))
        x0 = int(torch.randint(recipe.width - cw + 1, (1,), generator=g))
        out.append(_to_vae(clip[f0 : f0 + cf, :, y0 : y0 + ch, x0 : x0 + cw]))
    return torch.stack(out).to(device)


def finetune_decoder(vae: Any, recipe: Recipe, device: torch.device) -> dict[str, float]:
    """Decoder-only fine-tune on the frozen encoder's posterior means (what the transformer learned to generate):
    sharper, truer colours without changing the latent space. Its own generator, so it can run after any stage."""
    g = torch.Generator().manual_seed(recipe.seed + 3)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(recipe.decoder_steps, 1), 1.0)))
    )

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
def encode_dataset(vae: Any, recipe: Recipe, device: torch.device) -> tuple[torch.Tensor, list[ClipSpec]]:
    """Posterior means of every training clip, ``(N, C, F', H', W')``, and their specs."""
    clips = training_clips(recipe)
    out, specs = [], []
    bar = _progress(len(clips), "encode")
    for i in range(0, len(clips), 4):
        chunk = clips[i : i + 4]
        x = torch.stack(
            [
                _to_vae(make_clip(s, recipe.frames, recipe.height, recipe.width, seed=seed, travel_frames=65))
                for s, seed in chunk
            ]
        ).to(device)
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
        clip = make_clip(spec, recipe.frames, recipe.height, recipe.width, seed=-1 - i, travel_frames=65)
        x = _to_vae(clip).unsqueeze(0).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = float(((rec - x) / 2).pow(2).mean())
        values.append(10 * math.log10(1.0 / max(mse, 1e-12)))
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------------ DiT
def _text_table(
    pipe: Any, specs: list[ClipSpec], length: int = MAX_SEQUENCE_LENGTH
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    prompts = sorted({s.prompt for s in specs})
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=length, device="cpu"
        )
        empty, _ = pipe.encode_prompt(
            "", do_classifier_free_guidance=False, max_sequence_length=length, device="cpu"
        )
    return {p: e for p, e in zip(prompts, embeds)}, empty[0]


def shift_sigma(sigma: Any, shift: float = SCHEDULER_SHIFT) -> Any:
    """The scheduler's timestep shift of a noise level in [0, 1] (a float or a tensor): ``s·σ / (1 + (s - 1)·σ)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_loss(
    transformer: Any,
    data: LatentData,
    lat_frames: int,
    batch: int,
    recipe: Recipe,
    device: torch.device,
    g: torch.Generator,
) -> torch.Tensor:
    """Rectified-flow loss on a random batch of latent prefixes: predict ``noise - x0`` at a shifted timestep."""
    idx = torch.randint(len(data.latents), (batch,), generator=g)
    x0 = data.latents[idx, :, :lat_frames]
    ctx = data.texts[idx].clone()
    drop = torch.rand(batch, generator=g) < recipe.cfg_dropout
    ctx[drop] = data.empty
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(batch, generator=g))
    sigma = shift_sigma(sigma)
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = transformer(xt.to(device), (sigma * 1000).to(device), ctx.to(device), return_dict=False)[0]
    loss = F.mse_loss(pred.float(), (noise - x0).to(device))
    return loss


def finetune_transformer(
    transformer: Any, data: LatentData, recipe: Recipe, device: torch.device
) -> dict[str, float]:
    """Full-length (all latent frames) training at a constant low lr with a fresh optimizer and its own generator."""
    g = torch.Generator().manual_seed(recipe.seed + 4)
    opt = torch.optim.AdamW(transformer.parameters(), lr=recipe.finetune_lr, weight_decay=0.01)
    frames = recipe.finetune_frames
    transformer.train()
    losses = _optimise(
        list(transformer.parameters()),
        opt,
        None,
        recipe.finetune_steps,
        f"DiT fine-tune {frames} latent frames",
        lambda: flow_loss(transformer, data, frames, recipe.finetune_batch, recipe, device, g),
    )
    transformer.eval()
    return {"steps": recipe.finetune_steps, "final_loss": _tail_mean(losses)}


@dataclass
class LatentData:
    latents: torch.Tensor  # normalised posterior means (N, C, F', H', W')
    texts: torch.Tensor  # (N, text length, text dim) prompt embeddings, zero-padded as WanPipeline pads them
    empty: torch.Tensor  # the empty prompt's embedding (classifier-free guidance dropout)
    mean: torch.Tensor
    std: torch.Tensor


def latent_data(
    pipe: Any, recipe: Recipe, device: torch.device, text_length: int = MAX_SEQUENCE_LENGTH
) -> LatentData:
    """Encode every training clip with the pipeline's VAE and embed its prompt with the pipeline's text encoder."""
    latents, specs = encode_dataset(pipe.vae, recipe, device)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    table, empty = _text_table(pipe, specs, text_length)
    return LatentData(latents, torch.stack([table[s.prompt] for s in specs]), empty, mean, std)


def train_transformer(
    transformer: Any,
    data: LatentData,
    recipe: Recipe,
    device: torch.device,
    g: torch.Generator,
    checkpoints: Path | None = None,
) -> list[dict[str, float]]:
    opt = torch.optim.AdamW(transformer.parameters(), lr=recipe.dit_lr, weight_decay=0.01)
    total = sum(steps for _, _, steps in recipe.dit_phases)

    def lr_at(step: int) -> float:
        if step < recipe.dit_warmup:
            return (step + 1) / recipe.dit_warmup
        return 0.1 + 0.9 * 0.5 * (
            1 + math.cos(math.pi * (step - recipe.dit_warmup) / max(total - recipe.dit_warmup, 1))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    transformer.train()
    report = []
    params = list(transformer.parameters())
    for lat_frames, batch, steps in recipe.dit_phases:
        start = time.perf_counter()
        losses = _optimise(
            params,
            opt,
            sched,
            steps,
            f"DiT {lat_frames} latent frames",
            lambda: flow_loss(transformer, data, lat_frames, batch, recipe, device, g),  # noqa: B023
        )
        report.append(
            {
                "latent_frames": lat_frames,
                "batch": batch,
                "steps": steps,
                "final_loss": _tail_mean(losses),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        _log(f"DiT phase {lat_frames} latent frames: loss {report[-1]['final_loss']:.4f}")
        if checkpoints is not None:
            checkpoints.mkdir(parents=True, exist_ok=True)
            torch.save(transformer.state_dict(), checkpoints / f"transformer-{lat_frames}.pt")
    transformer.eval()
    return report


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(
    pipe: Any, specs: list[ClipSpec], frames: int, steps: int, text_length: int, seed: int = 0
) -> dict[str, Any]:
    """Generate one clip per prompt (batched) and check colour and direction with the detector."""
    videos = pipe(
        prompt=[s.prompt for s in specs],
        height=DEFAULTS["height"],
        width=DEFAULTS["width"],
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=DEFAULTS["guidance_scale"],
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=text_length,
    ).frames  # (B, F, 3, H, W) in [0, 1]
    rows = []
    for spec, video in zip(specs, videos):
        det = detect(video)
        rows.append(
            {"prompt": spec.prompt, "colour": det.colour, "direction": det.direction, "ok": det.matches(spec)}
        )
    return {"matches": sum(r["ok"] for r in rows), "total": len(rows), "clips": rows}


# ------------------------------------------------------------------------------------------------ main
def train(
    recipe: Recipe,
    out: Path,
    device: torch.device,
    force: bool = False,
    checkpoints: Path | None = None,
    resume: Path | None = None,
) -> dict[str, Any]:
    """All stages: VAE → encode → transformer → decoder fine-tune → evaluation → save.

    ``resume``: a folder an earlier run of this script saved (with its ``training.json``); its VAE encoder,
    latent statistics and transformer are kept and only the stages it has not run are run, with its recipe. Every
    stage draws from its own seeded generator or from the chain of the stages before it, so a resumed run writes the
    same weights as an uninterrupted one.
    """
    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"error: {out} exists and is not empty; pass --force to replace it")
    t_start = time.perf_counter()
    if resume is not None:
        pipe, summary = _resume(resume, device)
        recipe = Recipe(**{k: tuple(v) if k.endswith("crop") else v for k, v in summary["recipe"].items()})
        for name in ("decoder", "eval"):
            summary.pop(name, None)
            summary["seconds"].pop(name, None)
        summary["seconds"].pop("total", None)
        summary["resumed_from"] = str(resume)
        summary["recipe"] = asdict(recipe)
        data = None
    else:
        pipe, summary, data = _train_base(recipe, device, checkpoints)
    timings = summary["seconds"]

    if recipe.finetune_steps > 0 and "finetune" not in summary:
        t0 = time.perf_counter()
        if data is None:  # resumed: encode again (the encoder is the saved one, so the latents are the same)
            data = latent_data(pipe, recipe, device, recipe.finetune_text_length)
        else:
            specs = [s for s, _ in training_clips(recipe)]
            table, empty = _text_table(pipe, specs, recipe.finetune_text_length)
            data.texts = torch.stack([table[s.prompt] for s in specs])
            data.empty = empty
        _log(
            f"transformer fine-tune: {recipe.finetune_steps} steps at {recipe.finetune_frames} latent frames"
        )
        summary["finetune"] = finetune_transformer(pipe.transformer, data, recipe, device)
        timings["finetune"] = round(time.perf_counter() - t0, 1)
    del data

    t0 = time.perf_counter()
    _log(f"VAE decoder fine-tune: {recipe.decoder_steps} steps")
    summary["decoder"] = finetune_decoder(pipe.vae, recipe, device)
    summary["decoder"]["heldout_psnr_db"] = vae_psnr(pipe.vae, recipe, device)
    timings["decoder"] = round(time.perf_counter() - t0, 1)
    _log(
        f"VAE held-out reconstruction PSNR after the decoder fine-tune {summary['decoder']['heldout_psnr_db']:.1f} dB"
    )

    t0 = time.perf_counter()
    pipe.to("cpu")
    text_length = recipe.finetune_text_length if recipe.finetune_steps > 0 else MAX_SEQUENCE_LENGTH
    ev = evaluate(pipe, eval_prompts(recipe.eval_prompts), recipe.eval_frames, recipe.eval_steps, text_length)
    timings["eval"] = round(time.perf_counter() - t0, 1)
    _log(f"detector: {ev['matches']}/{ev['total']} generated clips match their prompt")
    summary["eval"] = ev
    # total = every stage's time, also when the stages ran in two processes (resume)
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 1)
    timings["this_process"] = round(time.perf_counter() - t_start, 1)
    _save(pipe, summary, out, force)
    return summary


def _resume(folder: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    from diffusers import WanPipeline

    info = folder / "training.json"
    if not info.is_file():
        raise SystemExit(f"error: --resume {folder}: no training.json there (not a folder this script saved)")
    summary = json.loads(info.read_text())
    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True).to(device)
    return pipe, summary


def _train_base(
    recipe: Recipe, device: torch.device, checkpoints: Path | None
) -> tuple[Any, dict[str, Any], LatentData]:
    """Tokenizer, text encoder, VAE, latent statistics and transformer (the stages the transformer depends on)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    timings: dict[str, float] = {}

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), recipe.seed)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed + 1)
        vae = AutoencoderKLWan(**VAE_CONFIG).to(device)
        torch.manual_seed(recipe.seed + 2)
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG).to(device)

    _log(f"VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, {recipe.vae_steps} steps")
    t0 = time.perf_counter()
    vae_report = train_vae(vae, recipe, device, g)
    timings["vae"] = round(time.perf_counter() - t0, 1)
    vae_report["heldout_psnr_db"] = vae_psnr(vae, recipe, device)
    _log(f"VAE held-out reconstruction PSNR {vae_report['heldout_psnr_db']:.1f} dB")

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        transformer=transformer,
    )
    t0 = time.perf_counter()
    data = latent_data(pipe, recipe, device)
    vae.register_to_config(
        latents_mean=[round(float(v), 6) for v in data.mean],
        latents_std=[round(float(v), 6) for v in data.std],
    )
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(checkpoints / "vae")
    timings["encode"] = round(time.perf_counter() - t0, 1)

    _log(
        f"transformer: {sum(p.numel() for p in transformer.parameters()):,} parameters, phases {recipe.dit_phases}"
    )
    t0 = time.perf_counter()
    dit_report = train_transformer(transformer, data, recipe, device, g, checkpoints)
    timings["transformer"] = round(time.perf_counter() - t0, 1)
    summary = {
        "recipe": asdict(recipe),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "vae": vae_report,
        "transformer": dit_report,
        "seconds": timings,
    }
    return pipe, summary, data


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
    phases = "\n".join(
        f"| {p['latent_frames']} | {p['batch']} | {p['steps']} | {p['final_loss']:.4f} | {p['seconds']:.0f} |"
        for p in summary["transformer"]
    )
    clips = "\n".join(
        f"| {c['prompt']} | {c['colour']} | {c['direction']} | {'yes' if c['ok'] else 'no'} |"
        for c in ev["clips"]
    )
    secs = summary["seconds"]
    ft = summary.get("finetune")
    finetune = (
        f"- Transformer fine-tune at full length: {ft['steps']} steps, batch {r['finetune_batch']}, constant lr "
        f"{r['finetune_lr']}, fresh AdamW, own generator; final loss {ft['final_loss']:.4f} ({secs['finetune']:.0f} s).\n"
        if ft
        else ""
    )
    resumed = (
        " The stages ran in two processes: the decoder stage was added to the script while the first process was"
        " training the transformer, and `--resume` ran it (and the evaluation) on that process's saved output;"
        " every stage has its own seeded generator or continues the chain before it, so one uninterrupted run"
        " writes the same weights."
        if "resumed_from" in summary
        else ""
    )
    return f"""# dit-sparse tiny text-to-video model

A stock diffusers `WanPipeline` small enough to run on a laptop CPU, trained from scratch by
`python -m dit_sparse.pipelines.tiny_train` (source: `pipelines/tiny_train.py`). It is the default model of
`dit-sparse generate`: big enough that attention dominates (4,352 video tokens per self-attention at the default
65 frames × 128×128), small enough to run dense on a CPU in well under a minute.

```python
from diffusers import WanPipeline
pipe = WanPipeline.from_pretrained("pipelines/tiny_model")
video = pipe("a red circle moving left", num_frames=65, height=128, width=128, num_inference_steps=16).frames[0]
```

## Components

- transformer: `WanTransformer3DModel`, 4 layers, 2 heads × 64, patch 1×1×1, text dim 64 (trained)
- VAE: `AutoencoderKLWan`, 2×2 pixel patchify then base dim 16, `dim_mult` [1, 2, 2], 16 latent channels: 8×
  spatial / 4× causal temporal compression (trained)
- text encoder: `UMT5EncoderModel`, 2 layers, d_model 64, seeded random and frozen (a fixed feature map the
  transformer learns to read); tokenizer: word level over the project's own vocabulary (`tiny_data.VOCAB`)
- scheduler: `FlowMatchEulerDiscreteScheduler(shift={SCHEDULER_SHIFT})`

## Data

Procedural clips from `pipelines/tiny_data.py`: one shape (circle, square, triangle) in one of five colours
(red, green, blue, yellow, white) moving left, right, up or down across a dark background, {r["frames"]} frames at
{r["height"]}×{r["width"]}, with seeded size, path and speed; prompt "a {{colour}} {{shape}} moving {{direction}}".
{r["clips_per_prompt"]} clips for each of the 60 prompts. No other data was used.

## Recipe (seed {r["seed"]})

- VAE: {r["vae_steps"]} AdamW steps, batch {r["vae_batch"]}, random crops {r["vae_crop"]} (frames, h, w),
  lr {r["vae_lr"]} cosine, loss L1 + MSE + {r["vae_kl"]}·KL. Held-out reconstruction PSNR
  **{summary["vae"]["heldout_psnr_db"]:.1f} dB**.
- Transformer: rectified flow (velocity target), logit-normal timesteps shifted by {SCHEDULER_SHIFT}, AdamW
  lr {r["dit_lr"]} (warm-up {r["dit_warmup"]}, cosine to 10 %), {int(r["cfg_dropout"] * 100)} % empty prompts,
  prompts padded to 512 tokens as `WanPipeline` pads them, length curriculum over latent prefixes:

| latent frames | batch | steps | final loss | seconds |
|---:|---:|---:|---:|---:|
{phases}

{finetune}- VAE decoder fine-tune (after the transformer; the encoder and so the latent space stay frozen):
  {r["decoder_steps"]} AdamW steps, batch {r["decoder_batch"]}, crops {r["decoder_crop"]}, lr {r["decoder_lr"]} cosine,
  L1 + MSE on the posterior means. Held-out reconstruction PSNR **{summary["decoder"]["heldout_psnr_db"]:.1f} dB**.

Trained on `{summary["device"]}` ({summary["threads"]} threads), torch {summary["torch"]}: VAE {secs["vae"]:.0f} s,
encoding {secs["encode"]:.0f} s, transformer {secs["transformer"]:.0f} s, decoder {secs["decoder"]:.0f} s, evaluation
{secs["eval"]:.0f} s, total {secs["total"] / 60:.1f} min.{resumed}
Reproduce: `python -m dit_sparse.pipelines.tiny_train --out pipelines/tiny_model --force --seed {r["seed"]}`.

## Metrics

Detector check (`tiny_data.detect`: dominant colour of the moving blob, direction of its centroid's motion) on
{ev["total"]} prompts, {r["eval_frames"]} frames, {r["eval_steps"]} steps, guidance {DEFAULTS["guidance_scale"]},
seed 0: **{ev["matches"]}/{ev["total"]} match their prompt**.

| prompt | detected colour | detected direction | match |
|---|---|---|---|
{clips}

## Limits

It knows only its 60 prompts' words (others map to `<unk>`); shapes are soft and colours approximate; it is a test
model for speed and quality comparisons of attention, not a generative model to use for anything else.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dit_sparse.pipelines.tiny_train",
        description="Train the bundled tiny text-to-video WanPipeline from scratch on procedural clips.",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="folder to write (WanPipeline.save_pretrained layout)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of data, initialisation and training (default 0)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few steps at small sizes (seconds)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--checkpoints", type=Path, default=None, help="also save the VAE and each phase's weights here"
    )
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a folder an earlier run saved: keep its VAE encoder and transformer, run the stages it lacks",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe.quick() if args.quick else Recipe()
    recipe.seed = args.seed
    summary = train(
        recipe,
        args.out,
        torch.device(args.device),
        force=args.force,
        checkpoints=args.checkpoints,
        resume=args.resume,
    )
    ev = summary["eval"]
    print(f"done in {summary['seconds']['total'] / 60:.1f} min; detector {ev['matches']}/{ev['total']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
