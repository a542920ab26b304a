"""Calibration run of ``dit-sparse profile``: capture, checkpoint, search, verify, write the profile.

Stages (each with a progress bar):

1. **calibrate**: for every (prompt, seed) sample, run the pipeline dense (a dense profile through
   :func:`dit_sparse.apply`, bit-identical to no plugin) with the binding's ``capture`` observer; on the sampled
   steps every self-attention call's q/k/v go through :func:`.stats.call_stats` (nothing N×N is kept). After each
   sample the per-(layer, step) errors are written to the checkpoint ``<out>.ckpt.json``; ``--resume`` skips the
   samples already there. On any error the checkpoint stays on disk.
2. **search**: :mod:`.search` with the cost model calibrated on the real kernel at the first captured shape.
3. **verify**: the held-out prompt dense and sparse with the same seed; PSNR/SSIM of the final frames, measured
   density and wall time go to ``profile.summary``.
"""

from __future__ import annotations

import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..patterns import MaskLayout, validate_pattern
from ..profile import HeadSpec, Profile, Schedule, atomic_write_text
from .search import (
    Candidate,
    CostModel,
    SearchResult,
    calibrate_cost_model,
    candidate_blocks,
    candidate_dynamic,
    candidate_grid,
    candidate_masks,
    candidate_perms,
    describe,
    is_step_cached,
    mean_density,
    search,
    search_density,
)
from .stats import call_stats, relative_error

CHECKPOINT_VERSION = 1
IMAGE_FAMILIES = ("flux", "qwen_image", "sd3", "pixart")

# The last prompt of each set is held out for the end-to-end check.
DEFAULT_VIDEO_PROMPTS = (
    "a red fox running through fresh snow in a pine forest, morning light",
    "waves crashing on a rocky coast at sunset, slow camera pan",
    "a busy city street at night with neon signs and passing cars",
    "a close-up of a hummingbird hovering next to a purple flower",
    "a hot air balloon drifting over green hills, aerial view",
)
DEFAULT_IMAGE_PROMPTS = (
    "a portrait of an old fisherman with a grey beard, studio lighting",
    "a bowl of ramen with a soft-boiled egg on a wooden table",
    "a futuristic city skyline at dusk, highly detailed",
    "a watercolor painting of a lighthouse on a cliff",
    "a cat sleeping on a stack of books next to a window",
)


class ProfilerError(RuntimeError):
    """The profiler cannot run with these inputs (message says what to change)."""


