"""``dit-sparse generate``: prompt → video, dense and/or sparse, with timing, density and PSNR/SSIM.

Default: the bundled tiny model (``--model tiny``), both modes, side-by-side mp4. A real diffusers model id or
folder loads from the local cache only (no network at run time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .profile import Profile, ProfileError, atomic_write_text


@dataclass
class RunResult:
    mode: str
    seconds: float
    frames: Any  # numpy (F, H, W, 3) float in [0, 1]
    report: dict[str, Any] | None = None
    mean_density: float = 1.0


@dataclass
class GenerateResult:
    out_dir: Path
    runs: dict[str, RunResult] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ model + profile
def load_pipeline(model: str, device: str, dtype: torch.dtype | None) -> tuple[Any, str]:
    """(pipeline, model name). ``tiny`` is the bundled model; anything else loads offline from cache or folder."""
    if model == "tiny":
        from .pipelines.tiny import load_tiny_pipeline

        try:
            pipe = load_tiny_pipeline()
        except FileNotFoundError as exc:
            raise SystemExit(f"error: {exc}") from None
        name = "tiny"
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"error: cannot load {model!r} offline: {exc}\nIt must be a local folder or already be in the "
                f"Hugging Face cache (download it once with `huggingface-cli download {model}`)."
            ) from None
        name = model
    pipe.to(device)
    if dtype is not None and model == "tiny":
        pipe.to(dtype=dtype)
    return pipe, name


def resolve_profile(spec: str | None, pipe: Any, model_name: str) -> Profile:
    """``auto`` = the profile shipped for this model; otherwise a path to a profile JSON."""
    if spec in (None, "auto"):
        from importlib import resources

        fname = {"tiny": "tiny-cogvideox.json"}.get(model_name)
        if fname is None:
            raise SystemExit(
                f"error: no profile ships for {model_name!r}; pass --profile PATH.json (make one with "
                "`dit-sparse profile`), or use --mode dense"
            )
        text = resources.files("dit_sparse.profiles").joinpath(fname).read_text(encoding="utf-8")
        profile = Profile.loads(text, source=f"shipped profile {fname}")
        check_profile_fits(profile, pipe)
        return profile
    try:
        profile = Profile.load(spec)
    except ProfileError as exc:
        raise SystemExit(f"error: {exc}") from None
    check_profile_fits(profile, pipe)
    return profile


def check_profile_fits(profile: Profile, pipe: Any) -> None:
    """Fail fast, before the long dense run, when the profile was made for another model."""
    from .pipelines import UnsupportedModelError, family_for

    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name, None)
        if transformer is None:
            continue
        try:
            family = family_for(transformer)
            profile.check_compatible(family.fingerprint(transformer), family.name)
        except (ProfileError, UnsupportedModelError) as exc:
            raise SystemExit(f"error: {exc}") from None


# ------------------------------------------------------------------------------------------------ running
def _pipe_call(pipe: Any, args: argparse.Namespace, model_name: str) -> Any:
    kw: dict[str, Any] = dict(
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
    )
    if model_name == "tiny":
        from .pipelines.tiny import prompt_kwargs

        kw.update(prompt_kwargs(pipe, args.prompt, args.negative_prompt or ""))
    else:
        kw["prompt"] = args.prompt
        if args.negative_prompt:
            kw["negative_prompt"] = args.negative_prompt
    return pipe(**_accepted(pipe, kw))


def _accepted(pipe: Any, kw: dict[str, Any]) -> dict[str, Any]:
    """Keep the arguments this pipeline's ``__call__`` takes (image pipelines have no ``num_frames``)."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kw
    return {k: v for k, v in kw.items() if k in params}


def _frames(output: Any) -> Any:
    frames = output.frames if hasattr(output, "frames") else output.images
    frames = frames[0]
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    import numpy as np

    arr = np.asarray(frames, dtype=np.float32)
    if arr.ndim == 3:  # a single image: (H, W, 3) -> (1, H, W, 3)
        arr = arr[None]
    return np.clip(arr, 0.0, 1.0)


