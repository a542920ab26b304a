"""Where the bundled tiny model's self-attention goes: per layer, head and sampled step, the share of a video query's
attention mass on the text tokens, on video keys inside a spatio-temporal window around the query, and on the rest
of the video.

Why: the sparse patterns only matter where video queries attend to video keys; a head that sends its mass to the
(always dense) text tokens can be skipped almost for free. This measures it on the real q/k of a dense generation
(captured by the plugin's processors with a dense profile, so the model runs unchanged)::

    python benchmarks/tiny_attention_mass.py                                  # the default canvas, table only
    python benchmarks/tiny_attention_mass.py --out benchmarks/results/x.json  # also the JSON (never replaced)
    python benchmarks/tiny_attention_mass.py --height 64 --width 64 --frames 17 --steps 4 --guidance 1

CPU is fine (one dense generation plus a softmax over the sampled rows of every call).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from dit_sparse.patterns import MaskLayout
from dit_sparse.profile import atomic_write_text


def attention_shares(
    q: torch.Tensor, k: torch.Tensor, layout: MaskLayout, window: tuple[int, int, int], rows: torch.Tensor
) -> torch.Tensor:
    """``(3, H)``: mean over ``rows`` (video token indices, 0-based among the video tokens) and the batch of the
    softmax mass each head puts on [text, video inside ``window`` = (frames, rows, cols) either side, other video].
    ``q``/``k`` are ``(B, H, N, D)`` in sequence order (text first or last as ``layout`` says)."""
    coords = layout.token_coords()  # (N, 3), text rows are -1
    is_text = coords[:, 0] < 0
    video = (~is_text).nonzero().squeeze(1)
    query = video[rows]
    p = (q[:, :, query].double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    dist = (coords[None, :, :] - coords[query][:, None, :]).abs()  # (R, N, 3)
    inside = (dist <= torch.tensor(window)).all(-1) & ~is_text[None]  # (R, N)
    text = p[..., is_text].sum(-1)
    near = (p * inside).sum(-1)
    far = 1.0 - text - near
    return torch.stack([text, near, far]).mean(dim=(1, 3))  # (3, H)


def measure(
    pipe: Any,
    prompt: str,
    *,
    height: int,
    width: int,
    frames: int,
    steps: int,
    guidance: float,
    sample_steps: list[int],
    window: tuple[int, int, int],
    queries: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One dense generation; a row per (layer, sampled step) with each head's text / near / far shares."""
    from dit_sparse import Profile, apply
    from dit_sparse.pipelines.tiny import latent_shape, prompt_kwargs

    grid = latent_shape(height, width, frames)
    text_len = pipe.transformer.config.max_text_seq_length
    layout = MaskLayout(grid, text_len, text_first=True)  # CogVideoX: text first in the joint sequence
    rows = torch.randperm(layout.num_video, generator=torch.Generator().manual_seed(seed))[:queries]
    out: list[dict[str, Any]] = []

    def capture(layer: int, step: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _: Any) -> None:
        if step in sample_steps:
            shares = attention_shares(q, k, layout, window, rows)
            out.append({"layer": layer, "step": step, **{n: shares[i].tolist() for i, n in enumerate(NAMES)}})

    handle = apply(pipe, Profile.dense(pipe.transformer))
    try:
        for b in handle.bindings:
            b.capture = capture
        pipe(
            **prompt_kwargs(pipe, prompt),
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
    finally:
        handle.remove()
    return sorted(out, key=lambda r: (r["layer"], r["step"]))


NAMES = ("text", "near", "far")


def table(rows: list[dict[str, Any]]) -> str:
    heads = len(rows[0]["text"])
    cols = " | ".join(f"h{h} text / near / far" for h in range(heads))
    lines = [f"| layer | step | {cols} |", "|---|---:|" + "---|" * heads]
    for r in rows:
        cells = " | ".join(" / ".join(f"{r[n][h]:.3f}" for n in NAMES) for h in range(heads))
        lines.append(f"| {r['layer']} | {r['step']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dit_sparse.pipelines.tiny import DEFAULTS

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--prompt", default="a red circle moving left")
    ap.add_argument("--height", type=int, default=DEFAULTS["height"])
    ap.add_argument("--width", type=int, default=DEFAULTS["width"])
    ap.add_argument("--frames", type=int, default=DEFAULTS["num_frames"])
    ap.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"])
    ap.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"])
    ap.add_argument("--sample-steps", type=int, nargs="+", default=None, help="default: first, middle, last")
    ap.add_argument("--window", type=int, nargs=3, default=(1, 3, 3), metavar=("F", "H", "W"))
    ap.add_argument("--queries", type=int, default=256, help="video queries sampled per call")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (never replaced)")
    args = ap.parse_args(argv)
    if args.out is not None and args.out.exists():
        print(f"error: {args.out} exists; choose another --out", file=sys.stderr)
        return 2
    from dit_sparse.pipelines.tiny import load_tiny_pipeline

    pipe = load_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sample = args.sample_steps or sorted({0, args.steps // 2, args.steps - 1})
    settings = {
        k: getattr(args, k) for k in ("prompt", "height", "width", "frames", "steps", "guidance", "queries")
    }
    rows = measure(pipe, sample_steps=sample, window=tuple(args.window), **settings)
    print(table(rows))
    if args.out is not None:
        result = {
            "what": "share of video-query attention mass on text / video inside the window / other video",
            "command": " ".join(["python", "benchmarks/tiny_attention_mass.py", *(argv or sys.argv[1:])]),
            "date": dt.date.today().isoformat(),
            "torch": torch.__version__,
            "settings": {**settings, "window": list(args.window), "sample_steps": sample},
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
