"""Dropping dit-sparse into diffusers: ``apply()``, ``SparseProcessor``, the root hook and the run report.

    handle = dit_sparse.apply(pipe, profile)       # every transformer of the pipeline (Wan 2.2: transformer_2 too)
    video = pipe(...).frames
    print(handle.report().summary())
    handle.remove()                                # original processors back, hooks gone

or the one-liner ``pipe.transformer.set_attn_processor(SparseProcessor(profile))``: on its first call the
processor finds its transformer (walking the Python call stack to the transformer's ``nn.Module.__call__``),
installs the same root hook and reads the same forward inputs, so its output equals ``apply()``'s.

Per transformer a stateful diffusers ``ModelHook`` (the *root hook*) publishes, per forward: the step index
(distinct timesteps since the last reset; a rising timestep starts a new run for pipelines without reset), the
batch layout and cache-context name (``cond``/``uncond``/``cond_uncond``), the latent grid read from the
transformer's own inputs, and the text span and padding. Each self-attention layer gets one ``SparseProcessor``
that runs the model's own projections, qk-norm and RoPE and replaces only the core attention call.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .patterns import (
    PATTERNS,
    MaskLayout,
    build_layer_mask,
    build_layer_perm,
    force_text_dense,
    is_dynamic,
    pattern_name,
    validate_pattern,
)
from .profile import Profile

if TYPE_CHECKING:
    from .kernels import BlockSparseIndex

ROOT_HOOK_NAME = "dit_sparse_root_hook"
DIFFUSERS_RANGE = ((0, 42), (0, 43))  # private hook / context-parallel API used here: pin and check
# layer plans kept per binding: at least this many, and two per self-attention layer (every layer of a deep model
# with its own head patterns, on two token layouts) so that a run never rebuilds a plan it made a layer earlier
_MASK_CACHE_SIZE = 32
# skip(mode="reuse") keeps each reused head's last computed output; bounded (LRU eviction beyond this)
REUSE_CACHE_MAX_BYTES = 1 << 30
# lse_topk(retention=True) keeps per (CFG context, layer) the Re-ttention ratio and residual; bounded (LRU eviction)
RETENTION_CACHE_MAX_BYTES = 1 << 30


class SparseApplyError(RuntimeError):
    """dit-sparse cannot be applied (already applied, wrong diffusers version, nothing to apply to)."""


def check_diffusers_version() -> None:
    import diffusers

    parts = tuple(int(x) for x in diffusers.__version__.split(".")[:2] if x.isdigit())
    lo, hi = DIFFUSERS_RANGE
    if not (lo <= parts < hi):
        raise SparseApplyError(
            f"dit-sparse needs diffusers>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]} (it uses diffusers' hook API), found "
            f"{diffusers.__version__}; install a supported version: pip install 'diffusers>=0.42,<0.43'"
        )


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class RunReport:
    """What happened during one pipeline run (one trajectory)."""

    transformer: str
    # (layer, step) -> computed fraction; read through ``density``. Dynamic masks record a 0-d tensor on the
    # device (``_pending``) so the generation path never waits for the GPU; the first read converts them all.
    _density: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)
    _pending: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    dense: dict[tuple[int, int], str] = field(default_factory=dict)  # (layer, step) -> why it ran dense
    fallbacks: list[str] = field(
        default_factory=list
    )  # dense fallbacks that were not asked for, with reasons
    attention_seconds: dict[tuple[int, int], float] = field(default_factory=dict)  # when timing is on
    steps: int = 0
    forwards: int = 0
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    # skip(mode="reuse"): (layer, step) -> "reused" or why the skipped heads were computed (dense) instead
    reuse: dict[tuple[int, int], str] = field(default_factory=dict)
    cache_bytes: dict[str, int] = field(default_factory=dict)  # peak bytes held per cache ("reuse", "masks")
    # lse_topk(retention=True): (layer, step) -> "refreshed", "corrected" or why the correction was not applied
    retention: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def density(self) -> dict[tuple[int, int], float]:
        """(layer, step) -> fraction of the attention computed, for every call that ran sparse."""
        if self._pending:
            keys = list(self._pending)
            values = torch.stack([v.reshape(()).double().cpu() for v in self._pending.values()]).tolist()
            self._density.update(zip(keys, values, strict=True))
            self._pending.clear()
        return self._density

    def record_density(self, key: tuple[int, int], value: float | torch.Tensor) -> None:
        """Record one call's density: a float, or a 0-d tensor read later (no host sync now)."""
        if isinstance(value, torch.Tensor):
            self._density.pop(key, None)
            self._pending[key] = value.detach()
        else:
            self._pending.pop(key, None)
            self._density[key] = float(value)

    def mean_density(self) -> float:
        """Mean fraction of attention computed over all (layer, step) calls; dense calls count as 1."""
        vals = list(self.density.values()) + [1.0] * len([k for k in self.dense if k not in self.density])
        return sum(vals) / len(vals) if vals else 1.0

    def sparse_density(self) -> float | None:
        """Mean density over the calls that ran sparse (None if none did)."""
        vals = list(self.density.values())
        return sum(vals) / len(vals) if vals else None

    def per_layer(self) -> dict[int, float]:
        out: dict[int, list[float]] = {}
        for (layer, _), d in self.density.items():
            out.setdefault(layer, []).append(d)
        for layer, step in self.dense:
            if (layer, step) not in self.density:
                out.setdefault(layer, []).append(1.0)
        return {layer: sum(v) / len(v) for layer, v in sorted(out.items())}

    def summary(self) -> str:
        sd = self.sparse_density()
        lines = [
            f"{self.transformer}: {self.steps} steps, {self.forwards} forwards, grids {sorted(set(self.grids))}",
            f"  mean density {self.mean_density():.3f} (sparse calls: {'-' if sd is None else f'{sd:.3f}'}), "
            f"{len(self.density)} sparse and {len(self.dense)} dense (layer, step) calls",
        ]
        if self.attention_seconds:
            lines.append(f"  attention time {sum(self.attention_seconds.values()):.3f} s (measured)")
        if self.cache_bytes:
            lines.append(
                "  cache peak "
                + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(self.cache_bytes.items()))
            )
        lines.extend(f"  dense fallback: {r}" for r in self.fallbacks)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transformer": self.transformer,
            "steps": self.steps,
            "forwards": self.forwards,
            "mean_density": self.mean_density(),
            "per_layer_density": self.per_layer(),
            "per_layer_step_density": {f"{k[0]},{k[1]}": v for k, v in sorted(self.density.items())},
            "dense_calls": {f"{k[0]},{k[1]}": v for k, v in sorted(self.dense.items())},
            "fallbacks": list(self.fallbacks),
            "attention_seconds": sum(self.attention_seconds.values()) if self.attention_seconds else None,
            "reuse": {f"{k[0]},{k[1]}": v for k, v in sorted(self.reuse.items())},
            "retention": {f"{k[0]},{k[1]}": v for k, v in sorted(self.retention.items())},
            "cache_bytes": dict(self.cache_bytes),
        }

    def note_cache(self, name: str, nbytes: int) -> None:
        self.cache_bytes[name] = max(self.cache_bytes.get(name, 0), nbytes)


