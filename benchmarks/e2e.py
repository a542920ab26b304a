"""``dit-sparse bench e2e``: one denoising step of a full-size DiT, dense vs sparse, and a full-schedule estimate.

Method (issue 9, DESIGN §7): each transformer is built from its published config (``e2e_args.GPU_MODELS``) with
random weights, directly on the device in the benchmark dtype (bf16 by default; the modules real checkpoints keep
in float32 stay float32). One **denoising step** is what the pipeline runs per step: one transformer forward with
batch 2 (cond + uncond) for models that use classifier-free guidance (Wan, CogVideoX), batch 1 for the
guidance-distilled ones (HunyuanVideo, FLUX), with the pipeline's padded text length. Per model we time:

- ``dense``: the transformer as diffusers runs it (its default attention backend), no plugin;
- ``dense-cudnn``: the same inside ``sdpa_kernel(CUDNN_ATTENTION)`` (CUDA only);
- ``dense-hooked``: ``dit_sparse.apply`` with ``Profile.dense``: every call goes through the hook and processors
  and runs the model's own attention, so the difference to ``dense`` is the plugin's overhead, and the attention
  time of a dense step is measured;
- ``<pattern>@<density>``: a uniform ``radial`` or ``window`` profile whose parameters give the mask density closest
  to the target on this model's layout, and ``draft`` with ``budget`` = the target, all measured at a sparse step.

Step times are CUDA-event (CPU: ``perf_counter``) medians over ``--reps`` steps after ``--warmup`` untimed ones.
The attention time of a step is the sum of CUDA-event intervals around every self-attention core call (the hooked
and sparse runs; not under torch.compile, where the Python-level timer would break the graph). Mask and permutation
builds are cached per run (timed once: ``mask_build_ms``); draft's per-call mask is part of the attention time and
also timed alone (``draft_ms``). The full schedule estimate is ``dense_steps`` dense (hooked) steps plus the rest
sparse, plus one mask build, against ``schedule_steps`` dense steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .e2e_args import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_E2E_DENSITIES,
    MODELS,
    PATTERN_CHOICES,
    TINY,
    E2EModel,
    unknown_model_message,
)
from .kernel import (
    _flatten,
    _fmt,
    _fmt_x,
    _reason,
    _timer,
    cli_entry,
    default_out_dir,
    format_markdown,
    format_plain,
    markdown_head,
    resolve_device,
    result_header,
    write_results,
)
from .kernel_args import BLOCK_SIZES, density_out_of_range_message

SCHEMA_VERSION = 1
CPU_NOTE = "CPU/tiny configs: proves the benchmark runs; not GPU performance"
GPU_TINY_NOTE = "tiny configs on the GPU: a smoke test, not representative end-to-end performance"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# a fitted static pattern further than this from its target density is not timed (the layout cannot express it)
FIT_TOLERANCE_ABS, FIT_TOLERANCE_REL = 0.05, 0.5
COMPILED_MIN_WARMUP = 2  # untimed steps after the compiling call (see measure_steps)


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    models: tuple[E2EModel, ...]
    densities: tuple[float, ...]
    patterns: tuple[str, ...]
    block_size: int
    dtype_name: str  # what the model runs in (fp32 on the CPU)
    requested_dtype: str
    reps: int
    warmup: int
    out_dir: Path
    device: str  # "cuda" | "cpu"
    seed: int
    note: str | None
    compile: bool
    compile_backend: str
    schedule_steps: int
    dense_steps: int

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    def to_json(self) -> dict[str, Any]:
        return {
            "models": [m.name for m in self.models],
            "tiny": any(m.tiny for m in self.models),
            "densities": list(self.densities),
            "patterns": list(self.patterns),
            "block_size": self.block_size,
            "dtype": self.dtype_name,
            "requested_dtype": self.requested_dtype,
            "reps": self.reps,
            "warmup": self.warmup,
            "timer": "CUDA events, median" if self.device == "cuda" else "time.perf_counter, median",
            "compile": self.compile,
            "compile_backend": self.compile_backend if self.compile else None,
            "schedule_steps": self.schedule_steps,
            "dense_steps": self.dense_steps,
            "seed": self.seed,
            "out_dir": str(self.out_dir),
            "cpu_threads": torch.get_num_threads(),
        }


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Check the parsed options (also when ``args`` was built by hand); pick the device and the configs."""
    names = [str(n) for n in _flatten(getattr(args, "models", None))]
    for name in names:
        if name not in MODELS:
            raise ValueError(unknown_model_message(name))
    densities = [float(d) for d in _flatten(getattr(args, "densities", None))] or list(DEFAULT_E2E_DENSITIES)
    for d in densities:
        if not (0.0 < d <= 1.0) or math.isnan(d):
            raise ValueError(density_out_of_range_message(d))
    patterns = [str(p) for p in _flatten(getattr(args, "patterns", None))] or list(PATTERN_CHOICES)
    for p in patterns:
        if p not in PATTERN_CHOICES:
            raise ValueError(f"unknown pattern {p!r}; bench e2e runs: {', '.join(PATTERN_CHOICES)}")
    requested_dtype = getattr(args, "dtype", None) or "bf16"
    if requested_dtype not in ("bf16", "fp16"):
        raise ValueError(f"--dtype must be bf16 or fp16, got {requested_dtype!r}")
    schedule_steps = int(getattr(args, "schedule_steps", 50))
    dense_steps = int(getattr(args, "dense_steps", 10))
    if schedule_steps < 1 or not 0 <= dense_steps <= schedule_steps:
        raise ValueError(
            f"--dense-steps must be in 0..--schedule-steps ({schedule_steps}), got {dense_steps}"
        )
    reps, warmup = int(getattr(args, "reps", 3)), int(getattr(args, "warmup", 1))
    if reps < 1 or warmup < 0:
        raise ValueError(f"--reps must be >= 1 and --warmup >= 0, got {reps} and {warmup}")

    tiny = bool(getattr(args, "tiny", False))
    requested = getattr(args, "device", "auto")
    if not tiny and (requested == "cpu" or (requested == "auto" and not torch.cuda.is_available())):
        why = "--device cpu" if requested == "cpu" else "no CUDA device found"
        print(f"NOTE: {why}: running the tiny configs on the CPU (--tiny). {CPU_NOTE}.", flush=True)
        tiny = True
    device = resolve_device(argparse.Namespace(tiny=tiny, device=requested))
    tiny = tiny or device == "cpu"
    table = TINY if tiny else MODELS
    models = tuple(table[n] for n in dict.fromkeys(names)) if names else tuple(table.values())
    block_size = getattr(args, "block_size", None) or DEFAULT_BLOCK_SIZE["tiny" if tiny else "gpu"]
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"--block-size must be one of {BLOCK_SIZES}, got {block_size}")
    note = CPU_NOTE if device == "cpu" else (GPU_TINY_NOTE if tiny else None)
    out = getattr(args, "out", None)
    return Settings(
        models=models,
        densities=tuple(dict.fromkeys(densities)),
        patterns=tuple(dict.fromkeys(patterns)),
        block_size=int(block_size),
        dtype_name="fp32" if device == "cpu" else requested_dtype,
        requested_dtype=requested_dtype,
        reps=reps,
        warmup=warmup,
        out_dir=Path(out) if out else default_out_dir(),
        device=device,
        seed=int(getattr(args, "seed", 0)),
        note=note,
        compile=bool(getattr(args, "compile", False)),
        compile_backend=str(getattr(args, "compile_backend", "inductor")),
        schedule_steps=schedule_steps,
        dense_steps=dense_steps,
    )


