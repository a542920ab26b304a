"""Argument parsing and error reporting for ``dit-sparse profile`` and ``dit-sparse inspect``."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..profile import Profile

PROFILE_DESCRIPTION = (
    "Calibrate a diffusers DiT and write its sparse-attention profile. Runs the calibration prompts dense, captures "
    "every self-attention call's q/k/v on a few sampled steps, measures each candidate pattern's relative output "
    "error per head against dense (block-pooled statistics, never an N×N matrix), picks per head the cheapest "
    "candidate within --budget (or meets --density) using a cost model timed on the real kernel, chooses dense "
    "warm-up steps and dense layers, then checks the profile end-to-end on a held-out prompt (PSNR/SSIM vs dense). "
    "A checkpoint <out>.ckpt.json is written after every calibration sample: --resume continues from it. "
    "Several GPUs: `accelerate launch -m dit_sparse.cli profile ...` (or torchrun) spreads the calibration samples "
    "over the processes (one GPU each), merges their statistics, and rank 0 searches, verifies and writes the profile."
)


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="'tiny' (the bundled model), a local diffusers folder, or a model id in the local cache"
    )
    p.add_argument("-o", "--out", required=True, help="profile JSON to write")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite --out; without --resume also discard a stale checkpoint",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from <out>.ckpt.json of an interrupted run"
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="file with one prompt per line ('#' comments); the last is held out for the end-to-end check "
        "(default: a built-in video or image prompt set)",
    )
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N calibration prompts")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every prompt runs with every seed")
    p.add_argument(
        "--height", type=int, default=None, help="pixels (default: the model's default; tiny: 176)"
    )
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's default; tiny: 176)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default: the model's; tiny: 33)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of the target use (tiny: 16)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (tiny: 5.0)")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--budget",
        type=float,
        default=None,
        help="max relative L2 error of each head's attention output vs dense (default 0.05)",
    )
    target.add_argument("--density", type=float, default=None, help="instead: target mean density in (0, 1]")
    target.add_argument(
        "--target-psnr",
        type=float,
        default=None,
        help="instead: the sparsest error budget whose held-out video keeps this mean PSNR (dB) vs dense, found by "
        "bisection over budgets 0.5 … 0 (a few extra held-out runs; the tried budgets are recorded)",
    )
    p.add_argument(
        "--sample-steps",
        default=None,
        help="comma-separated steps to capture (default: 0,1,2 and three evenly spaced later steps)",
    )
    p.add_argument(
        "--max-query-blocks",
        type=int,
        default=32,
        help="query blocks sampled per attention call for the error statistics (all when fewer)",
    )
    p.add_argument(
        "--block-size", type=int, choices=(16, 32, 64, 128), default=None, help="default: by length"
    )
    p.add_argument(
        "--cost-model",
        default=None,
        metavar="PROFILE",
        help="reuse the kernel cost model recorded in an earlier profile of this model at the same size and device "
        "instead of timing the kernel again: the search then repeats exactly (on a busy or shared machine the "
        "timings, and with them which layers and steps stay dense, vary from run to run)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the end-to-end dense vs sparse check")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="model dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def reused_cost_model(
    earlier: Profile, path: str, cfg: Any, fingerprint: Any, family: str, device: str
) -> Any:
    """The cost model recorded in ``earlier`` (a profile read from ``path``), after checking that it was timed for
    this model at this run's size on this kind of device (``"cpu"`` / ``"cuda..."``): the kernel's cost depends on
    both."""
    from ..profile import ProfileError
    from .run import ProfilerError
    from .search import CostModel

    try:
        earlier.check_compatible(fingerprint, family)
    except ProfileError as exc:
        raise ProfilerError(f"{path} is a profile of another model: {exc}") from None
    cal = earlier.calibration
    theirs = {k: cal.get(k) for k in ("height", "width", "frames")}
    ours = {"height": cfg.height, "width": cfg.width, "frames": cfg.frames}
    if theirs != ours:
        raise ProfilerError(
            f"{path} was timed at {theirs['height']}×{theirs['width']} px, {theirs['frames']} frames; this run is "
            f"{ours['height']}×{ours['width']} px, {ours['frames']} frames. Reuse a cost model of the same size, "
            "or drop --cost-model"
        )
    timed_on = str(cal.get("device", ""))
    if timed_on.startswith("cpu") != device.startswith("cpu"):
        raise ProfilerError(
            f"{path} was timed on {timed_on or 'an unknown device'}; this run is on {device}. Reuse a cost model "
            "timed on the same kind of device, or drop --cost-model"
        )
    cost = CostModel.from_dict(cal["cost_model"])
    return replace(cost, source=f"reused from {Path(path).name} ({cost.source})")


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise SystemExit(f"error: {what} is empty")
    return vals


def run_profile(args: argparse.Namespace) -> int:
    import torch

    from .run import (
        DEFAULT_IMAGE_PROMPTS,
        DEFAULT_VIDEO_PROMPTS,
        IMAGE_FAMILIES,
        ProfileConfig,
        ProfilerError,
        checkpoint_files,
        checkpoint_path,
        default_encoder,
        profile_pipeline,
        read_prompts,
    )

    out = Path(args.out)
    world, rank, local_rank = _init_distributed()
    ckpts = checkpoint_files(out)
    # every cheap check before the long run
    if out.exists() and not args.force:
        return _fail(f"{out} exists; pass --force to overwrite it")
    if ckpts and not (args.resume or args.force):
        return _fail(
            f"{ckpts[0]} exists (an interrupted run): pass --resume to continue it or --force to start over"
        )
    if args.budget is not None and not (args.budget >= 0):
        return _fail(f"--budget must be a relative error >= 0 (e.g. 0.05 = 5 %), got {args.budget}")
    if args.target_psnr is not None and not (args.target_psnr > 0):
        return _fail(f"--target-psnr must be a PSNR in dB > 0 (e.g. 30), got {args.target_psnr}")
    if args.target_psnr is not None and args.no_verify:
        return _fail("--target-psnr needs the held-out check; drop --no-verify")
    if args.density is not None and not (0 < args.density <= 1):
        return _fail(f"--density must be in (0, 1] (fraction of attention computed), got {args.density}")
    for name in ("height", "width", "frames", "steps", "num_prompts", "max_query_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        prompts = read_prompts(args.prompts) if args.prompts else None
    except ProfilerError as exc:
        return _fail(str(exc))
    seeds = _ints(args.seeds, "--seeds")
    sample_steps = _ints(args.sample_steps, "--sample-steps") if args.sample_steps else None
    earlier: Profile | None = None
    if args.cost_model is not None:
        from ..profile import Profile, ProfileError

        try:
            earlier = Profile.load(args.cost_model)
        except ProfileError as exc:
            return _fail(f"--cost-model: {exc}")
        if not isinstance(earlier.calibration.get("cost_model"), dict):
            return _fail(
                f"--cost-model: {args.cost_model} records no cost model (it was not made by dit-sparse profile); "
                "drop --cost-model to time the kernel"
            )
    # --force alone starts over (rank 0 drops every checkpoint); with --resume it only allows replacing --out
    if args.force and not args.resume and rank == 0:
        for path in ckpts:
            path.unlink(missing_ok=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()

    from ..generate import load_pipeline
    from ..pipelines import UnsupportedModelError, family_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if dtype is None and device.startswith("cuda") and args.model != "tiny":
        dtype = torch.bfloat16
    pipe, model_name = load_pipeline(
        args.model, device, dtype
    )  # SystemExit with an offline message if missing
    try:
        family = family_for(pipe.transformer)
    except UnsupportedModelError as exc:
        return _fail(str(exc))
    except AttributeError:
        return _fail(
            f"{args.model!r} is not a pipeline with a .transformer (dit-sparse profiles DiT pipelines)"
        )
    defaults: dict[str, object] = {}
    if model_name == "tiny":
        from ..pipelines.tiny import DEFAULTS

        defaults = {
            "height": DEFAULTS["height"],
            "width": DEFAULTS["width"],
            "frames": DEFAULTS["num_frames"],
            "steps": DEFAULTS["num_inference_steps"],
            "guidance": DEFAULTS["guidance_scale"],
        }
    image = family.name in IMAGE_FAMILIES
    if prompts is None and model_name == "tiny":  # the trained bundled model knows only its own prompts
        from ..pipelines.tiny_data import eval_prompts

        prompts = [spec.prompt for spec in eval_prompts(12)]
    if prompts is None:
        prompts = list(DEFAULT_IMAGE_PROMPTS if image else DEFAULT_VIDEO_PROMPTS)
    holdout = None if args.no_verify else prompts[-1]
    calib = prompts[:-1] if len(prompts) > 1 else prompts
    if args.num_prompts is not None:
        calib = calib[: args.num_prompts]
    cfg = ProfileConfig(
        prompts=calib,
        holdout=holdout,
        seeds=seeds,
        height=args.height or defaults.get("height"),  # type: ignore[arg-type]
        width=args.width or defaults.get("width"),  # type: ignore[arg-type]
        frames=None if image else (args.frames or defaults.get("frames")),  # type: ignore[arg-type]
        steps=args.steps or int(defaults.get("steps", 50)),  # type: ignore[call-overload]
        guidance=args.guidance if args.guidance is not None else float(defaults.get("guidance", 5.0)),  # type: ignore[arg-type]
        budget=None
        if args.density is not None or args.target_psnr is not None
        else (0.05 if args.budget is None else args.budget),
        density=args.density,
        target_psnr=args.target_psnr,
        sample_steps=sample_steps,
        max_query_blocks=args.max_query_blocks,
        block_size=args.block_size,
    )
    cost = None
    if earlier is not None:
        try:
            fingerprint = family.fingerprint(pipe.transformer)
            cost = reused_cost_model(earlier, args.cost_model, cfg, fingerprint, family.name, device)
        except ProfilerError as exc:
            return _fail(f"--cost-model: {exc}")
    command = command_line(args)
    try:
        profile = profile_pipeline(
            pipe,
            cfg,
            out,
            model_id=model_name,
            encode=default_encoder(model_name, pipe),
            resume=args.resume,
            cost=cost,
            command=command,
            progress=not args.quiet,
        )
    except (ProfilerError, ValueError) as exc:
        kept = checkpoint_files(out)
        return _fail(
            f"{exc}\n(statistics so far stay in {kept[0]}; rerun with --resume)" if kept else str(exc)
        )
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
        return _fail(
            f"out of GPU memory ({exc}); lower --max-query-blocks or the resolution; statistics so far stay in "
            f"{checkpoint_path(out, rank if world > 1 else None)}: rerun with --resume"
        )
    if rank == 0:
        print(summary_table(profile))
        print(f"\nwrote {out}" + (f" (calibrated on {world} processes)" if world > 1 else ""))
    return 0


def _init_distributed() -> tuple[int, int, int]:
    """(world size, rank, local rank). Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment) joins their process group: NCCL with CUDA, gloo otherwise."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 1, 0, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def command_line(args: argparse.Namespace) -> str:
    """The command as run (options that differ from their defaults), for the profile's provenance."""
    parts = ["dit-sparse", "profile", args.model, "-o", args.out]
    for key, value in vars(args).items():
        if key in ("model", "out", "func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        defaults = {"seeds": "0", "max_query_blocks": 32, "dtype": "auto"}
        if value is True:
            parts.append(flag)
        elif defaults.get(key) != value:
            parts += [flag, str(value)]
    return shlex.join(parts)


def summary_table(profile: object) -> str:
    from ..profile import Profile
    from .inspect import describe

    assert isinstance(profile, Profile)
    s = profile.summary
    rows = [
        ("mean density (sparse steps)", s.get("predicted_mean_density"), s.get("measured_mean_density")),
        (
            "mean density (all steps)",
            s.get("predicted_mean_density_all_steps"),
            s.get("measured_mean_density"),
        ),
        ("attention speedup", s.get("predicted_attention_speedup"), None),
        ("end-to-end speedup", None, s.get("measured_speedup")),
        ("PSNR mean / min (dB)", None, _pair(s.get("psnr_mean"), s.get("psnr_min"))),
        ("SSIM mean / min", None, _pair(s.get("ssim_mean"), s.get("ssim_min"))),
        ("max head rel. error", s.get("max_head_rel_error"), None),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [describe(profile), "", f"{'':<{w}}  {'predicted':>12}  {'measured':>16}"]
    for name, pred, meas in rows:
        lines.append(f"{name:<{w}}  {_fmt(pred):>12}  {_fmt(meas):>16}")
    return "\n".join(lines)


def _pair(a: object, b: object) -> str | None:
    return None if a is None else f"{_fmt(a)} / {_fmt(b)}"


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------ inspect
def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile JSON")
    p.add_argument(
        "--png-dir", default=None, help="also write density.png, patterns.png and example masks here"
    )


def run_inspect_cli(args: argparse.Namespace) -> int:
    from ..profile import ProfileError
    from .inspect import run_inspect

    try:
        text, files = run_inspect(args.profile, args.png_dir)
    except ProfileError as exc:
        return _fail(str(exc))
    print(text)
    if files:
        print(f"wrote {len(files)} PNGs to {args.png_dir}: " + ", ".join(f.name for f in files))
    return 0
