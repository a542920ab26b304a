"""``dit-sparse eval``: dense vs sparse on the same prompts, seeds and steps (DESIGN §9).

For every (prompt, seed) the pipeline runs once dense and once with the profile applied, with the same seed, steps,
size and guidance; the sparse frames are compared with the dense ones (PSNR and SSIM per frame with torchmetrics,
mean and worst frame), next to both wall times and the mean attention density from the run report. The per-case
numbers and their summary go to a JSON file (never replacing an existing one without ``--force``) and a table.

The runs and the metrics are :mod:`dit_sparse.generate`'s (``load_pipeline``, ``resolve_profile``, ``run_mode``,
``frame_metrics``), so ``eval`` measures exactly what ``generate`` shows for one prompt.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generate import RunResult, check_profile_fits, frame_metrics, load_pipeline, resolve_profile, run_mode
from .profile import Profile, ProfileError, atomic_write_text

SCHEMA_VERSION = 1
# the bundled tiny model was trained on procedural clips of coloured shapes moving in one direction
TINY_PROMPTS: tuple[str, ...] = (
    "a red circle moving left",
    "a blue square moving up",
    "a green triangle moving right",
    "a yellow circle moving down",
)
GENERAL_PROMPTS: tuple[str, ...] = (
    "a red fox running through fresh snow, morning light",
    "a sailboat on a calm lake at sunset, gentle waves",
    "a busy city street at night in the rain, neon reflections on the wet road",
)
CPU_NOTE = "CPU wall time of the whole pipeline (VAE decode included): not GPU performance"


@dataclass
class EvalCase:
    prompt: str
    seed: int
    dense: RunResult
    sparse: RunResult
    metrics: dict[str, Any]  # frame_metrics(dense, sparse)
    record: dict[str, Any] = field(default_factory=dict)  # what the JSON holds for this case


@dataclass
class EvalResult:
    cases: list[EvalCase]
    record: dict[str, Any]  # the JSON document
    path: Path


# ------------------------------------------------------------------------------------------------ options
def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a prompt must not be empty")
    return text


def _positive(text: str) -> int:
    from .benchmarks.kernel_args import positive_int

    return positive_int(text)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from .pipelines.tiny import DEFAULTS

    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (the bundled model) or a diffusers model id / local folder; ids load from the local cache only",
    )
    p.add_argument(
        "--profile",
        default="auto",
        help="profile JSON, 'auto' for the profile shipped with the model, or 'dense' (every head dense: a sanity "
        "check, the videos must be identical)",
    )
    p.add_argument(
        "--prompts",
        nargs="+",
        type=_prompt,
        default=None,
        metavar="PROMPT",
        help=f"prompts to evaluate (default: for the tiny model {len(TINY_PROMPTS)} shape prompts such as "
        f"'{TINY_PROMPTS[0]}', otherwise {len(GENERAL_PROMPTS)} general scenes)",
    )
    p.add_argument("--negative-prompt", default="", help="negative prompt (classifier-free guidance)")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="seeds; every prompt runs with each"
    )
    p.add_argument("--steps", type=_positive, default=DEFAULTS["num_inference_steps"], help="denoising steps")
    p.add_argument("--height", type=_positive, default=DEFAULTS["height"], help="video height in pixels")
    p.add_argument("--width", type=_positive, default=DEFAULTS["width"], help="video width in pixels")
    p.add_argument(
        "--frames",
        type=_positive,
        default=DEFAULTS["num_frames"],
        help="number of frames (Wan: 4k+1; CogVideoX: 8k+1)",
    )
    p.add_argument(
        "--guidance", type=float, default=DEFAULTS["guidance_scale"], help="classifier-free guidance scale"
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="model dtype; auto = bf16 on CUDA (the sparse kernel needs fp16/bf16 there), fp32 on the CPU",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="a .json file to write, or a folder for an automatically named eval-<model>-<device>-<date>.json (+ .md); "
        "default: benchmarks/results of the source checkout",
    )
    p.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run one untimed 1-step dense pass first, so the first timed run does not pay start-up costs",
    )


# ------------------------------------------------------------------------------------------------ output path
def _out_target(out: str | None, force: bool) -> tuple[Path | None, Path]:
    """(explicit JSON file or None, folder). Fails before any work when the file exists and ``force`` is off."""
    from .benchmarks.kernel import default_out_dir

    if out is None:
        return None, default_out_dir()
    path = Path(out)
    if path.is_dir() or (not path.exists() and path.suffix.lower() != ".json"):
        return None, path
    if path.exists() and not force:
        raise SystemExit(f"error: {path} exists; pass --force to replace it (or give another --out)")
    if path.exists() and not path.is_file():
        raise SystemExit(f"error: {path} is not a regular file")
    return path, path.parent


# ------------------------------------------------------------------------------------------------ running
def _device_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype | None]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if dtype is None and torch.device(device).type == "cuda":
        dtype = torch.bfloat16  # as generate: the Triton kernel runs fp16/bf16 on CUDA
    return device, dtype


def _load_profile_file(spec: str) -> Profile | None:
    """A profile JSON is read and validated before the model loads (a typo fails in a second, not minutes)."""
    if spec in ("auto", "dense"):
        return None
    try:
        return Profile.load(spec)
    except ProfileError as exc:
        raise SystemExit(f"error: {exc}") from None


def _profile(spec: str, loaded: Profile | None, pipe: Any, model_name: str) -> Profile:
    if loaded is not None:
        check_profile_fits(loaded, pipe)
        return loaded
    if spec == "dense":
        return Profile.dense(pipe.transformer, model_id=model_name)
    return resolve_profile(spec, pipe, model_name)


def _case_args(
    args: argparse.Namespace, prompt: str, seed: int, steps: int | None = None
) -> argparse.Namespace:
    """What :func:`dit_sparse.generate.run_mode` reads."""
    return argparse.Namespace(
        prompt=prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        frames=args.frames,
        steps=args.steps if steps is None else steps,
        guidance=args.guidance,
        seed=seed,
    )


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite PSNR (identical frames) is written as null (see ``identical``)."""
    return x if math.isfinite(x) else None


