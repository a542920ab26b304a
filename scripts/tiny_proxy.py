"""Developer harness: train the bundled tiny model's *transformer alone* on a proxy latent, to find a recipe fast.

The proxy latent is the clip itself average-pooled 8× in space and 4× in time (causal: latent frame 0 is pixel
frame 0 alone), 3 channels, normalised; it decodes by nearest-neighbour upsampling, which the detector reads
correctly on training clips. No VAE is trained, so one experiment takes minutes, and what it measures is only
whether the transformer learns colour and direction (see docs/tiny-model-training-notes.md for the results).

    python scripts/tiny_proxy.py --steps 600 --lf 5                       # Wan, 128 px, the shipped data
    python scripts/tiny_proxy.py --size 64 --lf 3 --speed 2 --steps 3000  # an 8×8 latent grid, 1 cell per frame
    python scripts/tiny_proxy.py --arch cog --speed 0 --steps 600         # CogVideoX (absolute positions)

Every ``--eval-every`` steps it samples one clip per evaluation prompt (Euler, classifier-free guidance) at each
``--eval-lf`` latent length and prints how many the detector matches, with ``prompt>detected`` pairs
(first two letters of the colour, first letter of the direction).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_sparse.pipelines.tiny import TEXT_DIM, TEXT_LENGTH
from dit_sparse.pipelines.tiny_data import (
    DIRECTIONS,
    all_specs,
    detect,
    eval_prompts,
    make_clip,
    moving_clip,
)
from dit_sparse.pipelines.tiny_train import build_text_encoder, build_tokenizer

# the earlier bundled model's Wan transformer (kept for --arch wan, the experiments in the training notes)
WAN_CONFIG: dict = dict(
    patch_size=(1, 1, 1),
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

SCHEDULER_SHIFT = 3.0  # FlowMatchEulerDiscreteScheduler(shift=3), the Wan-era tiny model's sampler

# the key offset (frames, rows, columns) each shift head looks at: where the shape was one latent frame earlier
SHIFT_OFFSETS = {"left": (-1, 0, 1), "right": (-1, 0, -1), "up": (-1, 1, 0), "down": (-1, -1, 0)}


def rope_angles(model: Any) -> list[torch.Tensor]:
    """Per axis (frames, rows, columns): the rotation angle per position step of each of that axis's RoPE pairs."""
    rope = model.rope
    theta = torch.atan2(rope.freqs_sin[1, 1::2], rope.freqs_cos[1, 0::2])  # (head_dim / 2,)
    return list(theta.split([rope.t_dim // 2, rope.h_dim // 2, rope.w_dim // 2]))


def shift_head_qk(
    model: Any, offset: tuple[int, int, int], min_theta: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant (head_dim,) q and k whose RoPE score peaks where key position - query position = ``offset``:
    q_p = (cos θδ, sin θδ), k_p = (1, 0) on every pair turning at least ``min_theta`` per step, 0 elsewhere."""
    qs, ks = [], []
    for theta, delta in zip(rope_angles(model), offset):
        on = (theta >= min_theta).float()
        ang = theta * delta
        qs.append(torch.stack([on * torch.cos(ang), on * torch.sin(ang)], -1).flatten())
        ks.append(torch.stack([on, torch.zeros_like(on)], -1).flatten())
    return torch.cat(qs), torch.cat(ks)


def init_shift_heads(model: Any, scale: float) -> None:
    """Make the self-attention heads of blocks 1 and 2 content-independent shift operators, one per direction
    (block 1: left, right; block 2: up, down): zero q/k weights, q/k biases from :func:`shift_head_qk`, qk-norm
    weight ``scale`` (the sharpness). Values and outputs keep their random init; training may change all of it."""
    dirs = [("left", "right"), ("up", "down")]
    for block, names in zip((1, 2), dirs):
        attn = model.blocks[block].attn1
        q, k = zip(*(shift_head_qk(model, SHIFT_OFFSETS[n]) for n in names))
        with torch.no_grad():
            attn.to_q.weight.zero_()
            attn.to_k.weight.zero_()
            attn.to_q.bias.copy_(torch.cat(q))
            attn.to_k.bias.copy_(torch.cat(k))
            attn.norm_q.weight.fill_(scale)
            attn.norm_k.weight.fill_(scale)


def shift_sigma(sigma: Any, shift: float = SCHEDULER_SHIFT) -> Any:
    """The flow-matching scheduler's timestep shift of a noise level in [0, 1] (a float or a tensor):
    ``s·σ / (1 + (s - 1)·σ)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def noise_levels(batch: int, frames: int, frame_noise: float, g: torch.Generator) -> torch.Tensor:
    """Training noise levels ``(batch, frames)``: shifted logit-normal, one per sample or (in ``frame_noise`` of the
    samples) one per latent frame."""
    per_frame = torch.rand(batch, generator=g) < frame_noise
    same = shift_sigma(torch.sigmoid(torch.randn(batch, generator=g))).view(-1, 1).expand(-1, frames)
    own = shift_sigma(torch.sigmoid(torch.randn(batch, frames, generator=g)))
    return torch.where(per_frame.view(-1, 1), own, same)


def pool(clip: torch.Tensor) -> torch.Tensor:
    """``(F, 3, H, W)`` in [0, 1] → ``(3, 1 + (F - 1) / 4, H / 8, W / 8)`` in [-1, 1]."""
    x = clip * 2 - 1
    rest = x[1:].reshape(-1, 4, *x.shape[1:]).mean(1)
    z = torch.cat([x[:1], rest]).permute(1, 0, 2, 3)
    return F.avg_pool3d(z.unsqueeze(0), (1, 8, 8))[0]


class Proxy:
    def __init__(self, a: argparse.Namespace) -> None:
        from diffusers import WanPipeline

        self.a = a
        self.grid = a.size // 8
        torch.manual_seed(a.seed)
        self.g = torch.Generator().manual_seed(a.seed)
        tok = build_tokenizer()
        self.text = WanPipeline(
            tokenizer=tok,
            text_encoder=build_text_encoder(len(tok), a.seed),
            transformer=None,
            vae=None,
            scheduler=None,
        )
        self.specs = [s for s in all_specs() if s.direction in a.dirs]
        frames = 4 * (max([*a.eval_lf, a.lf]) - 1) + 1
        clips, prompts = [], []
        for i in range(a.clips_per_prompt):
            for j, spec in enumerate(self.specs):
                seed = i * 1000 + j
                if a.speed > 0:
                    clip = moving_clip(spec, frames, a.size, a.size, seed, a.speed, (a.rmin, a.rmax))
                else:  # the shipped data: make_clip at the 65-frame speed (or centred over the clip with --arch cog)
                    travel = frames if a.arch == "cog" else max(65, frames)
                    clip = make_clip(spec, frames, a.size, a.size, seed=seed, travel_frames=travel)
                clips.append(pool(clip))
                prompts.append(spec.prompt)
        z = torch.stack(clips)
        self.mean = z.mean((0, 2, 3, 4), keepdim=True)
        self.std = z.std((0, 2, 3, 4), keepdim=True)
        self.z = (z - self.mean) / self.std
        table = dict(zip(sorted(set(prompts)), self.embed(sorted(set(prompts)))))
        self.texts = torch.stack([table[p] for p in prompts])
        self.empty = self.embed([""])[0]
        self.model = self._model()
        if a.init is not None:
            self.model.load_state_dict(load_file(a.init))

    def embed(self, prompts: list[str]) -> torch.Tensor:
        e, _ = self.text.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH, device="cpu"
        )
        return e

    def _model(self) -> torch.nn.Module:
        a = self.a
        if a.arch == "wan":
            from diffusers import WanTransformer3DModel

            cfg = dict(WAN_CONFIG, in_channels=3, out_channels=3, num_attention_heads=a.heads)
            cfg.update(attention_head_dim=a.dim // a.heads, ffn_dim=2 * a.dim)
            model = WanTransformer3DModel(**cfg)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "attn1.norm_q" in name or "attn1.norm_k" in name:
                        p.fill_(a.qk_init)
            if a.shift_init > 0:
                init_shift_heads(model, a.shift_init)
            return model
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel(
            num_attention_heads=a.heads,
            attention_head_dim=a.dim // a.heads,
            in_channels=3,
            out_channels=3,
            time_embed_dim=a.dim,
            text_embed_dim=self.texts.shape[-1],
            num_layers=4,
            sample_width=self.grid,
            sample_height=self.grid,
            sample_frames=4 * (a.lf - 1) + 1,
            patch_size=1,
            max_text_seq_length=TEXT_LENGTH,
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Velocity for ``x (B, 3, F, h, w)`` at per-frame noise levels ``sigma (B, F)``."""
        b, f = sigma.shape
        if self.a.arch == "cog":  # one timestep per sample; (B, F, C, h, w) layout
            out = self.model(x.permute(0, 2, 1, 3, 4), ctx, sigma[:, 0] * 1000, return_dict=False)[0]
            return out.permute(0, 2, 1, 3, 4)
        t = (sigma * 1000).view(b, f, 1).expand(-1, -1, self.grid * self.grid).reshape(b, -1)
        return self.model(x, t, ctx, return_dict=False)[0]

    @torch.no_grad()
    def sample(self, prompts: list[str], lf: int, seed: int = 0) -> torch.Tensor:
        a = self.a
        x = torch.randn(
            len(prompts), 3, lf, self.grid, self.grid, generator=torch.Generator().manual_seed(seed)
        )
        cond = self.embed(prompts)
        uncond = self.empty.expand_as(cond)
        sig = [shift_sigma(1 - i / a.eval_steps) for i in range(a.eval_steps)] + [0.0]
        for i in range(a.eval_steps):
            s = torch.full((len(prompts), lf), sig[i])
            vc, vu = self.forward(x, s, cond), self.forward(x, s, uncond)
            x = x + (sig[i + 1] - sig[i]) * (vu + a.guidance * (vc - vu))
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z * self.std[0] + self.mean[0]
        up = z.repeat_interleave(8, -1).repeat_interleave(8, -2)
        frames = torch.cat([up[:, :1], up[:, 1:].repeat_interleave(4, 1)], 1)
        return ((frames.permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1)

    def evaluate(self, lf: int) -> str:
        ev = [
            s
            if s.direction in self.a.dirs
            else dataclasses.replace(s, direction=self.a.dirs[k % len(self.a.dirs)])
            for k, s in enumerate(eval_prompts(12))
        ]
        rows, ok = [], 0
        for spec, z in zip(ev, self.sample([s.prompt for s in ev], lf)):
            d = detect(self.decode(z))
            ok += d.matches(spec)
            rows.append(
                f"{spec.colour[:2]}{spec.direction[0]}>{(d.colour or '-')[:2]}{(d.direction or '-')[0]}"
            )
        return f"{ok}/{len(ev)} " + " ".join(rows)

    def print_evaluations(self) -> None:
        self.model.eval()
        for lf in self.a.eval_lf:
            print(f"  eval {lf} latent frames: {self.evaluate(lf)}", flush=True)

    def train(self) -> None:
        a = self.a
        model = self.model
        if a.steps == 0:  # evaluate only (e.g. an --init model at another size)
            self.print_evaluations()
            return
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / 50, 1) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / a.steps)))
        )
        model.train()
        losses: list[float] = []
        t0 = time.time()
        for step in range(a.steps):
            idx = torch.randint(len(self.z), (a.batch,), generator=self.g)
            x0 = self.z[idx, :, : a.lf]
            ctx = self.texts[idx].clone()
            ctx[torch.rand(a.batch, generator=self.g) < 0.1] = self.empty
            noise = torch.randn(x0.shape, generator=self.g)
            sigma = noise_levels(a.batch, a.lf, a.frame_noise, self.g)  # (B, F)
            s = sigma.view(a.batch, 1, a.lf, 1, 1)
            loss = F.mse_loss(self.forward((1 - s) * x0 + s * noise, sigma, ctx), noise - x0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (step + 1) % 100 == 0:
                print(
                    f"step {step + 1} loss {sum(losses[-100:]) / 100:.4f} {time.time() - t0:.0f}s", flush=True
                )
            if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
                self.print_evaluations()
                model.train()
        if a.save:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.save)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch", choices=("wan", "cog"), default="wan", help="WanTransformer3DModel or CogVideoX (2B-style)"
    )
    p.add_argument("--size", type=int, default=128, help="frame size in px (latent grid size/8)")
    p.add_argument("--lf", type=int, default=5, help="latent frames trained on")
    p.add_argument(
        "--eval-lf", type=int, nargs="+", default=[5, 9], help="latent frames generated in evaluations"
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=128, help="transformer width (heads × head dim)")
    p.add_argument("--qk-init", type=float, default=1.0, help="initial self-attention qk-norm weight (Wan)")
    p.add_argument(
        "--shift-init",
        type=float,
        default=0.0,
        help="start blocks 1-2 as per-direction shift heads (sharpness)",
    )
    p.add_argument(
        "--frame-noise", type=float, default=0.0, help="share of samples with a noise level per frame"
    )
    p.add_argument("--speed", type=float, default=0.0, help="px per frame (0: the shipped make_clip data)")
    p.add_argument("--rmin", type=float, default=8.0, help="shape radius range in px (with --speed)")
    p.add_argument("--rmax", type=float, default=11.0)
    p.add_argument("--dirs", type=lambda s: s.split(","), default=list(DIRECTIONS), help="e.g. left,right")
    p.add_argument("--clips-per-prompt", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--eval-steps", type=int, default=16)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these weights (another run's --save, a .safetensors file)",
    )
    p.add_argument(
        "--save",
        type=Path,
        default=None,
        help="write the transformer's weights here at the end (safetensors)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.size % 8:
        raise SystemExit(f"error: --size must be a multiple of 8, got {a.size}")
    Proxy(a).train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