# ---------------------------------------------------------------------------------------------------- binding
@dataclass(frozen=True)
class _StaticPlan:
    """What one layer runs for one token layout, built once and cached (everything but dynamic masks)."""

    mask: torch.Tensor  # bool (1, H, nB, nB), text dense; dynamic heads hold their always-kept blocks
    perm: (
        torch.Tensor | None
    )  # int64 (1, H, N), identity for heads that keep the raster order; None: no head reorders
    density: float  # of ``mask``
    dynamic: tuple[
        tuple[str, dict[str, Any], tuple[int, ...]], ...
    ]  # (pattern, params, heads) per dynamic group
    reuse: tuple[int, ...]  # heads with skip(mode="reuse")
    # ``mask`` as the Triton kernel's index, built once (kernels.prepare_block_mask); None off the Triton path
    index: BlockSparseIndex | None = None

    def block_arg(self, mask: torch.Tensor) -> torch.Tensor | BlockSparseIndex:
        """What to hand the kernel for ``mask``: the prepared index when ``mask`` is this plan's own mask."""
        return self.index if self.index is not None and mask is self.mask else mask


@dataclass(frozen=True)
class _StepMask:
    """A layer's mask with its dynamic heads filled in at step ``step`` (reused until the next refresh)."""

    mask: torch.Tensor  # bool (B, H, nB, nB)
    density: torch.Tensor  # 0-d, on the mask's device (read by the report, not on the generation path)
    step: int


@dataclass
class _ForwardState:
    step: int = -1
    last_t: float | None = None
    inputs: Any = None  # pipelines.base.ForwardInputs
    context_name: str | None = None