@dataclass
class ProfileConfig:
    """What one profiling run does; every field is recorded in the profile's ``calibration``."""

    prompts: list[str]  # calibration prompts
    holdout: str | None  # end-to-end check prompt (None: skip the check)
    seeds: list[int] = field(default_factory=lambda: [0])
    height: int | None = None
    width: int | None = None
    frames: int | None = None  # None for image models
    steps: int = 16
    guidance: float = 5.0
    budget: float | None = 0.05  # max relative L2 error per head output vs dense
    density: float | None = None  # alternative: target mean density
    target_psnr: float | None = None  # alternative: the sparsest budget whose held-out PSNR (dB) reaches this
    sample_steps: list[int] | None = None  # default: sample_steps_for(steps)
    max_query_blocks: int = 32  # query blocks sampled per call for the error statistics
    block_size: int | None = None  # None: auto from the sequence length
    impl: str = "auto"

    def key(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed."""
        d = asdict(self)
        d.pop("holdout")
        d.pop("budget")
        d.pop("density")
        d.pop("target_psnr")
        return d


def sample_steps_for(num_steps: int, k: int = 6) -> list[int]:
    """Steps whose attention is captured: the first three (warm-up decisions) plus evenly spaced later ones."""
    first = list(range(min(3, num_steps)))
    rest = torch.linspace(3, num_steps - 1, max(0, k - 3)).round().long().tolist() if num_steps > 3 else []
    return sorted(set(first) | {int(s) for s in rest})


def auto_block_size(seq_len: int) -> int:
    """Blocks of 128 for long sequences (kernel efficiency), smaller ones so short sequences keep some structure."""
    for size, min_len in ((128, 16384), (64, 2048), (32, 512)):
        if seq_len >= min_len:
            return size
    return 16


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. Clear errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ProfilerError(f"prompt file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProfilerError(f"{p}: not UTF-8 text ({exc}); expected one prompt per line") from None
    prompts = []
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if "\x00" in s or len(s) > 2000:
            raise ProfilerError(f"{p}:{i}: not a prompt (binary data or over 2000 characters)")
        prompts.append(s)
    if not prompts:
        raise ProfilerError(f"{p}: no prompts (expected one prompt per line; '#' lines are comments)")
    return prompts


# ------------------------------------------------------------------------------------------------ capture
class Collector:
    """The ``capture`` observer: statistics of every self-attention call on the sampled steps of one sample."""

    def __init__(self, cfg: ProfileConfig, state: dict[str, Any], bar: Any = None):
        self.cfg = cfg
        self.state = state  # shared with the checkpoint: layout, candidates, cost model
        self.sampled = set(cfg.sample_steps or [])
        # step-cached candidates are measured with the mask of the step before a sampled step (built there)
        self.prefetch = {s - 1 for s in self.sampled if s >= 1} - self.sampled
        self.calls: dict[
            tuple[int, int], int
        ] = {}  # (layer, step) -> calls seen (CFG may call a layer twice)
        self.cached: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (layer, call) -> candidate -> mask
        self.acc: dict[
            tuple[int, int], list[torch.Tensor]
        ] = {}  # (layer, step) -> [err_sq (C,H), ref_sq (H,)]
        self.masks: torch.Tensor | None = None
        self.perms: list[torch.Tensor | None] = []
        self.dynamic: list[Candidate | None] = []
        self.layout: MaskLayout | None = None
        self.bar = bar

    def bind(self, binding: Any) -> Callable[..., None]:
        def capture(layer: int, step: int, q: Any, k: Any, v: Any, layout: str) -> None:
            if step not in self.sampled and step not in self.prefetch:
                return
            if layout == "bshd":
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)
            inputs = binding.state.inputs
            self._setup(inputs.grid, inputs.num_text, inputs.text_first, q)
            assert self.masks is not None
            call = self.calls.get((layer, step), 0)
            self.calls[(layer, step)] = call + 1
            previous = self.cached.pop((layer, call), {})
            if step + 1 in self.sampled:  # the next step is measured with the masks this one builds
                self.cached[(layer, call)] = self._step_cached_masks(q, k)
            if step not in self.sampled:
                return
            st = call_stats(
                q,
                k,
                v,
                self.masks,
                self.state["block_size"],
                self.cfg.max_query_blocks,
                self.cfg.impl,
                perms=self.perms,
                dynamic=self.dynamic,
                layout=self.layout,
                given={c: m for c, m in previous.items() if m.shape[0] == q.shape[0]},
            )
            slot = self.acc.setdefault(
                (layer, step), [torch.zeros_like(st.err_sq), torch.zeros_like(st.ref_sq)]
            )
            slot[0] += st.err_sq
            slot[1] += st.ref_sq
            if self.bar is not None:
                self.bar.set_postfix_str(f"layer {layer} step {step}", refresh=False)

        return capture

    def _step_cached_masks(self, q: torch.Tensor, k: torch.Tensor) -> dict[int, torch.Tensor]:
        """Masks of the step-cached candidates from this call (one exact block-mass pass shared by all budgets)."""
        from ..patterns import force_text_dense
        from ..patterns.dynamic import exact_block_mass, select_blocks

        cands = [
            (c, spec) for c, spec in enumerate(self.dynamic) if spec is not None and is_step_cached(spec)
        ]
        if not cands:
            return {}
        assert self.layout is not None
        probs = exact_block_mass(q, k, self.layout.block_size)  # (B, H, nB, nB)
        out = {}
        for c, spec in cands:
            params = validate_pattern(*spec)
            mass = None if params["mass"] is None else float(params["mass"])
            out[c] = force_text_dense(select_blocks(probs, float(params["budget"]), mass), self.layout)
        return out

    def _setup(self, grid: tuple[int, int, int], num_text: int, text_first: bool, q: torch.Tensor) -> None:
        shape = {"grid": list(grid), "num_text": int(num_text), "text_first": bool(text_first)}
        st = self.state
        if "layout" not in st:
            st["layout"] = shape
            st["block_size"] = self.cfg.block_size or auto_block_size(q.shape[2])
        elif st["layout"] != shape:
            raise ProfilerError(
                f"the token layout changed between calls ({st['layout']} then {shape}): one profile is calibrated "
                "at one resolution; pass --height/--width/--frames so every sample has the same size"
            )
        layout = MaskLayout(tuple(grid), num_text, text_first, st["block_size"])  # type: ignore[arg-type]
        self.layout = layout
        if self.masks is None:
            cands = candidate_grid(layout)
            kept, self.masks = candidate_masks(cands, layout)
            self.perms = candidate_perms(kept, layout)
            self.dynamic = candidate_dynamic(kept)
            names = [describe(c) for c in kept]
            if "candidates" in st and st["candidates"] != names:
                raise ProfilerError("the checkpoint's candidate patterns differ from this run's; use --force")
            st["candidates"] = names
            st["candidate_specs"] = [[n, p] for n, p in kept]
        if "shape" not in st:
            st["shape"] = list(q.shape)
            st["dtype"] = str(q.dtype).replace("torch.", "")
            st["device"] = _device_name(q.device)
        if "cost" not in st:
            qshape = (int(q.shape[0]), int(q.shape[1]), int(q.shape[2]), int(q.shape[3]))
            cm = calibrate_cost_model(
                qshape, q.dtype, q.device, st["block_size"], self.cfg.impl, layout=layout
            )
            st["cost"] = cm.to_dict()

    def errors(self) -> dict[str, list[list[float]]]:
        """``"layer,step" -> (C, H)`` relative errors of this sample."""
        return {
            f"{layer},{step}": relative_error(e, r).tolist()
            for (layer, step), (e, r) in sorted(self.acc.items())
        }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------ checkpoint
def checkpoint_path(out: Path, rank: int | None = None) -> Path:
    """``<out>.ckpt.json``; under several processes each rank writes its own ``<out>.ckpt.rank<r>.json``."""
    return out.with_name(out.name + (".ckpt.json" if rank is None else f".ckpt.rank{rank}.json"))


def checkpoint_files(out: Path) -> list[Path]:
    """The checkpoints of ``out`` on disk: a single-process one and any ranks'."""
    return sorted(p for p in out.parent.glob(out.name + ".ckpt*.json") if p.is_file())


def load_checkpoint(path: Path, cfg: ProfileConfig, model: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfilerError(f"cannot read checkpoint {path} ({exc}); delete it or pass --force") from None
    if data.get("version") != CHECKPOINT_VERSION or data.get("model") != model:
        raise ProfilerError(f"checkpoint {path} is for another model or version; delete it or pass --force")
    if data.get("config") != json.loads(json.dumps(cfg.key())):
        raise ProfilerError(
            f"checkpoint {path} was made with other calibration settings ({data.get('config')}); run with the "
            "same settings to resume, or pass --force to start over"
        )
    return data


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data) + "\n")