def _case_record(
    prompt: str, seed: int, dense: RunResult, sparse: RunResult, m: dict[str, Any]
) -> dict[str, Any]:
    import numpy as np

    report = sparse.report or {}
    step_density = list((report.get("per_layer_step_density") or {}).values())
    diff = np.abs(dense.frames.astype(np.float64) - sparse.frames.astype(np.float64))
    return {
        "prompt": prompt,
        "seed": seed,
        "frames": int(dense.frames.shape[0]),
        "dense_s": dense.seconds,
        "sparse_s": sparse.seconds,
        "speedup": dense.seconds / sparse.seconds,
        "density": sparse.mean_density,
        "sparse_call_density": (sum(step_density) / len(step_density)) if step_density else None,
        "identical": bool(np.array_equal(dense.frames, sparse.frames)),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "psnr_mean": _finite(m["psnr_mean"]),
        "psnr_min": _finite(m["psnr_min"]),
        "ssim_mean": m["ssim_mean"],
        "ssim_min": m["ssim_min"],
        "psnr_per_frame": [_finite(p) for p in m["psnr_per_frame"]],
        "ssim_per_frame": list(m["ssim_per_frame"]),
        "per_layer_density": report.get("per_layer_density"),
        "dense_calls": len(report.get("dense_calls") or {}),
        "fallbacks": list(report.get("fallbacks") or []),
    }


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the cases: time-weighted speedup, mean density, mean and worst PSNR/SSIM."""
    dense_s = sum(c["dense_s"] for c in cases)
    sparse_s = sum(c["sparse_s"] for c in cases)
    psnr_means = [c["psnr_mean"] for c in cases if c["psnr_mean"] is not None]
    psnr_mins = [c["psnr_min"] for c in cases if c["psnr_min"] is not None]
    return {
        "cases": len(cases),
        "identical_cases": sum(1 for c in cases if c["identical"]),
        "dense_s": dense_s,
        "sparse_s": sparse_s,
        "speedup": dense_s / sparse_s if sparse_s else None,
        "density_mean": sum(c["density"] for c in cases) / len(cases),
        # null = every frame of every case identical (infinite PSNR)
        "psnr_mean": sum(psnr_means) / len(psnr_means) if psnr_means else None,
        "psnr_min": min(psnr_mins) if psnr_mins else None,
        "ssim_mean": sum(c["ssim_mean"] for c in cases) / len(cases),
        "ssim_min": min(c["ssim_min"] for c in cases),
    }


def evaluate(args: argparse.Namespace) -> EvalResult:
    """Run every (prompt, seed) dense and sparse, write the JSON, print the table; returns everything (frames too)."""
    from tqdm.auto import tqdm

    from .benchmarks.kernel import _cpu_name

    explicit, out_dir = _out_target(args.out, args.force)  # before the model loads: fail fast
    profile_file = _load_profile_file(args.profile)
    seeds = list(dict.fromkeys(int(s) for s in args.seeds))
    device, dtype = _device_dtype(args)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    pipe, model_name = load_pipeline(args.model, device, dtype)
    profile = _profile(args.profile, profile_file, pipe, model_name)
    prompts = list(dict.fromkeys(args.prompts or (TINY_PROMPTS if model_name == "tiny" else GENERAL_PROMPTS)))
    if args.warmup:
        print("warm-up run (1 dense step, not timed) ...", flush=True)
        run_mode(pipe, _case_args(args, prompts[0], seeds[0], steps=1), model_name, "dense", None)
    cases: list[EvalCase] = []
    pairs = [(p, s) for p in prompts for s in seeds]
    with tqdm(pairs, desc="eval", unit="case", leave=True) as bar:
        for prompt, seed in bar:
            bar.set_postfix_str(f"{prompt[:30]!r} seed {seed}")
            case_args = _case_args(args, prompt, seed)
            dense = run_mode(pipe, case_args, model_name, "dense", None)
            sparse = run_mode(pipe, case_args, model_name, "sparse", profile)
            metrics = frame_metrics(dense.frames, sparse.frames)
            case = EvalCase(prompt, seed, dense, sparse, metrics)
            case.record = _case_record(prompt, seed, dense, sparse, metrics)
            cases.append(case)
    records = [c.record for c in cases]
    is_cuda = torch.device(device).type == "cuda"
    gpu = torch.cuda.get_device_name(torch.device(device)) if is_cuda else None
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "dit-sparse eval",
        "command": shlex.join(sys.argv),
        "argv": list(sys.argv),
        "model": model_name,
        "profile": {
            "source": args.profile,
            "family": profile.family,
            "block_size": profile.block_size,
            "dense_steps": profile.schedule.dense_steps,
            "dense_layers": list(profile.schedule.dense_layers),
            "mean_head_density": profile.mean_density(),
        },
        "settings": {
            "prompts": prompts,
            "seeds": seeds,
            "negative_prompt": args.negative_prompt,
            "steps": args.steps,
            "height": args.height,
            "width": args.width,
            "frames": args.frames,
            "guidance": args.guidance,
            "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
            "warmup": bool(args.warmup),
        },
        "device": "cuda" if is_cuda else "cpu",
        "device_str": str(device),
        "gpu": gpu,
        "device_name": gpu or _cpu_name(),
        "note": None if is_cuda else CPU_NOTE,
        "versions": _versions(),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 2),
        "cases": records,
        "summary": summarize(records),
    }
    path = _write(record, explicit, out_dir, model_name)
    print()
    print(format_table(record))
    print(f"\nwrote {path}")
    return EvalResult(cases, record, path)


def _versions() -> dict[str, Any]:
    import diffusers

    from .benchmarks.kernel import versions

    out = {**versions(), "diffusers": diffusers.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a diffusers pipeline without text encoders
        out["transformers"] = None
    return out


def _write(record: dict[str, Any], explicit: Path | None, out_dir: Path, model_name: str) -> Path:
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    if explicit is not None:
        explicit.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(explicit, text)
        return explicit
    from .benchmarks.kernel import device_slug, write_results

    name = Path(model_name).name if Path(model_name).exists() else model_name
    json_path, _ = write_results(record, out_dir, prefix=f"eval-{device_slug(name)}", render=render_markdown)
    return json_path


# ------------------------------------------------------------------------------------------------ tables
COLUMNS = (
    "prompt",
    "seed",
    "dense (s)",
    "sparse (s)",
    "speedup",
    "density",
    "PSNR mean/min (dB)",
    "SSIM mean/min",
)


def _db(x: float | None) -> str:
    return "inf" if x is None else f"{x:.2f}"


def table_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in record["cases"]:
        rows.append(
            [
                c["prompt"],
                str(c["seed"]),
                f"{c['dense_s']:.2f}",
                f"{c['sparse_s']:.2f}",
                f"{c['speedup']:.2f}x",
                f"{c['density']:.3f}",
                f"{_db(c['psnr_mean'])} / {_db(c['psnr_min'])}",
                f"{c['ssim_mean']:.4f} / {c['ssim_min']:.4f}",
            ]
        )
    s = record["summary"]
    speed = "-" if s["speedup"] is None else f"{s['speedup']:.2f}x"
    rows.append(
        [
            f"all ({s['cases']} cases)",
            "",
            f"{s['dense_s']:.2f}",
            f"{s['sparse_s']:.2f}",
            speed,
            f"{s['density_mean']:.3f}",
            f"{_db(s['psnr_mean'])} / {_db(s['psnr_min'])}",
            f"{s['ssim_mean']:.4f} / {s['ssim_min']:.4f}",
        ]
    )
    return rows


def format_table(record: dict[str, Any]) -> str:
    from .benchmarks.kernel import format_plain

    lines = [
        f"dit-sparse eval: {record['model']} on {record['device_name']}, profile {record['profile']['source']}"
    ]
    if record["note"]:
        lines.append(f"NOTE: {record['note']}")
    lines += ["", format_plain(COLUMNS, table_rows(record))]
    lines.append(
        "speedup: dense time / sparse time (all: total over total); PSNR mean over frames (inf: identical frames), "
        "min = worst frame; density: mean fraction of attention computed (dense steps/layers count as 1)"
    )
    return "\n".join(lines)


def render_markdown(record: dict[str, Any]) -> str:
    from .benchmarks.kernel import format_markdown

    v = record["versions"]
    st = record["settings"]
    lines = [f"# dit-sparse eval: {record['model']} on {record['device_name']}", ""]
    if record["note"]:
        lines += [f"**{record['note']}**", ""]
    lines += [
        f"- command: `{record['command']}`",
        f"- profile: {record['profile']['source']} ({record['profile']['family']}, block {record['profile']['block_size']}, "
        f"{record['profile']['dense_steps']} dense warm-up steps)",
        f"- {st['height']}×{st['width']}, {st['frames']} frames, {st['steps']} steps, guidance {st['guidance']}, "
        f"dtype {st['dtype']}, seeds {st['seeds']}",
        f"- torch {v['torch']}, diffusers {v['diffusers']}, dit-sparse {v['dit_sparse']} ({v['git_commit'] or 'no git'})",
        "",
        format_markdown(COLUMNS, table_rows(record)),
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    evaluate(args)
    return 0