# --------------------------------------------------------------------------------------------------- model + inputs


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the block: modules built inside get ``dtype`` parameters directly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(spec: E2EModel, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``spec``'s transformer with random weights, created directly on ``device`` in ``dtype`` (no float32 copy
    first: a 14B model in bf16 is 28 GB); modules real checkpoints keep in float32 are cast back to float32."""
    import diffusers

    cls = getattr(diffusers, spec.transformer_class)
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = cls(**dict(spec.config))
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    if keep and dtype != torch.float32:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and any(k in name.split(".") for k in keep):
                tensor.data = tensor.data.float()
    return model.eval().requires_grad_(False)


def make_inputs(
    spec: E2EModel, model: torch.nn.Module, batch: int, device: str, dtype: torch.dtype, seed: int
) -> dict[str, Any]:
    """The keyword arguments the diffusers pipeline passes to the transformer at one denoising step (random
    latents and text embeddings of the real shapes, a mid-schedule timestep)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    c, f, h, w = spec.latent
    cfg = spec.config
    length = spec.text_len

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    def full(value: float, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((batch,), value, device=device, dtype=dt)

    if spec.family == "wan":
        return dict(
            hidden_states=randn(batch, c, f, h, w),
            timestep=full(500.0),
            encoder_hidden_states=randn(batch, length, cfg["text_dim"]),
            return_dict=False,
        )
    if spec.family == "hunyuan_video":
        return dict(
            hidden_states=randn(batch, c, f, h, w),
            timestep=full(500.0),
            encoder_hidden_states=randn(batch, length, cfg["text_embed_dim"]),
            encoder_attention_mask=torch.ones(batch, length, device=device, dtype=dtype),
            pooled_projections=randn(batch, cfg["pooled_projection_dim"]),
            guidance=full(6.0 * 1000.0, dtype),  # HunyuanVideoPipeline: guidance_scale × 1000
            return_dict=False,
        )
    if spec.family == "cogvideox":
        rope = None
        if cfg.get("use_rotary_positional_embeddings"):
            from types import SimpleNamespace

            from diffusers import CogVideoXPipeline

            owner = SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
            rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                owner,  # type: ignore[arg-type]
                8 * h,
                8 * w,
                f,
                torch.device(device),
            )
        return dict(
            hidden_states=randn(batch, f, c, h, w),  # CogVideoX takes (B, F, C, H, W)
            encoder_hidden_states=randn(batch, length, cfg["text_embed_dim"]),
            timestep=full(500.0, torch.int64),
            image_rotary_emb=rope,
            return_dict=False,
        )
    if spec.family == "flux":
        from diffusers import FluxPipeline

        hp, wp = h // 2, w // 2
        return dict(
            hidden_states=randn(batch, hp * wp, c * 4),  # FluxPipeline._pack_latents: 2×2 patches
            encoder_hidden_states=randn(batch, length, cfg["joint_attention_dim"]),
            pooled_projections=randn(batch, cfg["pooled_projection_dim"]),
            timestep=full(0.5, dtype),  # the pipeline passes t / 1000
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, hp, wp, device, dtype),
            txt_ids=torch.zeros(length, 3, device=device, dtype=dtype),
            guidance=full(3.5) if cfg.get("guidance_embeds") else None,
            return_dict=False,
        )
    raise ValueError(f"unknown family {spec.family!r}")