def run_mode(
    pipe: Any, args: argparse.Namespace, model_name: str, mode: str, profile: Profile | None
) -> RunResult:
    from . import apply

    pipe.set_progress_bar_config(desc=f"{mode:>6}", leave=True)
    handle = apply(pipe, profile) if mode == "sparse" and profile is not None else None
    try:
        if torch.cuda.is_available() and pipe.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = _pipe_call(pipe, args, model_name)
        if torch.cuda.is_available() and pipe.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        report = handle.report().to_dict() if handle is not None else None
        density = handle.report().mean_density() if handle is not None else 1.0
    finally:
        if handle is not None:
            handle.remove()
    return RunResult(mode, seconds, _frames(output), report, density)


def frame_metrics(dense: Any, sparse: Any) -> dict[str, Any]:
    """PSNR and SSIM per frame (torchmetrics), dense as the reference; mean and worst frame."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = torch.from_numpy(sparse).permute(0, 3, 1, 2).double()  # (F, 3, H, W)
    b = torch.from_numpy(dense).permute(0, 3, 1, 2).double()
    psnr = [float(peak_signal_noise_ratio(a[i : i + 1], b[i : i + 1], data_range=1.0)) for i in range(len(a))]
    ssim = [
        _scalar(structural_similarity_index_measure(a[i : i + 1], b[i : i + 1], data_range=1.0))
        for i in range(len(a))
    ]
    finite = [p for p in psnr if math.isfinite(p)]
    return {
        "psnr_per_frame": psnr,
        "ssim_per_frame": ssim,
        "psnr_mean": (sum(finite) / len(finite)) if finite else float("inf"),
        "psnr_min": min(psnr),
        "ssim_mean": sum(ssim) / len(ssim),
        "ssim_min": min(ssim),
    }


def _scalar(x: Any) -> float:
    return float(x[0] if isinstance(x, tuple) else x)


# ------------------------------------------------------------------------------------------------ outputs
def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:40] or "video"


def new_run_dir(root: Path, prompt: str, seed: int) -> Path:
    """A fresh folder under ``root`` (never reuses one: nothing a user made is overwritten)."""
    root.mkdir(parents=True, exist_ok=True)
    base = f"{_slug(prompt)}-seed{seed}"
    for i in range(10_000):
        d = root / (base if i == 0 else f"{base}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new output folder under {root}")


def write_mp4(path: Path, frames: Any, fps: int) -> Path:
    """Encode (F, H, W, 3) floats in [0, 1] to mp4 (imageio-ffmpeg), atomically."""
    import imageio.v2 as imageio
    import numpy as np

    video = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    h, w = video.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes
        video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    fd, tmp = tempfile.mkstemp(suffix=".mp4", prefix=f".{path.stem}.", dir=str(path.parent))
    os.close(fd)
    try:
        imageio.mimwrite(tmp, list(video), fps=fps, codec="libx264", macro_block_size=1, quality=8)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def side_by_side(a: Any, b: Any) -> Any:
    import numpy as np

    gap = np.ones((a.shape[0], a.shape[1], max(2, a.shape[2] // 32), 3), dtype=a.dtype)
    return np.concatenate([a, gap, b], axis=2)


# ------------------------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> GenerateResult:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if dtype is None and device == "cuda":
        dtype = torch.bfloat16  # the Triton kernel runs fp16/bf16 on CUDA (fp32 is CPU-only)
    pipe, model_name = load_pipeline(args.model, device, dtype)
    modes = ["dense", "sparse"] if args.mode == "both" else [args.mode]
    profile = resolve_profile(args.profile, pipe, model_name) if "sparse" in modes else None
    out = GenerateResult(out_dir=new_run_dir(Path(args.out), args.prompt, args.seed))
    if args.warmup:
        print("warm-up run (not timed) ...")
        run_mode(pipe, _warmup_args(args), model_name, "dense", None)
    for mode in modes:
        out.runs[mode] = run_mode(pipe, args, model_name, mode, profile)
    fps = args.fps
    for mode, r in out.runs.items():
        out.files.append(write_mp4(out.out_dir / f"{mode}.mp4", r.frames, fps))
    if len(out.runs) == 2:
        d, s = out.runs["dense"], out.runs["sparse"]
        out.metrics = frame_metrics(d.frames, s.frames)
        out.metrics["speedup"] = d.seconds / s.seconds
        out.files.append(write_mp4(out.out_dir / "side_by_side.mp4", side_by_side(d.frames, s.frames), fps))
    report = {
        "command": "dit-sparse generate",
        "model": model_name,
        "prompt": args.prompt,
        "seed": args.seed,
        "steps": args.steps,
        "height": args.height,
        "width": args.width,
        "frames": args.frames,
        "device": str(device),
        "profile": None if profile is None else (args.profile or "auto"),
        "runs": {
            m: {"seconds": r.seconds, "mean_density": r.mean_density, "report": r.report}
            for m, r in out.runs.items()
        },
        "metrics": out.metrics,
        "files": [p.name for p in out.files],
        "versions": _versions(),
    }
    report_path = out.out_dir / "report.json"
    atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")
    out.files.append(report_path)
    print_table(out)
    return out


def _warmup_args(args: argparse.Namespace) -> argparse.Namespace:
    w = argparse.Namespace(**vars(args))
    w.steps = 1
    return w


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"dit_sparse": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def print_table(out: GenerateResult) -> None:
    rows = [("mode", "time (s)", "density", "speedup", "PSNR mean/min (dB)", "SSIM mean/min")]
    dense = out.runs.get("dense")
    for mode, r in out.runs.items():
        speed = f"{dense.seconds / r.seconds:.2f}x" if dense is not None else "-"
        quality = ("-", "-")
        if mode == "sparse" and out.metrics:
            m = out.metrics
            quality = (
                f"{m['psnr_mean']:.2f} / {m['psnr_min']:.2f}",
                f"{m['ssim_mean']:.4f} / {m['ssim_min']:.4f}",
            )
        rows.append((mode, f"{r.seconds:.2f}", f"{r.mean_density:.3f}", speed, *quality))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\nwrote {', '.join(p.name for p in out.files)} to {out.out_dir}")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from .pipelines.tiny import DEFAULTS

    p.add_argument("--prompt", default="a red circle moving left", help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (classifier-free guidance)")
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (the bundled model) or a diffusers model id / local folder; ids load from the local cache only",
    )
    p.add_argument(
        "--profile", default="auto", help="profile JSON, or 'auto' for the profile shipped with the model"
    )
    p.add_argument("--mode", choices=("dense", "sparse", "both"), default="both", help="which runs to make")
    p.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"], help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (same for dense and sparse)")
    p.add_argument("--height", type=int, default=DEFAULTS["height"], help="video height in pixels")
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help="video width in pixels")
    p.add_argument(
        "--frames",
        type=int,
        default=DEFAULTS["num_frames"],
        help="number of frames (Wan: 4k+1; CogVideoX: 8k+1)",
    )
    p.add_argument(
        "--guidance", type=float, default=DEFAULTS["guidance_scale"], help="classifier-free guidance scale"
    )
    p.add_argument("--fps", type=int, default=16, help="frames per second of the mp4s")
    p.add_argument("--out", default="outputs", help="output root; each run gets a new folder inside it")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="model dtype; auto = bf16 on CUDA (the sparse kernel needs fp16/bf16 there), fp32 on the CPU",
    )
    p.add_argument("--warmup", action="store_true", help="run one untimed 1-step pass first (fairer timings)")