class TransformerBinding:
    """Everything dit-sparse knows about one transformer: family, profile, layers, per-forward state, caches."""

    def __init__(self, transformer: torch.nn.Module, family: Any, profile: Profile, impl: str, timing: bool):
        self.transformer = transformer
        self.family = family
        self.profile = profile
        self.impl = impl
        self.timing = timing
        self.modules = family.self_attention_modules(transformer)
        self.layer_of: dict[int, int] = {id(m): i for i, (_, m) in enumerate(self.modules)}
        # the profile is fixed for this binding: name each layer's head patterns once, not on every call
        self._layer_names = [
            tuple(pattern_name(s.pattern, s.params) for s in heads) for heads in profile.layers
        ]
        self.state = _ForwardState()
        self.masks: OrderedDict[Any, _StaticPlan] = OrderedDict()
        self.plan_cache_size = max(_MASK_CACHE_SIZE, 2 * len(self.modules))
        self.step_masks: OrderedDict[Any, _StepMask] = OrderedDict()  # dynamic masks, per run
        self.reuse_cache: OrderedDict[Any, torch.Tensor] = OrderedDict()  # skip(reuse) outputs, per run
        self.reuse_cache_max_bytes = REUSE_CACHE_MAX_BYTES
        self._reuse_too_big: set[Any] = set()  # (context, layer) whose reused heads did not fit the cache
        # lse_topk(retention=True): (layer, context, layout, batch, device) -> (r (B, R, N), residual (B, R, N, D))
        self.retention_cache: OrderedDict[Any, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.retention_cache_max_bytes = RETENTION_CACHE_MAX_BYTES
        self.runs: list[RunReport] = []
        # head subsets -> index tensor, per device
        self._head_indices: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
        self._warned: set[str] = set()
        self.hook: Any = None
        self._ctx_manager: Any = None
        # optional observer ``capture(layer, step, q, k, v, layout)`` called before every core attention call
        self.capture: Callable[..., None] | None = None

    # -- per forward -----------------------------------------------------------------------------------
    def observe(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = self.family.read_inputs(self.transformer, args, kwargs)
        t = _timestep_key(inputs.timestep)
        st = self.state
        new_run = st.last_t is None
        if (
            not new_run
            and t is not None
            and st.last_t is not None
            and t > st.last_t
            and not self.family.resets_each_run
        ):
            new_run = True  # pipelines without a hook reset (SD3, PixArt): a rising timestep starts a new run
        if new_run:
            self._start_run()
            st.step = 0
        elif t != st.last_t:
            st.step += 1
        st.last_t = t
        st.inputs = inputs
        ctx = getattr(self._ctx_manager, "_context", None)
        st.context_name = getattr(ctx, "name", None)
        run = self.runs[-1]
        run.forwards += 1
        run.steps = st.step + 1
        if inputs.grid not in run.grids:
            run.grids.append(inputs.grid)

    def _start_run(self) -> None:
        self.runs.append(RunReport(transformer=type(self.transformer).__name__))
        del self.runs[:-8]  # keep the last few runs only
        self._clear_run_caches()  # pipelines without a reset hook start a run here

    def reset(self) -> None:
        self.state = _ForwardState()
        self._clear_run_caches()

    def _clear_run_caches(self) -> None:
        """Step-cached dynamic masks and reused head outputs belong to one run (one trajectory)."""
        self.step_masks.clear()
        self.reuse_cache.clear()
        self._reuse_too_big.clear()
        self.retention_cache.clear()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)
            if self.runs:
                self.runs[-1].fallbacks.append(message)

    # -- core attention ---------------------------------------------------------------------------------
    def core_for(self, layer: int, proc: Any) -> Callable[..., torch.Tensor]:
        def core(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            dense_fn: Callable[[], torch.Tensor],
            *,
            layout: str = "bshd",
            scale: float | None = None,
            text_valid: torch.Tensor | None = None,
            dense_reason: str | None = None,
            num_text: int | None = None,
        ) -> torch.Tensor:
            start = time.perf_counter() if self.timing else 0.0
            if self.capture is not None:  # the profiler's observer: sees the real q/k/v of every call
                self.capture(layer, self.state.step, q, k, v, layout)
            if dense_reason is not None:
                # the family cannot run this call sparse: dense, said once and listed in the report
                self.warn_once(f"family:{dense_reason}", f"dit-sparse: {dense_reason}; this layer runs dense")
                self.runs[-1].dense[(layer, self.state.step)] = dense_reason
                out = dense_fn()
            else:
                out = self._core(layer, proc, q, k, v, dense_fn, layout, scale, text_valid, num_text)
            if self.timing:
                if out.device.type == "cuda":
                    torch.cuda.synchronize(out.device)
                key = (layer, self.state.step)
                run = self.runs[-1]
                run.attention_seconds[key] = run.attention_seconds.get(key, 0.0) + time.perf_counter() - start
            return out

        return core

    def _core(
        self,
        layer: int,
        proc: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dense_fn: Callable[[], torch.Tensor],
        layout: str,
        scale: float | None,
        text_valid: torch.Tensor | None,
        num_text: int | None = None,
    ) -> torch.Tensor:
        st = self.state
        if st.inputs is None:
            raise RuntimeError(
                "dit-sparse: attention ran before the transformer's forward was observed; call the transformer "
                "(or pipeline), not the attention module directly"
            )
        run = self.runs[-1]
        key = (layer, st.step)
        prof = self.profile
        if st.step < prof.schedule.dense_steps:
            run.dense[key] = "warm-up step"
            return self._dense_step(layer, dense_fn, layout)
        if layer in prof.schedule.dense_layers:
            run.dense[key] = "dense layer"
            return dense_fn()
        if all(s.pattern == "dense" for s in prof.layers[layer]):
            run.dense[key] = "all heads dense"
            return dense_fn()
        if getattr(proc, "_parallel_config", None) is not None:
            # diffusers context parallelism: Ulysses runs sparse inside its all-to-all, ring runs dense (parallel.py)
            from .parallel import context_parallel_core

            return context_parallel_core(self, layer, proc, q, k, v, dense_fn, layout, scale, text_valid)

        bshd = layout == "bshd"
        qh, kh, vh = (
            (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if bshd else (q, k, v)
        )  # (B,H,S,D)
        inputs = st.inputs
        n_text = inputs.num_text if num_text is None else num_text  # per-call override: image-only layers
        mlayout = MaskLayout(inputs.grid, n_text, inputs.text_first, prof.block_size)
        n = qh.shape[2]
        if n != mlayout.seq_len or kh.shape[2] != n:
            raise RuntimeError(
                f"dit-sparse layer {layer}: self-attention has {n} query and {kh.shape[2]} key tokens, but the latent "
                f"grid {inputs.grid} plus {n_text} text tokens gives {mlayout.seq_len}; the {self.family.name} "
                "adapter does not match this model's token layout (please report it)"
            )
        if qh.shape[1] != prof.fingerprint.num_heads:
            raise RuntimeError(
                f"dit-sparse layer {layer}: attention sees {qh.shape[1]} heads, the profile has "
                f"{prof.fingerprint.num_heads} (tensor parallelism is not supported)"
            )
        if text_valid is not None and not bool(text_valid.all()):
            out = self._padded_text(layer, qh, kh, vh, mlayout, scale, text_valid)
        else:
            plan = self._static_plan(layer, mlayout, qh.device)
            mask, density = self._step_mask(layer, plan, mlayout, qh, kh)
            run.record_density(key, density)
            out = self._kernel(qh, kh, vh, plan.block_arg(mask), scale, plan.perm)  # (B, H, N, D)
            if plan.reuse:
                out = self._reuse_heads(layer, plan.reuse, out, qh, kh, vh, scale)
            out = self._retention(layer, plan, mlayout, qh, kh, vh, mask, scale, out)
        return out.transpose(1, 2) if bshd else out

    def _kernel(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | BlockSparseIndex,
        scale: float | None,
        perm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from .kernels import sparse_attention

        return sparse_attention(q, k, v, mask, self.profile.block_size, scale, impl=self.impl, perm=perm)

    # -- skip(mode="reuse") -----------------------------------------------------------------------------
    def _reuse_heads_of(self, layer: int) -> tuple[int, ...]:
        return tuple(
            h
            for h, s in enumerate(self.profile.layers[layer])
            if s.pattern == "skip" and s.params.get("mode") == "reuse"
        )

    def _dense_step(self, layer: int, dense_fn: Callable[[], torch.Tensor], layout: str) -> torch.Tensor:
        """A dense (warm-up) step; heads that will be reused later remember this step's output."""
        out = dense_fn()
        heads = self._reuse_heads_of(layer)
        if heads:
            bhsd = out.transpose(1, 2) if layout == "bshd" else out  # (B, H, S, D)
            self._remember(layer, heads, bhsd)
        return out

    def _remember(self, layer: int, heads: tuple[int, ...], out: torch.Tensor) -> None:
        """Keep ``out[:, heads]`` for (CFG context, layer) within the byte budget (LRU eviction)."""
        key = (self.state.context_name, layer)
        self.reuse_cache.pop(key, None)
        val = out[:, list(heads)].detach().clone()  # (B, R, N, D)
        nbytes = val.numel() * val.element_size()
        if nbytes > self.reuse_cache_max_bytes:
            self._reuse_too_big.add(key)
            self.warn_once(
                "reuse-full",
                f"dit-sparse: skip(mode='reuse') needs {nbytes / 2**20:.1f} MiB per layer, more than the reuse cache's "
                f"{self.reuse_cache_max_bytes / 2**20:.1f} MiB; those heads are computed (dense) instead of reused",
            )
            return
        used = sum(t.numel() * t.element_size() for t in self.reuse_cache.values())
        while self.reuse_cache and used + nbytes > self.reuse_cache_max_bytes:
            _, old = self.reuse_cache.popitem(last=False)
            used -= old.numel() * old.element_size()
        self.reuse_cache[key] = val
        if self.runs:
            self.runs[-1].note_cache("reuse", used + nbytes)

    def _reuse_heads(
        self,
        layer: int,
        heads: tuple[int, ...],
        out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None,
    ) -> torch.Tensor:
        """Put the reused heads' previous output into ``out (B, H, N, D)``; on a miss (cache empty, evicted or
        another shape) compute them densely, say so, and remember them for the next step."""
        run, key = self.runs[-1], (layer, self.state.step)
        idx = list(heads)
        cached = self.reuse_cache.get((self.state.context_name, layer))
        want = (out.shape[0], len(heads), out.shape[2], out.shape[3])
        if cached is not None and tuple(cached.shape) == want and cached.dtype == out.dtype:
            self.reuse_cache.move_to_end((self.state.context_name, layer))
            out[:, idx] = cached
            run.reuse[key] = "reused"
            return out
        if cached is not None:
            why = f"cached shape {tuple(cached.shape)} != {want}"
        elif (self.state.context_name, layer) in self._reuse_too_big:
            why = "cache full (one layer's heads exceed reuse_cache_max_bytes)"
        else:
            why = "cache empty or evicted"
        self.warn_once(
            "reuse-miss",
            f"dit-sparse: skip(mode='reuse') heads had no previous output ({why}); they are computed dense instead "
            "(give the profile a dense warm-up step so they have one)",
        )
        run.reuse[key] = f"computed dense: {why}"
        out[:, idx] = torch.nn.functional.scaled_dot_product_attention(
            q[:, idx], k[:, idx], v[:, idx], scale=scale
        ).to(out.dtype)  # (B, R, N, D)
        self._remember(layer, heads, out)
        return out

    # -- lse_topk(retention=True): Re-ttention correction -------------------------------------------------
    def _retention(
        self,
        layer: int,
        plan: _StaticPlan,
        mlayout: MaskLayout,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        scale: float | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """At a mask refresh step compute the exact Re-ttention ratio and residual of the retention heads from
        ``q, k, v (B, H, N, D)`` and this step's sparse ``out`` (then ``out`` becomes dense attention for them) and
        cache them; on the steps that reuse the mask apply the cached ones (``patterns.dynamic.retention_stats``)."""
        heads = _retention_heads(plan)
        if not heads:
            return out
        from .patterns.dynamic import apply_retention, retention_stats

        run, rkey = self.runs[-1], (layer, self.state.step)
        key = (layer, self.state.context_name, mlayout, q.shape[0], str(q.device))
        step_mask = self.step_masks.get(self._step_key(layer, mlayout, q))
        idx = torch.tensor(heads, device=q.device)
        if step_mask is None or step_mask.step == self.state.step:  # refreshed this call
            r, residual = retention_stats(
                q.index_select(1, idx),
                k.index_select(1, idx),
                v.index_select(1, idx),
                mask.index_select(1, idx),
                mlayout.block_size,
                out.index_select(1, idx),
                scale,
            )  # (B, R, N), (B, R, N, D)
            out[:, heads] = apply_retention(out[:, heads], r, residual)
            self._remember_retention(key, r, residual)
            run.retention[rkey] = "refreshed"
            return out
        cached = self.retention_cache.get(key)
        if cached is None:
            why = "no cached statistics (evicted or over retention_cache_max_bytes)"
            self.warn_once(
                "retention-miss", f"dit-sparse: lse_topk(retention=True) heads ran uncorrected: {why}"
            )
            run.retention[rkey] = f"not applied: {why}"
            return out
        self.retention_cache.move_to_end(key)
        out[:, heads] = apply_retention(out[:, heads], *cached)
        run.retention[rkey] = "corrected"
        return out

    def _remember_retention(self, key: Any, r: torch.Tensor, residual: torch.Tensor) -> None:
        self.retention_cache.pop(key, None)
        nbytes = r.numel() * r.element_size() + residual.numel() * residual.element_size()
        if nbytes > self.retention_cache_max_bytes:
            self.warn_once(
                "retention-full",
                f"dit-sparse: lse_topk(retention=True) needs {nbytes / 2**20:.1f} MiB per layer, more than the "
                f"retention cache's {self.retention_cache_max_bytes / 2**20:.1f} MiB; sparse steps run uncorrected",
            )
            return
        used = sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for a, b in self.retention_cache.values()
        )
        while self.retention_cache and used + nbytes > self.retention_cache_max_bytes:
            _, (a, b) = self.retention_cache.popitem(last=False)
            used -= a.numel() * a.element_size() + b.numel() * b.element_size()
        self.retention_cache[key] = (r, residual)
        if self.runs:
            self.runs[-1].note_cache("retention", used + nbytes)

    def _padded_text(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mlayout: MaskLayout,
        scale: float | None,
        text_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Padded text keys are dropped per sample: real tokens run sparse on the shortened layout, padded query
        rows attend densely to the real keys (as the model's own key-padding mask makes them do)."""
        out = torch.zeros_like(q)
        text_start = 0 if mlayout.text_first else mlayout.num_video
        densities = []
        for b in range(q.shape[0]):
            keep = torch.ones(q.shape[2], dtype=torch.bool, device=q.device)
            keep[text_start : text_start + mlayout.num_text] = text_valid[b].to(q.device)
            n_text = int(text_valid[b].sum())
            sub = MaskLayout(mlayout.grid, n_text, mlayout.text_first, mlayout.block_size)
            qb, kb, vb = q[b : b + 1, :, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep]
            plan = self._static_plan(layer, sub, q.device)
            mask, density = self._step_mask(layer, plan, sub, qb, kb, sample=b)
            if _retention_heads(plan):
                self.warn_once(
                    "retention-padded",
                    "dit-sparse: lse_topk(retention=True) heads run without the Re-ttention correction when the "
                    "text is padded",
                )
                self.runs[-1].retention[(layer, self.state.step)] = "not applied: padded text"
            if plan.reuse:  # not reused per sample: computed dense, and said so
                mask = mask.clone()
                mask[:, list(plan.reuse)] = True
                self.warn_once(
                    "reuse-padded",
                    "dit-sparse: skip(mode='reuse') heads are computed dense when the text is padded",
                )
                self.runs[-1].reuse[(layer, self.state.step)] = "computed dense: padded text"
            densities.append(density)
            out[b : b + 1, :, keep] = self._kernel(qb, kb, vb, plan.block_arg(mask), scale, plan.perm)
            drop = ~keep
            if bool(drop.any()):
                out[b : b + 1, :, drop] = torch.nn.functional.scaled_dot_product_attention(
                    q[b : b + 1, :, drop], kb, vb, scale=scale
                )
        self.runs[-1].record_density((layer, self.state.step), sum(densities) / len(densities))
        return out

    def _static_plan(self, layer: int, mlayout: MaskLayout, device: torch.device) -> _StaticPlan:
        """Mask, permutation and head groups of ``layer`` (cached per head-pattern set, layout and device)."""
        heads = [(s.pattern, s.params) for s in self.profile.layers[layer]]
        names = self._layer_names[layer]
        key = (names, mlayout, str(device))
        hit = self.masks.get(key)
        if hit is not None:
            self.masks.move_to_end(key)
            return hit
        from .kernels import token_density

        mask = build_layer_mask(heads, mlayout, device)
        groups: dict[str, tuple[str, dict[str, Any], list[int]]] = {}
        for h, ((name, params), nm) in enumerate(zip(heads, names, strict=True)):
            if is_dynamic(name):
                groups.setdefault(nm, (name, validate_pattern(name, params), []))[2].append(h)
        plan = _StaticPlan(
            mask=mask,
            perm=build_layer_perm(heads, mlayout, device),
            density=float(token_density(mask, mlayout.block_size, mlayout.seq_len, mlayout.seq_len)),
            dynamic=tuple((n, p, tuple(hs)) for n, p, hs in groups.values()),
            reuse=self._reuse_heads_of(layer),
            index=self._prepare_index(mask, mlayout, device),
        )
        self.masks[key] = plan
        while len(self.masks) > self.plan_cache_size:
            self.masks.popitem(last=False)
        if self.runs:
            held = [p.index for p in self.masks.values() if p.index is not None]
            self.runs[-1].note_cache("index", sum(i.nbytes() for i in held))
        return plan

    def _prepare_index(
        self, mask: torch.Tensor, mlayout: MaskLayout, device: torch.device
    ) -> BlockSparseIndex | None:
        """The layer mask as the Triton kernel's index, made once per plan instead of on every call (the
        kernel would otherwise rebuild it each time); None where another implementation runs."""
        from .kernels import prepare_block_mask, resolve_impl

        if resolve_impl(self.impl, device) != "triton":
            return None
        return prepare_block_mask(mask, mlayout.block_size, mlayout.seq_len)

    def _head_index(self, heads: Sequence[int], device: torch.device) -> torch.Tensor:
        """int64 index of ``heads`` on ``device``, made once (a host-to-device copy waits for the GPU)."""
        key = (tuple(heads), str(device))
        idx = self._head_indices.get(key)
        if idx is None:
            idx = self._head_indices[key] = torch.tensor(key[0], dtype=torch.int64, device=device)
        return idx

    def _refresh_interval(self, plan: _StaticPlan) -> int:
        default = self.profile.schedule.refresh_interval
        return min(default if p.get("refresh") is None else int(p["refresh"]) for _, p, _ in plan.dynamic)

    def refresh_due(self, plan: _StaticPlan, cached_step: int | None) -> bool:
        """Dynamic masks are rebuilt at sparse steps ``dense_steps + m·interval`` (every call for interval 0 or 1)
        and whenever none is cached for this run."""
        interval = self._refresh_interval(plan)
        step = self.state.step
        if cached_step is None or interval <= 1:
            return True
        return step != cached_step and (step - self.profile.schedule.dense_steps) % interval == 0

    def _step_key(
        self,
        layer: int,
        mlayout: MaskLayout,
        q: torch.Tensor,
        sample: int | None = None,
        heads: Sequence[int] | None = None,
    ) -> tuple[Any, ...]:
        """Cache key of a layer's dynamic mask: CFG context, layout, batch, device, padded-text sample, heads."""
        hs = None if heads is None else tuple(heads)
        return (layer, self.state.context_name, mlayout, q.shape[0], str(q.device), sample, hs)

    def _step_mask(
        self,
        layer: int,
        plan: _StaticPlan,
        mlayout: MaskLayout,
        q: torch.Tensor,
        k: torch.Tensor,
        sample: int | None = None,
        heads: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """The layer's mask for this call: the static plan's, with dynamic heads filled in from ``q, k
        (B, H, N, D)`` at refresh steps and reused in between (per CFG context, layout and batch).

        ``heads``: the global heads ``q, k`` hold, in their order (a context-parallel rank's slice); the mask then
        covers those heads only, and a layer with dynamic heads reports the density of those heads."""
        base = plan.mask if heads is None else plan.mask[:, list(heads)]
        if not plan.dynamic:
            return base, plan.density
        key = self._step_key(layer, mlayout, q, sample, heads)
        hit = self.step_masks.get(key)
        if hit is not None and not self.refresh_due(plan, hit.step):
            return hit.mask, hit.density
        from .kernels import token_density

        bsz = q.shape[0]
        mask = base.expand(bsz, -1, -1, -1).clone()  # (B, H, nB, nB)
        where = {g: i for i, g in enumerate(range(plan.mask.shape[1]) if heads is None else heads)}
        for name, params, group in plan.dynamic:
            local = [where[g] for g in group if g in where]  # the group's heads that q/k hold
            if not local:
                continue
            perm = None if plan.perm is None else plan.perm[0, group[0]]  # (N,) shared by the group
            builder = PATTERNS[name].dynamic
            assert builder is not None
            if local == list(range(q.shape[1])):  # every head: no copy of q/k
                mask[:] = builder(mlayout, q, k, perm, **params)
            else:
                idx = self._head_index(local, q.device)
                qs, ks = q.index_select(1, idx), k.index_select(1, idx)
                mask[:, local] = builder(mlayout, qs, ks, perm, **params)
        mask = force_text_dense(mask, mlayout)
        # a 0-d tensor: the report reads it when asked (no host sync on the generation path)
        density = token_density(mask, mlayout.block_size, mlayout.seq_len, mlayout.seq_len)
        self.step_masks[key] = _StepMask(mask, density, self.state.step)
        while len(self.step_masks) > 4 * self.plan_cache_size:
            self.step_masks.popitem(last=False)
        if self.runs:
            self.runs[-1].note_cache("masks", sum(m.mask.numel() for m in self.step_masks.values()))
        return mask, density


def _retention_heads(plan: _StaticPlan) -> list[int]:
    """Heads of ``plan`` whose dynamic pattern asks for the Re-ttention correction (``retention=True``)."""
    return [h for _, params, heads in plan.dynamic if params.get("retention") for h in heads]


def _timestep_key(t: Any) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


# ---------------------------------------------------------------------------------------------------- hook
def _make_root_hook(binding: TransformerBinding) -> Any:
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    class _NoState(BaseState):
        def reset(self, *args: Any, **kwargs: Any) -> None:
            pass

    class SparseRootHook(ModelHook):
        """Publishes step, grid, text layout and CFG context of each transformer forward to the processors."""

        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.binding = binding
            # receives diffusers' CacheContext (cond / uncond / cond_uncond) from `transformer.cache_context`
            self.context_manager = StateManager(_NoState)  # type: ignore[arg-type]
            binding._ctx_manager = self.context_manager

        @torch.compiler.disable
        def pre_forward(
            self, module: torch.nn.Module, *args: Any, **kwargs: Any
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            self.binding.observe(args, kwargs)
            return args, kwargs

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.binding.reset()
            return module

    return SparseRootHook()


def _install_root_hook(binding: TransformerBinding) -> None:
    from diffusers.hooks.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(binding.transformer)
    if registry.get_hook(ROOT_HOOK_NAME) is not None:
        raise SparseApplyError(
            f"dit-sparse is already applied to this {type(binding.transformer).__name__}; call handle.remove() "
            "on the first handle before applying again"
        )
    binding.hook = _make_root_hook(binding)
    registry.register_hook(binding.hook, ROOT_HOOK_NAME)


def _remove_root_hook(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(ROOT_HOOK_NAME) is not None:
        registry.remove_hook(ROOT_HOOK_NAME, recurse=False)


# ---------------------------------------------------------------------------------------------------- processor
class SparseProcessor:
    """Attention processor that runs the model's own q/k/v, qk-norm and RoPE and a sparse core attention.

    ``apply()`` installs one per self-attention layer. Used directly as
    ``transformer.set_attn_processor(SparseProcessor(profile))`` (one instance on every attention module), it binds
    itself to its transformer on the first call and delegates cross-attention modules to the model's stock
    processor.

    Args:
        profile: the :class:`~dit_sparse.Profile` to run.
        impl: kernel implementation, ``"auto"`` (Triton on CUDA, block-gather on CPU), ``"triton"``, ``"gather"``.
        timing: measure attention wall time per (layer, step) for the report (synchronises CUDA; off by default).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, profile: Profile, *, impl: str = "auto", timing: bool = False) -> None:
        if not isinstance(profile, Profile):
            raise TypeError(f"SparseProcessor needs a dit_sparse.Profile, got {type(profile).__name__}")
        profile.validate()
        self.profile = profile
        self.impl = impl
        self.timing = timing
        self._bound: dict[int, tuple[TransformerBinding, int | None]] = {}
        self._delegates: dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"SparseProcessor(family={self.profile.family!r}, layers={len(self.profile.layers)}, impl={self.impl!r})"

    def _bind(self, module: torch.nn.Module, binding: TransformerBinding, layer: int | None) -> None:
        self._bound[id(module)] = (binding, layer)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        image_rotary_emb: Any = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        entry = self._bound.get(id(attn))
        if entry is None:
            entry = self._bind_from_stack(attn)
        binding, layer = entry
        rope = rotary_emb if rotary_emb is not None else image_rotary_emb
        extra = dict(kwargs)
        if encoder_hidden_states_mask is not None:
            extra["encoder_hidden_states_mask"] = encoder_hidden_states_mask
        if temb is not None:
            extra["temb"] = temb
        if layer is None:  # a module we do not sparsify (cross-attention, text refiner): the stock processor
            delegate = self._delegate_for(attn, binding)
            return _call_stock(
                delegate, attn, hidden_states, encoder_hidden_states, attention_mask, rope, extra
            )
        core = binding.core_for(layer, self)
        return binding.family.attention(
            self, core, attn, hidden_states, encoder_hidden_states, attention_mask, rope, **extra
        )

    def _delegate_for(self, attn: torch.nn.Module, binding: TransformerBinding) -> Any:
        d = self._delegates.get(id(attn))
        if d is None:
            d = binding.family.dense_processor(attn)
            if hasattr(d, "_attention_backend"):
                d._attention_backend = self._attention_backend
                d._parallel_config = self._parallel_config
            self._delegates[id(attn)] = d
        return d

    def _bind_from_stack(self, attn: torch.nn.Module) -> tuple[TransformerBinding, int | None]:
        """One-liner mode: find the transformer whose forward is running, bind it, observe this forward."""
        from .pipelines import UnsupportedModelError, family_for

        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "_call_impl" and "self" in frame.f_locals:
                module = frame.f_locals["self"]
                try:
                    family_for(module)
                except UnsupportedModelError:
                    frame = frame.f_back  # type: ignore[assignment]
                    continue
                if any(m is attn for m in module.modules()):
                    binding = _bind_transformer(module, self.profile, self.impl, self.timing, processor=self)
                    # this forward started before the root hook existed: observe its inputs from the frame
                    binding.observe(
                        tuple(frame.f_locals.get("args", ())), dict(frame.f_locals.get("kwargs", {}))
                    )
                    return self._bound[id(attn)]
            frame = frame.f_back  # type: ignore[assignment]
        raise SparseApplyError(
            "SparseProcessor could not find the transformer this attention layer belongs to (was the attention "
            "module called on its own, or under torch.compile?); use dit_sparse.apply(pipe, profile) instead"
        )


def _call_stock(
    proc: Any,
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    rope: Any,
    extra: dict[str, Any],
) -> Any:
    import inspect

    params = inspect.signature(proc.__call__).parameters
    kw: dict[str, Any] = {k: v for k, v in extra.items() if k in params}
    if rope is not None:
        kw["rotary_emb" if "rotary_emb" in params else "image_rotary_emb"] = rope
    return proc(
        attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kw
    )


def _bind_transformer(
    transformer: torch.nn.Module,
    profile: Profile,
    impl: str,
    timing: bool,
    processor: SparseProcessor | None = None,
) -> TransformerBinding:
    """Check compatibility, install the root hook, and bind self-attention modules to processors."""
    from .pipelines import family_for

    check_diffusers_version()
    family = family_for(transformer)
    profile.check_compatible(family.fingerprint(transformer), family.name)
    binding = TransformerBinding(transformer, family, profile, impl, timing)
    _install_root_hook(binding)
    if processor is not None:
        # one-liner: the shared instance serves every attention module of the transformer; installed after
        # enable_parallelism(), it replaced processors that carried the context-parallel config: inherit it
        from .parallel import inherit_parallel_config

        inherit_parallel_config(processor, transformer)
        for _, module in _attention_modules(transformer):
            processor._bind(module, binding, binding.layer_of.get(id(module)))
    return binding


# ---------------------------------------------------------------------------------------------------- apply
class SparseHandle:
    """Returned by :func:`apply`; ``remove()`` restores the exact original processors and removes the hooks."""

    def __init__(self) -> None:
        self.bindings: list[TransformerBinding] = []
        self._originals: list[tuple[torch.nn.Module, Any]] = []
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        for module, proc in self._originals:
            set_module_processor(module, proc)
        for b in self.bindings:
            _remove_root_hook(b.transformer)
        self.removed = True

    def report(self, index: int = -1) -> RunReport:
        """The latest run's report of the first transformer that ran (``reports()`` for all)."""
        ran = [b.runs[index] for b in self.bindings if b.runs]
        if not ran:
            raise RuntimeError("no pipeline or transformer call has run since dit_sparse.apply()")
        return ran[0]

    def reports(self) -> list[RunReport]:
        return [b.runs[-1] for b in self.bindings if b.runs]

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _transformers_of(obj: Any) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = [getattr(obj, name, None) for name in ("transformer", "transformer_2")]
    mods = [m for m in found if isinstance(m, torch.nn.Module)]
    if not mods:
        raise TypeError(
            f"dit_sparse.apply needs a diffusers pipeline with a .transformer or a transformer model, got "
            f"{type(obj).__name__}"
        )
    return mods


def apply(
    pipe_or_transformer: Any, profile: Profile, *, impl: str = "auto", timing: bool = False
) -> SparseHandle:
    """Install sparse attention on every transformer of a pipeline (or on one transformer).

    Args:
        pipe_or_transformer: a diffusers pipeline (``.transformer`` and, for Wan 2.2, ``.transformer_2``) or a
            transformer model.
        profile: the :class:`~dit_sparse.Profile` to run; checked against each transformer's architecture.
        impl: kernel implementation (``"auto"``: Triton on CUDA, block-gather on CPU).
        timing: measure attention wall time per (layer, step) for the report.

    Returns:
        a :class:`SparseHandle`; ``handle.remove()`` restores the original processors and removes the hooks.
    """
    if not isinstance(profile, Profile):
        raise TypeError(f"apply() needs a dit_sparse.Profile, got {type(profile).__name__}")
    profile.validate()
    transformers = _transformers_of(pipe_or_transformer)
    handle = SparseHandle()
    try:
        for t in transformers:
            for _, module in _attention_modules(t):
                if isinstance(getattr(module, "processor", None), SparseProcessor):
                    raise SparseApplyError(
                        f"dit-sparse is already applied to this {type(t).__name__} (a SparseProcessor is installed); "
                        "call handle.remove() (or restore the processors) before applying again"
                    )
            binding = _bind_transformer(t, profile, impl, timing)
            handle.bindings.append(binding)
            for layer, (_, module) in enumerate(binding.modules):
                old = module.processor
                new = SparseProcessor(profile, impl=impl, timing=timing)
                # keep the backend and context-parallel config the user (or enable_parallelism) chose
                new._attention_backend = getattr(old, "_attention_backend", None)
                new._parallel_config = getattr(old, "_parallel_config", None)
                new._bind(module, binding, layer)
                handle._originals.append((module, old))
                set_module_processor(module, new)
    except BaseException:
        handle.remove()
        raise
    return handle


def _attention_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every module with an attention processor (``Attention``, ``AttentionModuleMixin``, ``MochiAttention``)."""
    return [(n, m) for n, m in transformer.named_modules() if callable(getattr(m, "processor", None))]


def set_module_processor(module: torch.nn.Module, processor: Any) -> None:
    """``module.set_processor(p)`` where the class has it; plain assignment for ``MochiAttention``, which has only
    a ``processor`` attribute in diffusers 0.42."""
    setter = getattr(module, "set_processor", None)
    if callable(setter):
        setter(processor)
    else:
        module.processor = processor