# --------------------------------------------------------------------------------------------------- profiles


def _mask_layout(spec: E2EModel, block_size: int) -> Any:
    from dit_sparse.patterns import MaskLayout

    text_first = spec.family in ("cogvideox", "flux")
    return MaskLayout(grid=spec.grid, num_text=spec.num_text, text_first=text_first, block_size=block_size)


def mask_density(name: str, params: dict[str, Any], layout: Any, device: str) -> float:
    """Token density of one head's mask (text rows/columns dense) on ``layout``, as the processor computes it."""
    from dit_sparse.kernels import token_density
    from dit_sparse.patterns import build_layer_mask

    mask = build_layer_mask([(name, params)], layout, device)  # (1, 1, nB, nB)
    return float(token_density(mask, layout.block_size, layout.seq_len, layout.seq_len))


def _bisect(density_at: Callable[[int], float], lo: int, hi: int, target: float) -> list[int]:
    """Candidates around the largest ``x`` in ``[lo, hi]`` with ``density_at(x) <= target`` (monotone in x)."""
    if density_at(lo) > target:
        return [lo]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if density_at(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return [lo, lo + 1]


def fit_pattern(name: str, layout: Any, target: float, device: str) -> tuple[dict[str, Any], float]:
    """Parameters of ``name`` whose mask density on ``layout`` is closest to ``target`` (and that density).

    ``window``: temporal radius ``f`` and a spatial radius scaled to the grid's aspect; ``radial``: ``band`` for each
    ``(dense_frames, sink)`` in (1, 1), (1, 0), (0, 1), (0, 0); ``draft``: ``budget`` = target (its density
    depends on q/k and is measured in the run)."""
    if name == "draft":
        return {"budget": target}, float("nan")
    memo: dict[str, float] = {}

    def dens(params: dict[str, Any]) -> float:
        key = repr(sorted(params.items()))
        if key not in memo:
            memo[key] = mask_density(name, params, layout, device)
        return memo[key]

    grid_f, grid_h, grid_w = layout.grid
    candidates: list[dict[str, Any]] = []
    if name == "window":
        side = max(grid_h, grid_w)

        def spatial(f: int, r: int) -> dict[str, Any]:
            return {
                "f": f,
                "h": min(grid_h - 1, round(r * grid_h / side)),
                "w": min(grid_w - 1, round(r * grid_w / side)),
            }

        for f in range(grid_f):

            def at(r: int, f: int = f) -> float:
                return dens(spatial(f, r))

            rs = _bisect(at, 0, side - 1, target)
            candidates += [spatial(f, r) for r in rs if r <= side - 1]
            if dens(spatial(f, 0)) > target:
                break  # a wider temporal window only adds blocks
    elif name == "radial":
        top = 2 * grid_h * grid_w
        for dense_frames, sink in ((1, 1), (1, 0), (0, 1), (0, 0)):

            def radial(band: int, dense_frames: int = dense_frames, sink: int = sink) -> dict[str, Any]:
                return {"dense_frames": dense_frames, "band": band, "sink": sink}

            bands = _bisect(lambda b: dens(radial(b)), 1, top, target)
            candidates += [radial(b) for b in bands if b <= top]
    else:
        raise ValueError(f"bench e2e fits radial, window and draft, not {name!r}")
    # closest density; ties go to the earlier candidate (smaller temporal window, radial's defaults first)
    best = min(candidates, key=lambda p: abs(dens(p) - target))
    return best, dens(best)


def _fits(target: float, got: float) -> bool:
    return abs(got - target) <= max(FIT_TOLERANCE_ABS, FIT_TOLERANCE_REL * target)


# --------------------------------------------------------------------------------------------------- timing


class AttentionTimer:
    """Sums the time of every self-attention core call of the handle's transformers (CUDA events: no sync)."""

    def __init__(self, handle: Any, device: str) -> None:
        self.cuda = device == "cuda"
        self.events: list[tuple[Any, Any]] = []
        self.cpu_ms = 0.0
        for binding in handle.bindings:
            setattr(binding, "core_for", self._wrap(binding.core_for))  # noqa: B010 (instance, not class)

    def _wrap(self, core_for: Callable[..., Callable[..., torch.Tensor]]) -> Callable[..., Any]:
        def timed_core_for(layer: int, proc: Any) -> Callable[..., torch.Tensor]:
            core = core_for(layer, proc)

            def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
                if self.cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = core(*args, **kwargs)
                    end.record()
                    self.events.append((start, end))
                    return out
                t0 = time.perf_counter()
                out = core(*args, **kwargs)
                self.cpu_ms += (time.perf_counter() - t0) * 1e3
                return out

            return timed

        return timed_core_for

    def reset(self) -> None:
        self.events.clear()
        self.cpu_ms = 0.0

    def total_ms(self) -> float:
        if not self.cuda:
            return self.cpu_ms
        torch.cuda.synchronize()
        return float(sum(s.elapsed_time(e) for s, e in self.events))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call (CUDA events around it; perf_counter on the CPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_steps(
    step: Callable[[], Any], st: Settings, attention: AttentionTimer | None = None, first_call: bool = False
) -> dict[str, Any]:
    """Median step time (and attention time) over ``st.reps`` after ``st.warmup`` steps; peak memory (CUDA).

    Under torch.compile (``first_call``) the compiling call is timed apart and at least
    ``COMPILED_MIN_WARMUP`` steps follow it: the plugin's hook state changes between the first and second call
    (a new run, then the same step), which recompiles once."""
    warmup = max(st.warmup, COMPILED_MIN_WARMUP) if first_call else st.warmup
    out: dict[str, Any] = {"compile_s": None, "warmup_steps": warmup}
    if st.device == "cuda":  # the peak of this configuration only: free what earlier ones left behind
        gc.collect()
        _sync(st.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if first_call:  # torch.compile: the first call compiles; timed apart
        out["compile_s"] = _timed(step, st.device) / 1e3
    for _ in range(warmup):
        step()
    _sync(st.device)
    steps, attn = [], []
    for _ in range(st.reps):
        if attention is not None:
            attention.reset()
        steps.append(_timed(step, st.device))
        if attention is not None:
            attn.append(attention.total_ms())
    out.update(
        step_ms=float(statistics.median(steps)),
        step_ms_all=steps,
        attention_ms=float(statistics.median(attn)) if attn else None,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if st.device == "cuda" else None,
    )
    return out


@contextmanager
def _cudnn_only() -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        yield


# --------------------------------------------------------------------------------------------------- one model


def _model_info(spec: E2EModel, st: Settings) -> dict[str, Any]:
    return {
        "name": spec.name,
        "label": spec.label,
        "transformer_class": spec.transformer_class,
        "family": spec.family,
        "tiny": spec.tiny,
        "config": _jsonable(dict(spec.config)),
        "config_source": spec.source,
        "size": spec.size,
        "latent": list(spec.latent),
        "grid": list(spec.grid),
        "text_len": spec.text_len,
        "num_text": spec.num_text,
        "seq_len": spec.seq_len,
        "heads": spec.heads,
        "head_dim": spec.head_dim,
        "cfg": spec.cfg,
        "batch": spec.batch,
        "forwards_per_step": 1,
        "dtype": st.dtype_name,
        "params_b": None,
        "weights_gib": None,
        "build_s": None,
        "self_attention_layers": None,
        "error": None,
    }


def _new_row(spec: E2EModel, config: str, compiled: bool) -> dict[str, Any]:
    return {
        "model": spec.name,
        "config": config,
        "compile": compiled,
        "pattern": None,
        "pattern_desc": None,
        "requested_density": None,
        "fit_density": None,
        "fit_s": None,
        "density": 1.0 if config.startswith("dense") else None,
        "step_ms": None,
        "step_ms_all": None,
        "attention_ms": None,
        "draft_ms": None,
        "mask_build_ms": None,
        "hook_overhead_ms": None,
        "rest_ms": None,
        "peak_mem_gib": None,
        "compile_s": None,
        "warmup_steps": None,
        "speedup_vs_dense": None,
        "speedup_vs_cudnn": None,
        "attention_speedup": None,
        "schedule": None,
        "fallbacks": None,
        "skipped": None,
        "error": None,
    }


def _bench_model(
    spec: E2EModel, st: Settings, log: Callable[[str], None], info: dict[str, Any], rows: list[dict]
) -> None:
    """Measure ``spec`` into ``info`` (from :func:`_model_info`) and ``rows``, appended as they are measured so an
    interrupted run keeps what it has."""
    t0 = time.perf_counter()
    try:
        model = build_transformer(spec, st.device, st.dtype, st.seed)
        inputs = make_inputs(spec, model, spec.batch, st.device, st.dtype, st.seed + 1)
    except Exception as exc:  # out of memory, a diffusers change, ...
        info["error"] = _reason(exc)
        log(f"  {spec.name}: could not build the model: {info['error']}")
        return
    from dit_sparse.pipelines import family_for

    info["build_s"] = round(time.perf_counter() - t0, 3)
    info["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    info["self_attention_layers"] = len(family_for(model).self_attention_modules(model))
    if st.device == "cuda":
        info["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    log(
        f"  built {spec.transformer_class} ({info['params_b']:.3g} B params) in {info['build_s']:.1f} s; "
        f"{info['self_attention_layers']} self-attention layers, N={spec.seq_len}, batch {spec.batch}"
    )
    try:
        for compiled in (False, True) if st.compile else (False,):
            _bench_configs(spec, model, inputs, info, st, compiled, log, rows)
    finally:
        del model, inputs
        gc.collect()


def _runner(model: torch.nn.Module, st: Settings, compiled: bool) -> Callable[..., Any]:
    if not compiled:
        return model
    torch._dynamo.reset()  # a fresh compile per configuration: nothing from the previous processors is reused
    return torch.compile(model, backend=st.compile_backend)


def _bench_configs(
    spec: E2EModel,
    model: torch.nn.Module,
    inputs: dict[str, Any],
    info: dict[str, Any],
    st: Settings,
    compiled: bool,
    log: Callable[[str], None],
    rows: list[dict],
) -> None:
    """Append one row per configuration to ``rows`` (before it is measured, so an interrupt leaves it there)."""
    import dit_sparse
    from dit_sparse import Profile
    from dit_sparse.patterns import pattern_name

    tag = " compiled" if compiled else ""

    def run_config(row: dict, context: Callable[[], Any] = nullcontext, handle: Any = None) -> None:
        fn = _runner(model, st, compiled)
        timer = AttentionTimer(handle, st.device) if handle is not None and not compiled else None

        def step() -> Any:
            with torch.inference_mode(), context():
                return fn(**inputs)

        row.update(measure_steps(step, st, timer, first_call=compiled))

    # dense: diffusers' default attention, cuDNN SDPA, and through the plugin with a dense profile
    dense = _new_row(spec, "dense", compiled)
    cudnn = _new_row(spec, "dense-cudnn", compiled)
    hooked = _new_row(spec, "dense-hooked", compiled)
    for row in (dense, cudnn, hooked):
        rows.append(row)
        if row is cudnn and st.device != "cuda":
            row["skipped"] = "needs CUDA (CPU run)"
        else:
            handle = None
            try:
                if row is hooked:
                    handle = dit_sparse.apply(model, Profile.dense(model))
                run_config(row, _cudnn_only if row is cudnn else nullcontext, handle)
            except Exception as exc:
                row["error"] = _reason(exc)
            finally:
                if handle is not None:
                    handle.remove()
        log(_progress_line(row, tag))
    if hooked["step_ms"] is not None and dense["step_ms"] is not None:
        hooked["hook_overhead_ms"] = hooked["step_ms"] - dense["step_ms"]
        if hooked["attention_ms"] is not None:
            hooked["rest_ms"] = hooked["step_ms"] - hooked["attention_ms"] - hooked["hook_overhead_ms"]

    # sparse: each pattern at each target density, measured at a sparse step
    layout = _mask_layout(spec, st.block_size)
    for pattern in st.patterns:
        for target in st.densities:
            row = _new_row(spec, f"{pattern}@{target:g}", compiled)
            row.update(pattern=pattern, requested_density=target)
            rows.append(row)
            handle = None
            try:
                t_fit = time.perf_counter()
                params, fit = fit_pattern(pattern, layout, target, st.device)
                row.update(
                    pattern_desc=pattern_name(pattern, params),
                    fit_density=None if math.isnan(fit) else fit,
                    fit_s=round(time.perf_counter() - t_fit, 3),
                )
                if not math.isnan(fit) and not _fits(target, fit):
                    row["skipped"] = (
                        f"{pattern} cannot reach density {target:g} on this layout (closest {fit:.3f}: "
                        f"grid {'×'.join(map(str, spec.grid))}, {spec.num_text} text tokens always dense)"
                    )
                    log(_progress_line(row, tag))
                    continue
                profile = Profile.uniform(model, pattern, params, dense_steps=0, block_size=st.block_size)
                handle = dit_sparse.apply(model, profile)
                run_config(row, nullcontext, handle)
                report = handle.report()
                row["density"] = report.sparse_density()
                row["fallbacks"] = list(report.fallbacks)
                row["mask_build_ms"], row["draft_ms"] = _overheads(
                    pattern, params, layout, spec, st, info["self_attention_layers"]
                )
            except Exception as exc:
                row["error"] = _reason(exc)
            finally:
                if handle is not None:
                    handle.remove()
            _derive(row, dense, cudnn, hooked, st)
            log(_progress_line(row, tag))
    for row in (dense, cudnn, hooked):
        _derive(row, dense, cudnn, hooked, st)
    if st.device == "cuda":
        torch.cuda.empty_cache()


def _overheads(
    pattern: str, params: dict[str, Any], layout: Any, spec: E2EModel, st: Settings, layers: int
) -> tuple[float | None, float | None]:
    """(one-off mask + permutation build of the layer plan, ms; draft's per-step mask work, ms, or None)."""
    from dit_sparse.patterns import build_layer_mask, build_layer_perm

    from .patterns import draft_call

    timer = _timer(st.device)
    heads = [(pattern, params)] * spec.heads
    reps, warm = max(1, min(st.reps, 5)), min(st.warmup, 2)

    def plan() -> Any:
        return build_layer_mask(heads, layout, st.device), build_layer_perm(heads, layout, st.device)

    mask_ms = timer(plan, reps, warm)
    if pattern != "draft":
        return mask_ms, None
    gen = torch.Generator(device=st.device).manual_seed(st.seed + 2)
    shape = (spec.batch, spec.heads, layout.seq_len, spec.head_dim)  # (B, H, N, D)
    q, k = (torch.randn(shape, generator=gen, device=st.device, dtype=st.dtype) for _ in range(2))
    perm = build_layer_perm(heads, layout, st.device)
    per_call = timer(functools.partial(draft_call, pattern, params, layout, q, k, perm), reps, warm)
    del q, k
    return mask_ms, per_call * layers


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if not num or not den else num / den


def _derive(row: dict, dense: dict, cudnn: dict, hooked: dict, st: Settings) -> None:
    """Speedups, breakdown and the full-schedule estimate of one row from the model's dense rows."""
    step = row["step_ms"]
    row["speedup_vs_dense"] = _ratio(dense["step_ms"], step)
    row["speedup_vs_cudnn"] = _ratio(cudnn["step_ms"], step)
    if step is None:
        return
    if row["pattern"] is not None:
        row["attention_speedup"] = _ratio(hooked["attention_ms"], row["attention_ms"])
        row["hook_overhead_ms"] = hooked["hook_overhead_ms"]
        if row["attention_ms"] is not None:
            row["rest_ms"] = step - row["attention_ms"] - (row["hook_overhead_ms"] or 0.0)
        warm = hooked["step_ms"] if hooked["step_ms"] is not None else dense["step_ms"]
        if warm is None:
            return
        total = (
            st.dense_steps * warm
            + (st.schedule_steps - st.dense_steps) * step
            + (row["mask_build_ms"] or 0.0)
        )
    else:
        total = st.schedule_steps * step
    n = st.schedule_steps
    row["schedule"] = {
        "steps": n,
        "dense_steps": st.dense_steps if row["pattern"] is not None else n,
        "total_s": total / 1e3,
        "dense_total_s": None if dense["step_ms"] is None else n * dense["step_ms"] / 1e3,
        "cudnn_total_s": None if cudnn["step_ms"] is None else n * cudnn["step_ms"] / 1e3,
        "speedup_vs_dense": _ratio(None if dense["step_ms"] is None else n * dense["step_ms"], total),
        "speedup_vs_cudnn": _ratio(None if cudnn["step_ms"] is None else n * cudnn["step_ms"], total),
    }


# --------------------------------------------------------------------------------------------------- tables


def _progress_line(row: dict, tag: str = "") -> str:
    head = f"  {row['model']} {row['config']}{tag}"
    if row["skipped"]:
        return f"{head}: skipped ({row['skipped']})"
    if row["error"]:
        return f"{head}: FAILED ({row['error']})"
    dens = "" if row["density"] is None else f"density {row['density']:.3f}, "
    attn = "" if row["attention_ms"] is None else f", attention {_fmt(row['attention_ms'], '.4g')} ms"
    return (
        f"{head}: {dens}step {_fmt(row['step_ms'], '.4g')} ms ({_fmt_x(row['speedup_vs_dense'])} dense){attn}"
    )


COLUMNS = (
    "model",
    "config",
    "pattern",
    "compile",
    "density",
    "step ms",
    "× dense",
    "× cuDNN",
    "attn ms",
    "attn ×",
    "draft ms",
    "mask ms (once)",
    "hook ms",
    "rest ms",
    "peak GiB",
    "schedule s",
    "schedule ×",
)


def table_rows(result: dict) -> list[list[str]]:
    body = []
    for r in result["rows"]:
        status = "skipped" if r["skipped"] else ("FAILED" if r["error"] else None)
        sched = r["schedule"] or {}
        body.append(
            [
                r["model"],
                r["config"],
                r["pattern_desc"] or "-",
                "yes" if r["compile"] else "no",
                _fmt(r["density"], ".3f"),
                status or _fmt(r["step_ms"], ".4g"),
                _fmt_x(r["speedup_vs_dense"]),
                _fmt_x(r["speedup_vs_cudnn"]),
                _fmt(r["attention_ms"], ".4g"),
                _fmt_x(r["attention_speedup"]),
                _fmt(r["draft_ms"], ".3g"),
                _fmt(r["mask_build_ms"], ".3g"),
                _fmt(r["hook_overhead_ms"], ".3g"),
                _fmt(r["rest_ms"], ".4g"),
                _fmt(r["peak_mem_gib"], ".3g"),
                _fmt(sched.get("total_s"), ".4g"),
                _fmt_x(sched.get("speedup_vs_dense")),
            ]
        )
    return body


def _explain(result: dict) -> list[str]:
    st = result["settings"]
    return [
        "step ms: one denoising step (transformer forward, batch 2 with CFG), median; × dense / × cuDNN: the dense "
        "step (diffusers' default attention / cuDNN SDPA) over this step.",
        "attn ms: self-attention core calls of the step (dense-hooked: the model's own attention; sparse: mask "
        "reuse, draft masks and the kernel); attn ×: dense-hooked attn ms over this one.",
        "draft ms: draft's per-step mask work (pool, map, top-k; part of attn ms); mask ms (once): building the "
        "layer plan (mask + permutation), cached for the run; hook ms: dense-hooked minus dense step (plugin "
        "overhead, may be < 0 within timing noise); rest ms: step - attn - hook (projections, MLPs, norms, "
        "cross-attention).",
        f"schedule s / ×: {st['schedule_steps']} steps with {st['dense_steps']} dense warm-up steps (dense-hooked "
        "time) + one mask build, against all-dense steps with diffusers' default attention.",
        "density: fraction of self-attention token pairs computed (run report; text rows/columns always dense); "
        "static patterns are fitted to the target density on this layout (pattern: the fit; a row is skipped "
        "when the layout cannot come close), draft uses budget = target.",
    ]


def _model_lines(result: dict) -> list[str]:
    lines = []
    for m in result["models"]:
        if m["error"]:
            lines.append(f"{m['label']}: could not be built ({m['error']})")
            continue
        f, h, w = m["grid"]
        lines.append(
            f"{m['label']} ({m['transformer_class']}, {_fmt(m['params_b'], '.3g')} B params, {m['dtype']}): "
            f"grid {f}×{h}×{w} + {m['num_text']} text = {m['seq_len']} tokens, {m['heads']}×{m['head_dim']}, "
            f"batch {m['batch']}, {m['self_attention_layers']} self-attention layers, weights "
            f"{_fmt(m['weights_gib'], '.3g')} GiB"
        )
    return lines


def render_markdown(result: dict) -> str:
    st = result["settings"]
    lines = [
        *markdown_head(
            "end-to-end benchmark", result, f", reps {st['reps']} after {st['warmup']} warm-up steps"
        ),
        *([f"**{result['interrupted']}**", ""] if result.get("interrupted") else []),
        "## Models",
        "",
        *(f"- {line}" for line in _model_lines(result)),
        "",
        "## Steps",
        "",
        format_markdown(COLUMNS, table_rows(result)),
        "",
        *(f"- {line}" for line in _explain(result)),
        "",
    ]
    return "\n".join(lines)


def render_plain(result: dict) -> str:
    lines = [f"dit-sparse end-to-end benchmark on {result['device_name']} ({result['device']})"]
    if result["note"]:
        lines.append(f"NOTE: {result['note']}")
    if result.get("interrupted"):
        lines.append(f"INTERRUPTED: {result['interrupted']}")
    lines += ["", *_model_lines(result), "", format_plain(COLUMNS, table_rows(result)), "", *_explain(result)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- run


def run(settings: Settings, log: Callable[[str], None] = print) -> tuple[dict, Path]:
    import diffusers

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    result = result_header(
        "dit-sparse bench e2e",
        settings,
        started,
        SCHEMA_VERSION,
        {"diffusers": diffusers.__version__},
        lists=("models",),
    )
    head = f"dit-sparse bench e2e on {result['device_name']} ({settings.device}, {settings.dtype_name})"
    log(head + (f": {settings.note}" if settings.note else ""))
    result["interrupted"] = None
    try:
        for spec in settings.models:
            f, h, w = spec.grid
            log(
                f"{spec.label}: grid {f}×{h}×{w} + {spec.num_text} text, N={spec.seq_len}, "
                f"{spec.heads}×{spec.head_dim}"
            )
            info = _model_info(spec, settings)
            result["models"].append(info)
            _bench_model(spec, settings, log, info, result["rows"])
            if settings.device == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:  # Ctrl-C, or gpu_check.sh's stage time limit (SIGINT): keep what was measured
        result["interrupted"] = (
            f"interrupted after {time.perf_counter() - t0:.0f} s (SIGINT: a time limit or Ctrl-C); the rows and "
            "models here are the ones measured before it"
        )
        for row in result["rows"]:
            if row["step_ms"] is None and not row["skipped"] and not row["error"]:
                row["error"] = "interrupted before it was measured"
        log(result["interrupted"])
    result["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    json_path, md_path = write_results(result, settings.out_dir, prefix="e2e", render=render_markdown)
    log("")
    log(render_plain(result))
    log("")
    log(f"wrote {json_path}")
    log(f"wrote {md_path}")
    return result, json_path


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dit-sparse bench e2e``: 0 when every configuration ran (or was skipped with a reason),
    1 when a model or a measurement failed, 2 on bad options."""
    return cli_entry(
        args,
        resolve_settings,
        run,
        "model(s)/measurement(s)",
        lambda result: (
            [r for r in result["rows"] if r["error"]]
            + [m for m in result["models"] if m["error"]]
            + ([{"error": result["interrupted"]}] if result.get("interrupted") else [])
        ),
    )
