"""How long ``dit-sparse profile`` takes on a Wan2.1-T2V-1.3B pipeline, and how much GPU memory it needs.

The pipeline has random weights (nothing is downloaded, the hub is never asked):

- transformer: ``WanTransformer3DModel`` with the published Wan2.1-T2V-1.3B config (``e2e_args.MODELS``), built
  directly on the device in the run dtype by :func:`dit_sparse.benchmarks.e2e.build_transformer` (no float32 copy
  of the 1.3B weights; the modules real checkpoints keep in float32 stay float32);
- vae: ``AutoencoderKLWan()`` with its default config (the Wan2.1 VAE's), random;
- text encoder: a one-layer random ``UMT5EncoderModel`` whose ``d_model`` is the transformer's ``text_dim``
  (4096) with a small feed-forward, over the bundled tiny model's word-level tokenizer (its quality does not matter:
  the profiler only needs prompt embeddings of the real shape, 512 tokens);
- scheduler: ``UniPCMultistepScheduler`` as Wan's (flow prediction, flow sigmas, ``flow_shift`` 3.0 for 480p).

The pipeline is saved with ``save_pretrained`` (safetensors) to ``--model-dir`` (default: a temporary folder,
removed afterwards; a folder this script built earlier with the same settings is reused), and the profiler runs
in-process on that folder exactly as ``dit-sparse profile DIR -o OUT --height H --width W --frames F --steps S
--device D --dtype T`` (it loads the folder with ``DiffusionPipeline.from_pretrained(torch_dtype=...)``). Measured:
the wall time of the build and of the whole profile command, the peak GPU memory of each
(``torch.cuda.max_memory_allocated``), and per profiler stage (loading, cost-model calibration, search, verify, each
calibration sample) the time and peak memory, by wrapping those functions of ``dit_sparse.profiler.run`` for the
run. The result JSON (GPU, versions, git commit, command, model, settings, timings, the profile's summary and
provenance and the whole profile) goes to ``--out`` as ``profile-wan-<gpu>-<date>.json`` plus a ``.md`` summary,
never replacing an earlier result (``-2``, ``-3``, ... are added).

GPU (the full 480×832, 81 frames, 50 steps run; about 12 profiler runs of the pipeline, i.e. tens of minutes)::

    python benchmarks/profile_wan.py --out benchmarks/results
    python benchmarks/profile_wan.py --num-prompts 1 --no-verify          # one calibration sample, no check
    python benchmarks/profile_wan.py --model-dir /tmp/wan-random -- --max-query-blocks 16   # more profiler options

CPU smoke test (the same code path on a scaled-down transformer/VAE/text encoder in float32; its timings say
nothing about the GPU)::

    python benchmarks/profile_wan.py --tiny --out /tmp/pw

Random weights: the attention maps are not a trained model's, so the chosen patterns, densities and PSNR are not
Wan's; the point is the profiler's cost (time, memory) at the real shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
BENCHMARK = "dit-sparse profile on Wan2.1-T2V-1.3B (random weights)"
MODEL_KEY = "wan2.1-1.3b-480p"  # e2e_args.MODELS / TINY key
BUILD_INFO = "profile_wan_build.json"  # written into --model-dir: what was built there (for reuse)
TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "tiny_model" / "tokenizer"
FLOW_SHIFT = 3.0  # Wan2.1's UniPC flow shift at 480p (5.0 at 720p)
GIB = 1024**3
CPU_NOTE = "tiny configs on the CPU: proves the benchmark runs; not GPU performance"
GPU_TINY_NOTE = "tiny configs on the GPU: a smoke test, not the profiler's cost on Wan2.1-1.3B"

# The full run and --tiny: pixels, frames, steps, and the text encoder's size (its d_model is the transformer's
# text_dim). Tiny: the e2e benchmark's tiny Wan (2 layers, 2 heads × 64, text_dim 32) with a small VAE.
SIZES: dict[str, dict[str, int]] = {
    "full": {"height": 480, "width": 832, "frames": 81, "steps": 50},
    "tiny": {"height": 64, "width": 96, "frames": 9, "steps": 4},
}
TEXT_ENCODER: dict[str, dict[str, int]] = {
    "full": {"num_layers": 1, "num_heads": 4, "d_kv": 64, "d_ff": 256},
    "tiny": {"num_layers": 1, "num_heads": 2, "d_kv": 8, "d_ff": 32},
}
TINY_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],  # 4× in time, 8× in space like the real VAE
}
PROFILE_SUMMARY_KEYS = (
    "budget",
    "target_density",
    "predicted_mean_density",
    "predicted_mean_density_all_steps",
    "predicted_attention_speedup",
    "max_head_rel_error",
    "measured_mean_density",
    "measured_dense_seconds",
    "measured_sparse_seconds",
    "measured_speedup",
    "psnr_mean",
    "psnr_min",
    "ssim_mean",
    "ssim_min",
    "pattern_counts",
)


# --------------------------------------------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/profile_wan.py",
        description=(
            "Time `dit-sparse profile` (wall clock of the whole command) and its peak GPU memory on a "
            "Wan2.1-T2V-1.3B pipeline with random weights at 480x832, 81 frames, 50 steps on one GPU. Builds the "
            "pipeline (transformer from the published config, default AutoencoderKLWan, a 1-layer UMT5 text encoder "
            "of width 4096, Wan's UniPC scheduler), saves it with save_pretrained to --model-dir, runs the profiler "
            "in-process on that folder, and writes a JSON (GPU, versions, command, model, timings per stage, peak "
            "memory, the profile's figures) to --out. Nothing is downloaded. Options after `--` go to the profiler "
            "unchanged. --tiny: the same on a tiny config on the CPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="GPU: python benchmarks/profile_wan.py --out benchmarks/results    "
        "CPU smoke test: python benchmarks/profile_wan.py --tiny --out /tmp/pw",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="scaled-down transformer (2 layers, 2×64), VAE and text encoder at "
        f"{SIZES['tiny']['height']}x{SIZES['tiny']['width']}, {SIZES['tiny']['frames']} frames, "
        f"{SIZES['tiny']['steps']} steps, on the CPU in fp32 unless --device/--dtype say otherwise",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the result JSON/.md (default: benchmarks/results of this checkout)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="where the random-weight pipeline is saved (default: a temporary folder, removed at the end). A "
        f"folder with a {BUILD_INFO} of the same build is reused; any other non-empty folder is refused",
    )
    parser.add_argument(
        "--profile-out",
        default=None,
        help="also keep the profile JSON here (it is embedded in the result JSON either way); must not exist",
    )
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda, or cpu with --tiny"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="weights and run dtype (default: bf16 on CUDA, fp32 on the CPU)",
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (default 480; --tiny: 64)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 832; --tiny: 96)")
    parser.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (default 81; --tiny: 9)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; --tiny: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="profiler: use only the first N calibration prompts"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="profiler: skip the end-to-end dense vs sparse check"
    )
    parser.add_argument("--budget", type=float, default=None, help="profiler: per-head relative error budget")
    parser.add_argument("--quiet", action="store_true", help="profiler: no progress bars")
    parser.add_argument(
        "profiler_args",
        nargs=argparse.REMAINDER,
        help="after `--`: more `dit-sparse profile` options, passed through unchanged",
    )
    return parser


@dataclass(frozen=True)
class Settings:
    tiny: bool
    device: str  # "cuda" | "cpu"
    dtype_name: str  # "bf16" | "fp16" | "fp32"
    height: int
    width: int
    frames: int
    steps: int
    seed: int
    out_dir: Path
    model_dir: Path | None  # None: a temporary folder
    profile_out: Path | None
    profiler_args: tuple[str, ...]  # everything after the model/-o/size/device/dtype options
    note: str | None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("out_dir", "model_dir", "profile_out"):
            d[key] = None if d[key] is None else str(d[key])
        d["profiler_args"] = list(self.profiler_args)
        d["flow_shift"] = FLOW_SHIFT
        return d

    def build_key(self) -> dict[str, Any]:
        """What a saved pipeline must agree on to be reused."""
        return {"tiny": self.tiny, "dtype": self.dtype_name, "seed": self.seed, "schema": SCHEMA_VERSION}


def resolve_settings(args: argparse.Namespace, cuda_available: bool) -> Settings:
    """Check the options and pick device, dtype and sizes; ``ValueError`` names a bad option."""
    tiny = bool(args.tiny)
    if args.device == "auto":
        device = "cpu" if tiny or not cuda_available else "cuda"
    else:
        device = args.device
    if device == "cuda" and not cuda_available:
        raise ValueError(
            "--device cuda was given but torch sees no CUDA device; use --tiny to run on the CPU"
        )
    if device == "cpu" and not tiny:
        raise ValueError(
            "the full Wan2.1-1.3B profile needs a CUDA GPU (no CUDA device found, or --device cpu); use --tiny "
            "for the CPU smoke test"
        )
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    sizes = SIZES["tiny" if tiny else "full"]
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()}
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if values["height"] % 16 or values["width"] % 16:
        raise ValueError(
            f"--height/--width must be multiples of 16 (VAE 8× and patch 2×), got {values['height']}x{values['width']}"
        )
    if values["frames"] % 4 != 1:
        raise ValueError(
            f"--frames must be 4k+1 (the VAE's 4× causal time compression), got {values['frames']}"
        )
    passthrough: list[str] = []
    if args.num_prompts is not None:
        passthrough += ["--num-prompts", str(args.num_prompts)]
    if args.no_verify:
        passthrough.append("--no-verify")
    if args.budget is not None:
        passthrough += ["--budget", str(args.budget)]
    if args.quiet:
        passthrough.append("--quiet")
    extra = list(args.profiler_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    owned = {"-o", "--out", "--height", "--width", "--frames", "--steps", "--device", "--dtype", "--force"}
    clash = sorted({a.split("=", 1)[0] for a in extra} & owned)
    if clash:
        raise ValueError(f"set {', '.join(clash)} with this script's own options, not after `--`")
    from dit_sparse.benchmarks.kernel import default_out_dir

    note = CPU_NOTE if device == "cpu" else (GPU_TINY_NOTE if tiny else None)
    return Settings(
        tiny=tiny,
        device=device,
        dtype_name=dtype_name,
        seed=int(args.seed),
        out_dir=Path(args.out) if args.out else default_out_dir(),
        model_dir=Path(args.model_dir) if args.model_dir else None,
        profile_out=Path(args.profile_out) if args.profile_out else None,
        profiler_args=(*passthrough, *extra),
        note=note,
        **values,
    )


# --------------------------------------------------------------------------------------------------- memory + stages


def _cuda_sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / GIB, 3)


@dataclass
class StageClock:
    """Seconds, calls and peak GPU memory of named stages, which may nest.

    The CUDA peak counter is reset on entering and leaving every stage; before each reset the peak so far is folded
    into every open stage and into the overall peak, so each stage's peak is the maximum over its own duration and
    :meth:`overall_peak` the maximum since :meth:`start`."""

    cuda: bool
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    events: list[tuple[str, float]] = field(default_factory=list)  # (stage, end time since start)
    _open: list[list[int]] = field(default_factory=list)
    _overall: int = 0
    _t0: float = 0.0

    def start(self) -> None:
        self._overall = 0
        self._t0 = time.perf_counter()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def _fold(self) -> None:
        if not self.cuda:
            return
        import torch

        m = int(torch.cuda.max_memory_allocated())
        for frame in self._open:
            frame[0] = max(frame[0], m)
        self._overall = max(self._overall, m)
        torch.cuda.reset_peak_memory_stats()

    def overall_peak(self) -> int | None:
        if not self.cuda:
            return None
        self._fold()
        return self._overall

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._fold()
        frame = [0]
        self._open.append(frame)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _cuda_sync(self.cuda)
            t1 = time.perf_counter()
            self._fold()
            self._open.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + (t1 - t0)
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.cuda:
                self.peak[name] = max(self.peak.get(name, 0), frame[0])
            self.events.append((name, t1 - self._t0))

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed

    def to_json(self) -> dict[str, Any]:
        return {
            name: {
                "seconds": round(self.seconds[name], 3),
                "calls": self.calls[name],
                "peak_gib": _gib(self.peak.get(name)) if self.cuda else None,
            }
            for name in self.seconds
        }


# (module, attribute, stage): the profiler functions timed for the per-stage breakdown. They are looked up at call
# time by the profiler (module globals, or imported inside run_profile), so replacing the attribute times them.
STAGE_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("dit_sparse.generate", "load_pipeline", "load_pipeline"),
    ("dit_sparse.profiler.run", "profile_pipeline", "profile_pipeline"),
    ("dit_sparse.profiler.run", "calibrate_cost_model", "cost_model"),
    ("dit_sparse.profiler.run", "save_checkpoint", "checkpoint_save"),
    ("dit_sparse.profiler.run", "_search", "search"),
    ("dit_sparse.profiler.run", "verify", "verify"),
    ("dit_sparse.profiler.run", "search_for_psnr", "search_for_psnr"),
)


@contextlib.contextmanager
def instrumented(clock: StageClock) -> Iterator[list[str]]:
    """Time :data:`STAGE_TARGETS` with ``clock`` while inside; yields the targets that were not found (the
    profiler's internals changed: those stages are simply not timed)."""
    import importlib

    replaced: list[tuple[Any, str, Any]] = []
    missing: list[str] = []
    for module_name, attr, stage in STAGE_TARGETS:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if not callable(fn):
            missing.append(f"{module_name}.{attr}")
            continue
        replaced.append((module, attr, fn))
        setattr(module, attr, clock.wrap(stage, fn))
    try:
        yield missing
    finally:
        for module, attr, fn in reversed(replaced):
            setattr(module, attr, fn)


def stage_breakdown(clock: StageClock) -> dict[str, Any]:
    """The timed stages plus the derived ones: ``calibrate`` (the dense calibration runs: profile_pipeline less
    search and verify) and the seconds of each calibration sample (between checkpoint saves)."""
    stages = clock.to_json()
    total = clock.seconds.get("profile_pipeline")
    derived: dict[str, Any] = {}
    if total is not None:
        after = sum(clock.seconds.get(s, 0.0) for s in ("search", "verify", "search_for_psnr"))
        derived["calibrate_s"] = round(total - after, 3)
    starts = [t for name, t in clock.events if name == "load_pipeline"]
    saves = [t for name, t in clock.events if name == "checkpoint_save"]
    if starts and saves:
        edges = [starts[-1], *saves]
        derived["calibration_sample_s"] = [round(b - a, 3) for a, b in itertools.pairwise(edges)]
        derived["calibration_sample_note"] = "the first sample includes the cost-model calibration"
    return {"stages": stages, **derived}


# --------------------------------------------------------------------------------------------------- build


def transformer_spec(tiny: bool) -> Any:
    """The ``E2EModel`` whose config is built: the published Wan2.1-T2V-1.3B one, or the e2e benchmark's tiny Wan."""
    from dit_sparse.benchmarks.e2e_args import MODELS, TINY

    return (TINY if tiny else MODELS)[MODEL_KEY]


def model_summary(st: Settings) -> dict[str, Any]:
    """Layers, heads, head dim and the self-attention length at this size (no weights needed)."""
    spec = transformer_spec(st.tiny)
    cfg = dict(spec.config)
    pt, ph, pw = cfg["patch_size"]
    latent = ((st.frames - 1) // 4 + 1, st.height // 8, st.width // 8)  # Wan VAE: 4× time (causal), 8× space
    grid = (latent[0] // pt, latent[1] // ph, latent[2] // pw)
    return {
        "transformer": spec.transformer_class,
        "config_source": spec.source,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "num_layers": int(cfg["num_layers"]),
        "heads": int(cfg["num_attention_heads"]),
        "head_dim": int(cfg["attention_head_dim"]),
        "latent": [int(cfg["in_channels"]), *latent],
        "grid": list(grid),
        "seq_len": grid[0] * grid[1] * grid[2],
        "text_len": 512,  # WanPipeline's max_sequence_length: cross-attention only
        "calls_per_step": 2,  # WanPipeline runs cond and uncond as two forwards with guidance > 1
    }


def build_pipeline_folder(st: Settings, model_dir: Path) -> dict[str, Any]:
    """Build the random-weight WanPipeline on the run device in the run dtype and ``save_pretrained`` it
    (safetensors) to ``model_dir``; returns what was built (parameter counts, dtypes, seconds)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from dit_sparse.benchmarks.e2e import build_transformer, default_dtype

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[st.dtype_name]
    spec = transformer_spec(st.tiny)
    t0 = time.perf_counter()
    transformer = build_transformer(spec, st.device, dtype, st.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    te = TEXT_ENCODER["tiny" if st.tiny else "full"]
    te_config = UMT5Config(vocab_size=len(tokenizer), d_model=int(spec.config["text_dim"]), **te)
    torch.manual_seed(st.seed + 1)
    with default_dtype(dtype), torch.device(st.device):
        text_encoder = UMT5EncoderModel(te_config).eval().requires_grad_(False)
        vae = (AutoencoderKLWan(**TINY_VAE) if st.tiny else AutoencoderKLWan()).eval().requires_grad_(False)
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    _cuda_sync(st.device == "cuda")
    t1 = time.perf_counter()
    pipe.save_pretrained(str(model_dir), safe_serialization=True)
    t2 = time.perf_counter()

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def dtypes(module: torch.nn.Module) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in module.parameters():
            key = str(p.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + p.numel()
        return out

    info = {
        "params": {
            "transformer": count(transformer),
            "vae": count(vae),
            "text_encoder": count(text_encoder),
        },
        "param_dtypes": {
            "transformer": dtypes(transformer),
            "vae": dtypes(vae),
            "text_encoder": dtypes(text_encoder),
        },
        "text_encoder_config": {"d_model": te_config.d_model, "vocab_size": te_config.vocab_size, **te},
        "vae_config": dict(TINY_VAE) if st.tiny else "AutoencoderKLWan() defaults (the Wan2.1 VAE)",
        "scheduler_config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        "tokenizer": str(TOKENIZER_DIR.relative_to(TOKENIZER_DIR.parents[2])),
        "create_s": round(t1 - t0, 3),
        "save_s": round(t2 - t1, 3),
        "folder_bytes": sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()),
    }
    del pipe, transformer, text_encoder, vae
    return info


def prepare_model_dir(st: Settings, model_dir: Path, clock: StageClock) -> dict[str, Any]:
    """Reuse ``model_dir`` when this script built it with the same settings, build it when empty or missing,
    refuse anything else."""
    info_path = model_dir / BUILD_INFO
    if info_path.is_file():
        saved = json.loads(info_path.read_text(encoding="utf-8"))
        if saved.get("key") != st.build_key():
            raise ValueError(
                f"{model_dir} holds a pipeline built with {saved.get('key')}, this run needs {st.build_key()}; "
                "pass another --model-dir"
            )
        return {**saved["build"], "reused": True}
    if model_dir.exists() and any(model_dir.iterdir()):
        raise ValueError(f"--model-dir {model_dir} is not empty and was not built by this script")
    model_dir.mkdir(parents=True, exist_ok=True)
    with clock.stage("build"):
        build = build_pipeline_folder(st, model_dir)
    gc.collect()
    if st.device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the built modules are gone: the profile starts from an empty device
    build["wall_s"] = round(clock.seconds["build"], 3)
    build["peak_gib"] = _gib(clock.peak.get("build"))
    from dit_sparse.profile import atomic_write_text

    atomic_write_text(info_path, json.dumps({"key": st.build_key(), "build": build}, indent=1) + "\n")
    return {**build, "reused": False}


# --------------------------------------------------------------------------------------------------- profile


def profile_argv(st: Settings, model_dir: Path, profile_path: Path) -> list[str]:
    """The ``dit-sparse`` argv of the measured command."""
    return [
        "profile",
        str(model_dir),
        "-o",
        str(profile_path),
        "--height",
        str(st.height),
        "--width",
        str(st.width),
        "--frames",
        str(st.frames),
        "--steps",
        str(st.steps),
        "--device",
        st.device,
        "--dtype",
        st.dtype_name,
        *st.profiler_args,
    ]


def run_profiler(argv: Sequence[str], clock: StageClock) -> dict[str, Any]:
    """``dit_sparse.cli.main(argv)`` in this process: exit code, wall seconds, peak GPU memory, stages."""
    from dit_sparse.cli import main

    rc: int | None = None
    error: str | None = None
    with instrumented(clock) as untimed:
        t0 = time.perf_counter()
        try:
            with clock.stage("profile_command"):
                rc = main(list(argv))
        except SystemExit as exc:  # load_pipeline exits with an offline message; argparse on bad options
            rc = exc.code if isinstance(exc.code, int) else 2
            error = str(exc)
        wall = time.perf_counter() - t0
    if rc == 130 and not error:  # the CLI turns Ctrl-C / SIGINT (gpu_check.sh's stage time limit) into 130
        error = (
            f"interrupted after {wall:.0f} s (SIGINT: a time limit or Ctrl-C); the stages and calibration samples "
            "recorded here are the ones that ran"
        )
    return {
        "exit_code": rc,
        "error": error if error else (None if rc == 0 else f"dit-sparse profile exited with {rc}"),
        "wall_s": round(wall, 3),
        "peak_gib": _gib(clock.peak.get("profile_command")),
        "untimed_stages": untimed,
        **stage_breakdown(clock),
    }


def profile_figures(profile_path: Path) -> dict[str, Any]:
    """The profile as written (validated by loading it) and its key figures."""
    from dit_sparse.profile import Profile

    profile = Profile.load(profile_path)
    data = profile.to_dict()
    summary = data["summary"]
    cal = dict(data["calibration"])
    cal["num_candidates"] = len(cal.pop("candidates", []) or [])
    densities = [h["density"] for heads in data["layers"] for h in heads if h.get("density") is not None]
    return {
        "summary": {k: summary.get(k) for k in PROFILE_SUMMARY_KEYS},
        "provenance": cal,
        "block_size": data["block_size"],
        "schedule": data["schedule"],
        "num_heads": sum(len(heads) for heads in data["layers"]),
        "min_head_density": min(densities) if densities else None,
        "profile": data,
    }


# --------------------------------------------------------------------------------------------------- output


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def summary_lines(result: dict[str, Any]) -> list[str]:
    m, b, r = result["model"], result["build"], result["profile_run"]
    fig = result.get("profile_figures") or {}
    s = fig.get("summary", {})
    st = result["settings"]
    lines = [
        f"model: {m['num_layers']} layers, {m['heads']}×{m['head_dim']}, grid {'×'.join(map(str, m['grid']))} = "
        f"{m['seq_len']} tokens per self-attention ({m['calls_per_step']} calls per layer per step)",
        f"size: {st['height']}x{st['width']}, {st['frames']} frames, {st['steps']} steps, "
        f"{st['device']} {st['dtype_name']}",
        f"build: {'reused ' + str(st['model_dir']) if b.get('reused') else _fmt(b.get('wall_s')) + ' s'}"
        + (
            f", peak {_fmt(b.get('peak_gib'))} GiB"
            if b.get("peak_gib") is not None and not b.get("reused")
            else ""
        ),
        f"profile: {_fmt(r['wall_s'])} s, peak GPU memory {_fmt(r['peak_gib'])} GiB, exit code {r['exit_code']}",
    ]
    for name, stage in r.get("stages", {}).items():
        if name == "profile_command":
            continue
        peak = f", peak {_fmt(stage['peak_gib'])} GiB" if stage["peak_gib"] is not None else ""
        lines.append(f"  {name}: {_fmt(stage['seconds'])} s ({stage['calls']} calls){peak}")
    if "calibrate_s" in r:
        lines.append(
            f"  calibrate (derived): {_fmt(r['calibrate_s'])} s, per sample {r.get('calibration_sample_s')}"
        )
    if s:
        lines.append(
            f"density predicted {_fmt(s.get('predicted_mean_density'))} / measured "
            f"{_fmt(s.get('measured_mean_density'))}, attention speedup predicted "
            f"{_fmt(s.get('predicted_attention_speedup'))}, end-to-end measured {_fmt(s.get('measured_speedup'))}, "
            f"PSNR {_fmt(s.get('psnr_mean'))} dB, max head error {_fmt(s.get('max_head_rel_error'))}"
        )
    if r.get("error"):
        lines.append(f"ERROR: {r['error']}")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    head = [
        f"# {result['benchmark']}",
        "",
        f"- device: {result['device_name']} ({result['device']})",
        f"- command: `{result['command']}`",
        f"- profiler command: `{result['profile_command']}`",
        f"- dit-sparse {result['versions']['dit_sparse']}, commit {result['versions']['git_commit']}, torch "
        f"{result['versions']['torch']}, diffusers {result['versions'].get('diffusers')}, triton "
        f"{result['versions']['triton']}",
    ]
    if result["note"]:
        head.append(f"- NOTE: {result['note']}")
    return "\n".join([*head, "", *(f"- {line}" for line in summary_lines(result)), ""])


def run(st: Settings, log: Callable[[str], None] = print) -> tuple[dict[str, Any], Path]:
    import diffusers
    import transformers

    from dit_sparse.benchmarks.kernel import result_header, write_results

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    result = result_header(
        BENCHMARK,
        st,
        started,
        SCHEMA_VERSION,
        {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
        lists=(),
    )
    result.pop("rows")
    result["model"] = model_summary(st)
    m = result["model"]
    log(
        f"{BENCHMARK} on {result['device_name']} ({st.device}, {st.dtype_name})"
        + (f": {st.note}" if st.note else "")
    )
    log(f"transformer: {m['num_layers']} layers, {m['heads']}×{m['head_dim']}, seq len {m['seq_len']}")
    clock = StageClock(cuda=st.device == "cuda")
    clock.start()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="profile-wan-")))
        model_dir = st.model_dir or work / "pipeline"
        result["build"] = prepare_model_dir(st, model_dir, clock)
        log(
            f"pipeline in {model_dir}: "
            + ("reused" if result["build"]["reused"] else f"built in {result['build']['wall_s']} s")
        )
        profile_path = st.profile_out or work / "profile.json"
        argv = profile_argv(st, model_dir, profile_path)
        result["profile_command"] = "dit-sparse " + " ".join(argv)
        result["profile_argv"] = argv
        log(f"running: {result['profile_command']}")
        result["profile_run"] = run_profiler(argv, clock)
        result["profile_figures"] = profile_figures(profile_path) if profile_path.is_file() else None
        if result["profile_figures"] is None and result["profile_run"]["error"] is None:
            result["profile_run"]["error"] = f"the profiler wrote no {profile_path}"
    result["peak_gib_overall"] = _gib(clock.overall_peak())
    result["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    json_path, md_path = write_results(
        result, st.out_dir, prefix="profile-wan-tiny" if st.tiny else "profile-wan", render=render_markdown
    )
    log("")
    for line in summary_lines(result):
        log(line)
    log(f"wrote {json_path}")
    log(f"wrote {md_path}")
    return result, json_path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never ask the hub (everything here is local)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # the Triton kernels can only run in the interpreter here; it must be set before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        st = resolve_settings(args, cuda)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if st.profile_out is not None and st.profile_out.exists():
        print(f"error: --profile-out {st.profile_out} exists", file=sys.stderr)
        return 2
    try:
        result, _ = run(st, lambda line: print(line, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result["profile_run"]["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