# ------------------------------------------------------------------------------------------------ pipeline calls
Encoder = Callable[[str], dict[str, Any]]


def pipe_kwargs(cfg: ProfileConfig, seed: int, output_type: str) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    for name, value in (("height", cfg.height), ("width", cfg.width), ("num_frames", cfg.frames)):
        if value is not None:
            kw[name] = value
    return kw


def default_encoder(model_name: str, pipe: Any) -> Encoder:
    """Prompt -> pipeline kwargs: the bundled model's (``tiny.prompt_kwargs``), otherwise the plain prompt."""
    if model_name == "tiny":
        from ..pipelines.tiny import prompt_kwargs

        return lambda prompt: prompt_kwargs(pipe, prompt)
    return lambda prompt: {"prompt": prompt}


# ------------------------------------------------------------------------------------------------ main loop
def profile_pipeline(
    pipe: Any,
    cfg: ProfileConfig,
    out: Path,
    *,
    model_id: str,
    encode: Encoder,
    resume: bool = False,
    cost: CostModel | None = None,
    command: str | None = None,
    progress: bool = True,
) -> Profile:
    """Calibrate, search and verify; write the profile to ``out`` (the caller checked overwriting)."""
    from tqdm.auto import tqdm

    from .. import apply

    transformer = pipe.transformer
    base = Profile.dense(transformer, model_id=model_id)  # UnsupportedModelError names the families
    if cfg.sample_steps is None:
        cfg.sample_steps = sample_steps_for(cfg.steps)
    bad = [s for s in cfg.sample_steps if not 0 <= s < cfg.steps]
    if bad:
        raise ProfilerError(f"sampled steps {bad} are outside 0..{cfg.steps - 1}")
    world, rank = _world()
    ckpt = checkpoint_path(out, rank if world > 1 else None)
    data: dict[str, Any] = {
        "version": CHECKPOINT_VERSION,
        "model": model_id,
        "config": cfg.key(),
        "state": {},
        "samples": {},
    }
    if resume:  # every checkpoint of an earlier run (one process or any number of ranks)
        for path in checkpoint_files(out):
            earlier = load_checkpoint(path, cfg, model_id)
            data["samples"].update(earlier["samples"])
            if not data["state"]:
                data["state"] = earlier["state"]
    state: dict[str, Any] = data["state"]
    if cost is not None:
        state["cost"] = cost.to_dict()
    samples = [(p, s) for p in cfg.prompts for s in cfg.seeds]
    mine = [i for i in range(len(samples)) if i % world == rank]  # rank r calibrates samples r, r + W, ...
    progress = progress and rank == 0
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    bar = tqdm(total=len(mine), desc="calibrate", unit="sample", disable=not progress)
    bar.update(sum(1 for i in mine if str(i) in data["samples"]))
    for i in mine:
        if str(i) in data["samples"]:
            continue
        prompt, seed = samples[i]
        collector = Collector(cfg, state, bar)
        handle = apply(pipe, base)
        try:
            for b in handle.bindings:
                b.capture = collector.bind(b)
            pipe(**encode(prompt), **pipe_kwargs(cfg, seed, "latent"))
        finally:
            handle.remove()
        if not collector.acc:
            raise ProfilerError("no self-attention call was captured on the sampled steps; is --steps right?")
        data["samples"][str(i)] = {"prompt": prompt, "seed": seed, "errors": collector.errors()}
        save_checkpoint(ckpt, data)
        bar.update(1)
    bar.close()
    if world > 1:
        data = _merge_ranks(data, rank)

    if rank == 0:  # search, verify and write; the other ranks read what rank 0 wrote
        if cfg.target_psnr is not None:
            profile = search_for_psnr(pipe, base, cfg, data, encode, progress)
        else:
            profile, _ = _search(copy.deepcopy(base), cfg, data)
            if cfg.holdout is not None:
                profile.summary.update(verify(pipe, profile, cfg, encode, progress))
        profile.stamp(**_provenance(cfg, data, command), processes=world)
        profile.save(out, overwrite=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the profile is on disk before any rank reads it or drops its statistics
    if rank != 0:
        profile = Profile.load(out)
    for path in checkpoint_files(out):
        if rank == 0 or path == ckpt:
            path.unlink(missing_ok=True)
    return profile


def _world() -> tuple[int, int]:
    """(processes, this rank) of an initialised ``torch.distributed`` group (``accelerate launch`` / ``torchrun``
    / ``dit-sparse profile`` under them), else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _merge_ranks(data: dict[str, Any], rank: int) -> dict[str, Any]:
    """Every rank's samples on every rank; the layout, candidates and cost model of the lowest rank that captured
    (rank 0 unless it had no sample), so every rank searches the same statistics with the same cost model."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {"samples": data["samples"], "state": data["state"]})
    merged = dict(data)
    merged["samples"] = {k: v for part in parts for k, v in part["samples"].items()}
    merged["state"] = next((part["state"] for part in parts if part["state"].get("cost")), data["state"])
    return merged


def error_tensor(data: dict[str, Any], num_layers: int, steps: list[int]) -> torch.Tensor:
    """``(L, S, C, H)`` worst relative error over the calibration samples."""
    worst: torch.Tensor | None = None
    for sample in data["samples"].values():
        rows = []
        for layer in range(num_layers):
            per_step = []
            for s in steps:
                key = f"{layer},{s}"
                if key not in sample["errors"]:
                    raise ProfilerError(
                        f"checkpoint has no statistics for layer {layer} step {s}; use --force"
                    )
                per_step.append(torch.tensor(sample["errors"][key], dtype=torch.float64))
            rows.append(torch.stack(per_step))
        t = torch.stack(rows)
        worst = t if worst is None else torch.maximum(worst, t)
    if worst is None:
        raise ProfilerError("no calibration samples")
    return worst


def _search(base: Profile, cfg: ProfileConfig, data: dict[str, Any]) -> tuple[Profile, SearchResult]:
    from ..patterns import build_layer_mask

    state = data["state"]
    layout = MaskLayout(
        tuple(state["layout"]["grid"]),
        state["layout"]["num_text"],  # type: ignore[arg-type]
        state["layout"]["text_first"],
        state["block_size"],
    )
    specs: list[Candidate] = [(n, dict(p)) for n, p in state["candidate_specs"]]
    masks = torch.stack([build_layer_mask([c], layout, "cpu")[0, 0] for c in specs])  # (C, nB, nB)
    blocks = candidate_blocks(specs, masks)  # (C,)
    kinds = candidate_dynamic(specs)
    cached = torch.tensor([d is not None and is_step_cached(d) for d in kinds])
    dynamic = torch.tensor([d is not None for d in kinds]) & ~cached
    total = layout.num_blocks**2
    dense_index = [n for n, _ in specs].index("dense")
    reorders = torch.tensor([p is not None for p in candidate_perms(specs, layout)])
    steps = list(cfg.sample_steps or [])
    errors = error_tensor(data, base.fingerprint.num_layers, steps)
    cost = CostModel.from_dict(state["cost"])
    if cfg.density is not None:
        result = search_density(
            errors, steps, cfg.steps, blocks, dense_index, cost, cfg.density, total, reorders, dynamic, cached
        )
    else:
        assert cfg.budget is not None
        result = search(
            errors, steps, cfg.steps, blocks, dense_index, cost, cfg.budget, reorders, dynamic, cached
        )
    prof = base
    prof.block_size = state["block_size"]
    prof.layers = [
        [
            HeadSpec(
                specs[c][0],
                dict(specs[c][1]),
                density=round(float(blocks[c]) / total, 6),
                rel_error=round(result.worst_error[layer][h], 6),
            )
            for h, c in enumerate(heads)
        ]
        for layer, heads in enumerate(result.choice)
    ]
    prof.schedule = Schedule(dense_steps=result.dense_steps, dense_layers=result.dense_layers)
    dens = mean_density(result, blocks, total)
    w = result.dense_steps
    prof.summary = {
        "budget": result.budget,
        "target_density": cfg.density,
        "predicted_mean_density": round(dens, 6),
        "predicted_mean_density_all_steps": round((w + (cfg.steps - w) * dens) / cfg.steps, 6),
        "predicted_attention_speedup": round(result.dense_seconds / result.predicted_seconds, 4),
        "max_head_rel_error": round(max(max(r) for r in result.worst_error), 6),
        "pattern_counts": _pattern_counts(prof),
    }
    return prof, result


def _pattern_counts(prof: Profile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for heads in prof.layers:
        for spec in heads:
            counts[spec.pattern] = counts.get(spec.pattern, 0) + 1
    return dict(sorted(counts.items()))


def _provenance(cfg: ProfileConfig, data: dict[str, Any], command: str | None) -> dict[str, Any]:
    from .. import __version__

    state = data["state"]
    return {
        "method": "dit-sparse profile",
        "command": command if command is not None else shlex.join(["dit-sparse", *sys.argv[1:]]),
        "prompts": list(cfg.prompts),
        "holdout_prompt": cfg.holdout,
        "seeds": list(cfg.seeds),
        "height": cfg.height,
        "width": cfg.width,
        "frames": cfg.frames,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "sampled_steps": list(cfg.sample_steps or []),
        "max_query_blocks": cfg.max_query_blocks,
        "latent_grid": state["layout"]["grid"],
        "num_text": state["layout"]["num_text"],
        "text_first": state["layout"]["text_first"],
        "attention_shape": state.get("shape"),
        "dtype": state.get("dtype"),
        "device": state.get("device"),
        "impl": cfg.impl,
        "candidates": state["candidates"],
        "cost_model": state["cost"],
        "dit_sparse_version": __version__,
    }


# ------------------------------------------------------------------------------------------------ target PSNR
# error budgets tried by --target-psnr, sparsest first (budget 0 keeps only heads with no error: dense quality)
PSNR_BUDGETS = (0.5, 0.35, 0.25, 0.18, 0.12, 0.1, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01, 0.0)


def search_for_psnr(
    pipe: Any, base: Profile, cfg: ProfileConfig, data: dict[str, Any], encode: Encoder, progress: bool
) -> Profile:
    """The profile of the largest budget in :data:`PSNR_BUDGETS` whose held-out run reaches ``cfg.target_psnr``
    (mean PSNR over frames vs the dense run), found by bisection (the PSNR falls as the budget grows), with its
    verification in ``summary`` and every tried budget in ``summary["psnr_search"]``. Budget 0 is taken without a
    run when every larger one misses."""
    from tqdm.auto import tqdm

    assert cfg.target_psnr is not None and cfg.holdout is not None
    dense = _holdout_run(pipe, None, cfg, encode)
    bar = tqdm(total=math.ceil(math.log2(len(PSNR_BUDGETS))) + 1, desc="target PSNR", disable=not progress)
    tried: dict[float, tuple[Profile, dict[str, Any]]] = {}

    def attempt(budget: float) -> tuple[Profile, dict[str, Any]]:
        if budget not in tried:
            prof, _ = _search(copy.deepcopy(base), replace(cfg, budget=budget, density=None), data)
            tried[budget] = (prof, verify(pipe, prof, cfg, encode, False, dense))
            bar.update(1)
        return tried[budget]

    def reaches(summary: dict[str, Any]) -> bool:
        psnr = summary["psnr_mean"]
        return psnr == "inf" or float(psnr) >= float(cfg.target_psnr)  # type: ignore[arg-type]

    lo, hi = (
        0,
        len(PSNR_BUDGETS) - 1,
    )  # the answer is in [lo, hi]; the last budget is taken if all else misses
    while lo < hi:
        mid = (lo + hi) // 2
        if reaches(attempt(PSNR_BUDGETS[mid])[1]):
            hi = mid
        else:
            lo = mid + 1
    profile, summary = attempt(PSNR_BUDGETS[hi])
    bar.close()
    profile.summary.update(summary)
    profile.summary["target_psnr"] = cfg.target_psnr
    profile.summary["psnr_search"] = [
        {
            "budget": b,
            "psnr_mean": v["psnr_mean"],
            "measured_mean_density": v["measured_mean_density"],
            "reaches_target": reaches(v),
        }
        for b, (_, v) in sorted(tried.items(), reverse=True)
    ]
    return profile


# ------------------------------------------------------------------------------------------------ verify
def _holdout_run(
    pipe: Any, profile: Profile | None, cfg: ProfileConfig, encode: Encoder
) -> tuple[float, Any, float]:
    """(seconds, frames, mean density) of the held-out prompt with the first seed, dense or with ``profile``."""
    from .. import apply
    from ..generate import _frames

    assert cfg.holdout is not None
    handle = apply(pipe, profile) if profile is not None else None
    try:
        t0 = time.perf_counter()
        output = pipe(**encode(cfg.holdout), **pipe_kwargs(cfg, cfg.seeds[0], "np"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        density = handle.report().mean_density() if handle is not None else 1.0
    finally:
        if handle is not None:
            handle.remove()
    return seconds, _frames(output), density


def verify(
    pipe: Any,
    profile: Profile,
    cfg: ProfileConfig,
    encode: Encoder,
    progress: bool,
    dense: tuple[float, Any, float] | None = None,
) -> dict[str, Any]:
    """Held-out prompt, first seed, dense (or the given dense run) then sparse: PSNR/SSIM of the final frames,
    density, wall time."""
    from tqdm.auto import tqdm

    from ..generate import frame_metrics

    assert cfg.holdout is not None
    seed = cfg.seeds[0]
    bar = tqdm(total=2, desc="verify", unit="run", disable=not progress)
    runs: dict[str, tuple[float, Any, float]] = {}
    runs["dense"] = dense if dense is not None else _holdout_run(pipe, None, cfg, encode)
    bar.update(1)
    runs["sparse"] = _holdout_run(pipe, profile, cfg, encode)
    bar.update(1)
    bar.close()
    m = frame_metrics(runs["dense"][1], runs["sparse"][1])
    return {
        "verify_prompt": cfg.holdout,
        "verify_seed": seed,
        "measured_mean_density": round(runs["sparse"][2], 6),
        "measured_dense_seconds": round(runs["dense"][0], 3),
        "measured_sparse_seconds": round(runs["sparse"][0], 3),
        "measured_speedup": round(runs["dense"][0] / runs["sparse"][0], 4),
        "psnr_mean": _finite(m["psnr_mean"]),
        "psnr_min": _finite(m["psnr_min"]),
        "ssim_mean": round(m["ssim_mean"], 6),
        "ssim_min": round(m["ssim_min"], 6),
    }


def _finite(x: float) -> float | str:
    """JSON has no infinity: identical frames give the string 'inf'."""
    return round(x, 4) if math.isfinite(x) else "inf"
