"""Sparse attention under diffusers' context parallelism (``transformer.enable_parallelism(...)``).

With Ulysses (``ContextParallelConfig(ulysses_degree=N)``, ring degree 1) every rank projects q/k/v for its
sequence shard, an all-to-all swaps the sequence split for a head split, and the inner attention sees the **full
sequence** and a contiguous slice of **global heads** ``[r·⌈H/N⌉, …)`` (``r`` = the rank in the Ulysses group).
dit-sparse runs its kernel exactly there: as the ``forward_op`` of diffusers' private
``_templated_context_parallel_attention`` (diffusers 0.42; feature-detected, see :func:`templated_cp_attention`).
So each rank computes the same blocks a single process would for its heads, indexed by global head.

Token order after the all-to-all is the concatenation of the ranks' shards. Which tokens a shard holds depends on
the model's ``_cp_plan``:

* Wan, LTX-Video: self-attention is video only and one contiguous sequence is split, so the order is unchanged;
* FLUX, Qwen-Image: text and image are split **separately** and each rank concatenates ``[text_r, image_r]``, so
  the gathered order is ``[text_0, image_0, text_1, image_1, …]``. The forward op gathers the tokens into the
  canonical ``[text, image]`` order the block masks are built for, and scatters the output back.

Wan and FLUX are checked on two gloo ranks against one process (``tests/test_parallel.py``); LTX-Video and
Qwen-Image follow from their diffusers ``_cp_plan`` but have no two-rank test yet.

Shard sizes follow ``tensor_split`` (``chunk`` for equal shards, which diffusers requires unless
``ulysses_anything=True``); with ``ulysses_anything`` heads are padded to a multiple of N, so rank ``r`` holds global
heads from ``r·⌈H/N⌉`` and the last rank may hold fewer.

Head balancing: heads are split contiguously and sparse heads differ in cost, so the busiest rank sets the pace.
When the profile's per-head block counts make the contiguous split uneven (by ``HEAD_BALANCE_MIN_GAIN`` or more),
q/k/v heads are reordered before the all-to-all (:func:`balance_heads`, the same order on every rank) and the output
is put back after it; each head still computes exactly what it would on one process. Not with ``ulysses_anything``,
and not for layers with dynamic heads (their blocks are chosen at run time).

Every pattern whose heads depend only on their own q/k runs sparse here: static masks are sliced to the rank's
heads, reorderings (PARO's axis orders, draft's patch order) gather/scatter the rank's heads' tokens inside the
kernel, and dynamic heads (``draft``, ``lse_topk``) build their masks from the rank's q/k at refresh steps (a group
of heads split across ranks is built in parts). Under context parallelism a layer with dynamic heads reports the
density of the rank's heads. Heads that carry state across steps (``skip(mode="reuse")``,
``lse_topk(retention=True)``) raise :class:`ContextParallelError` with what to use instead.

Not sparse (run dense through the model's own backend, said once in a warning and in the run report): ring
attention and ring × Ulysses (the ring's per-chunk forward op is not told which key chunk it holds and must return
an exact LSE), families without a known context-parallel token layout, and text padding masks under context
parallelism.

Order of calls: ``dit_sparse.apply()`` **after** ``enable_parallelism()``. The root hook must see the full
transformer inputs to read the latent grid; FLUX's ``_cp_plan`` splits the transformer's own inputs with a hook on
the transformer itself, and diffusers runs the hook registered last first. The other order raises a clear error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .patterns import MaskLayout

if TYPE_CHECKING:  # pragma: no cover
    from .integration import TransformerBinding

# How each family's diffusers ``_cp_plan`` shards the self-attention sequence:
#   "whole":    the whole sequence is one contiguous split (video-only self-attention)
#   "segments": text and video are split separately; each rank's local sequence is [text_r, video_r] (or
#               [video_r, text_r] for text-last models), as FLUX's and Qwen-Image's plans do
# A family may also declare ``cp_sharding`` itself (a class attribute with one of these values), which wins.
CP_SHARDING: dict[str, str] = {"wan": "whole", "ltx": "whole", "flux": "segments", "qwen_image": "segments"}
# Reorder heads across Ulysses ranks only when it lowers the busiest rank's block count by at least this fraction
# (the reorder costs one gather of q/k/v and one of the output per layer; exact either way).
HEAD_BALANCE_MIN_GAIN = 0.05
_BALANCE_CACHE: dict[Any, list[int] | None] = {}


class ContextParallelError(RuntimeError):
    """dit-sparse cannot run under this context-parallel setup (and running dense would hide a bug)."""


# ---------------------------------------------------------------------------------------------------- layout
def split_sizes(n: int, world: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(n), world)`` (= ``chunk`` when ``world`` divides ``n``)."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def segment_lengths(layout: MaskLayout, sharding: str) -> list[int]:
    """Lengths of the independently sharded segments of the self-attention sequence, in local (= canonical) order."""
    if sharding == "whole" or layout.num_text == 0:
        return [layout.seq_len]
    if sharding == "segments":
        segs = (
            [layout.num_text, layout.num_video] if layout.text_first else [layout.num_video, layout.num_text]
        )
        return [s for s in segs if s]
    raise ValueError(f"unknown context-parallel sharding {sharding!r}; expected 'whole' or 'segments'")


def gathered_order(segments: Sequence[int], world: int) -> torch.Tensor:
    """``(S,)`` int64: canonical index of the token at each position of the post-all-to-all sequence.

    Canonical order = the segments concatenated; each segment is split over ``world`` ranks (tensor_split sizes),
    rank ``r``'s local sequence is its shard of every segment in order, and the all-to-all concatenates ranks.
    """
    starts = [0]
    for n in segments:
        starts.append(starts[-1] + n)
    pieces = []
    sizes = [split_sizes(n, world) for n in segments]
    for r in range(world):
        for s, n_sizes in enumerate(sizes):
            lo = starts[s] + sum(n_sizes[:r])
            pieces.append(torch.arange(lo, lo + n_sizes[r]))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def local_length(segments: Sequence[int], world: int, rank: int) -> int:
    """Tokens rank ``rank`` holds before the all-to-all."""
    return sum(split_sizes(n, world)[rank] for n in segments)


def head_slice(num_heads: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of the global heads Ulysses rank ``rank`` holds (heads padded to a multiple of ``world``)."""
    per = -(-num_heads // world)
    start = min(rank * per, num_heads)
    return start, min(start + per, num_heads)


def balance_heads(costs: Sequence[float], world: int) -> list[int] | None:
    """A head order that evens out the per-rank cost, or ``None`` when the contiguous split is within
    ``HEAD_BALANCE_MIN_GAIN`` of it (or the heads do not divide evenly).

    Ulysses gives rank ``r`` the heads at positions ``[r·H/W, (r+1)·H/W)`` of the order; the returned list holds the
    global head at each position. Greedy LPT with equal cardinality: heads by decreasing cost (ties: lower index
    first) each go to the least-loaded rank that still has a free slot (ties: lower rank). Deterministic, so every
    rank computes the same order from the same profile (the xDiT head-balance idea, from static costs).
    """
    heads = len(costs)
    if world < 2 or heads % world:
        return None
    per = heads // world
    contiguous = max(sum(costs[r * per : (r + 1) * per]) for r in range(world))
    slots: list[list[int]] = [[] for _ in range(world)]
    load = [0.0] * world
    for h in sorted(range(heads), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(world) if len(slots[r]) < per), key=lambda r: (load[r], r))
        slots[r].append(h)
        load[r] += costs[h]
    if max(load) > contiguous * (1.0 - HEAD_BALANCE_MIN_GAIN):
        return None
    return [h for r in range(world) for h in sorted(slots[r])]


def head_order(binding: TransformerBinding, layer: int, mlayout: MaskLayout, world: int) -> list[int] | None:
    """Balanced head order for ``layer`` from its block counts per head (cached; one host sync per new layout)."""
    names = binding._layer_names[layer]
    key = (names, mlayout, world)
    if key not in _BALANCE_CACHE:
        plan = binding._static_plan(layer, mlayout, torch.device("cpu"))
        costs = plan.mask.sum(dim=(0, 2, 3)).tolist()  # computed blocks per head ~ kernel time per head
        if len(_BALANCE_CACHE) > 256:
            _BALANCE_CACHE.clear()
        # a dynamic head's blocks are chosen at run time: no balancing for its layer
        _BALANCE_CACHE[key] = None if plan.dynamic else balance_heads(costs, world)
    return _BALANCE_CACHE[key]


@functools.lru_cache(maxsize=64)
def _orders(segments: tuple[int, ...], world: int, device: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(post-a2a position -> canonical token, its inverse, whether both are the identity), cached on ``device``."""
    order = gathered_order(segments, world)
    identity = bool(torch.equal(order, torch.arange(order.numel())))
    return order.to(device), torch.argsort(order).to(device), identity


# ---------------------------------------------------------------------------------------------------- diffusers
def templated_cp_attention() -> Callable[..., Any]:
    """diffusers' private ``_templated_context_parallel_attention`` (checked to exist with the expected keywords)."""
    import inspect

    import diffusers
    from diffusers.models import attention_dispatch

    fn = getattr(attention_dispatch, "_templated_context_parallel_attention", None)
    params = set(inspect.signature(fn).parameters) if callable(fn) else set()
    if not {"forward_op", "backward_op", "_parallel_config"} <= params:
        raise ContextParallelError(
            "dit-sparse runs its kernel inside diffusers' private "
            "diffusers.models.attention_dispatch._templated_context_parallel_attention(..., forward_op=, "
            f"backward_op=, _parallel_config=), which diffusers {diffusers.__version__} does not provide; install "
            "the supported range: pip install 'diffusers>=0.42,<0.43'"
        )
    assert fn is not None
    return fn


def inherit_parallel_config(processor: Any, transformer: Any) -> None:
    """Give a processor with no ``_parallel_config`` the transformer's context-parallel config.

    ``enable_parallelism()`` writes the config onto the processors present at that moment (and onto the model);
    ``transformer.set_attn_processor(SparseProcessor(p))`` afterwards replaces them with a processor that has none,
    and every layer would then attend within its own sequence shard only: wrong, silently, on dense layers. For
    the one-liner's binding (the shared processor instance) to call; ``apply()`` copies the config per layer.
    """
    if getattr(processor, "_parallel_config", None) is None:
        config = getattr(transformer, "_parallel_config", None)
        if getattr(config, "context_parallel_config", None) is not None:
            processor._parallel_config = config


def _sharding_of(family: Any) -> str | None:
    return getattr(family, "cp_sharding", None) or CP_SHARDING.get(getattr(family, "name", ""))


def _backward(ctx: Any, grad_out: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError(
        "dit-sparse's context-parallel sparse attention is inference-only (no backward)"
    )


def _dense(binding: TransformerBinding, key: tuple[int, int], warn_key: str, why: str, dense_fn: Any) -> Any:
    binding.warn_once(warn_key, f"dit-sparse: {why}; attention runs dense (correct, not faster)")
    binding.runs[-1].dense[key] = f"{why}: dense"
    return dense_fn()


# ---------------------------------------------------------------------------------------------------- core
def context_parallel_core(
    binding: TransformerBinding,
    layer: int,
    proc: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense_fn: Callable[[], torch.Tensor],
    layout: str,
    scale: float | None,
    text_valid: torch.Tensor | None,
) -> torch.Tensor:
    """The sparse core of one layer whose processor carries a diffusers ``_parallel_config`` (q/k/v are the local
    sequence shard, all heads). Ulysses runs sparse; everything else runs ``dense_fn`` and says why."""
    key = (layer, binding.state.step)
    cp = getattr(proc._parallel_config, "context_parallel_config", None)
    if cp is None:
        return _dense(binding, key, "cp-none", "a parallel config without context parallelism", dense_fn)
    if cp.ring_degree > 1:
        kind = "ring attention" if cp.ulysses_degree == 1 else "ring × Ulysses attention"
        return _dense(
            binding,
            key,
            "cp-ring",
            f"context parallelism with {kind} (ring degree {cp.ring_degree})",
            dense_fn,
        )
    sharding = _sharding_of(binding.family)
    if sharding is None:
        why = f"no context-parallel token layout is known for the {binding.family.name} family"
        return _dense(binding, key, "cp-family", why, dense_fn)
    if text_valid is not None and not bool(text_valid.all()):
        return _dense(binding, key, "cp-text-pad", "padded text under context parallelism", dense_fn)

    bshd = layout == "bshd"
    qs, ks, vs = (
        (q, k, v) if bshd else (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    )  # (B, S_loc, H, D)
    inputs = binding.state.inputs
    mlayout = MaskLayout(inputs.grid, inputs.num_text, inputs.text_first, binding.profile.block_size)
    world, rank = int(cp.ulysses_degree), int(cp._ulysses_local_rank)
    segments = segment_lengths(mlayout, sharding)
    expect_local = local_length(segments, world, rank)
    if qs.shape[1] != expect_local or ks.shape[1] != expect_local:
        raise ContextParallelError(
            f"dit-sparse layer {layer}: Ulysses rank {rank}/{world} holds {qs.shape[1]} query and {ks.shape[1]} key "
            f"tokens, but the latent grid {inputs.grid} with {inputs.num_text} text tokens gives {expect_local} per "
            "rank. Call dit_sparse.apply() AFTER transformer.enable_parallelism(): the root hook must see the "
            "unsplit transformer inputs. If that is already the order, the model's cp_plan shards the sequence in "
            f"a way the {binding.family.name} adapter does not know (please report it)."
        )
    if qs.shape[2] != binding.profile.fingerprint.num_heads:
        raise ContextParallelError(
            f"dit-sparse layer {layer}: attention sees {qs.shape[2]} heads before the all-to-all, the profile has "
            f"{binding.profile.fingerprint.num_heads} (tensor parallelism is not supported)"
        )
    order = None if cp.ulysses_anything else head_order(binding, layer, mlayout, world)
    if (
        order is not None
    ):  # balanced heads: rank r gets order[r·H/W : (r+1)·H/W] instead of a contiguous slice
        idx = torch.tensor(order, device=qs.device)
        qs, ks, vs = (x.index_select(2, idx) for x in (qs, ks, vs))  # (B, S_loc, H, D), heads in `order`
    op = UlyssesSparseOp(binding, layer, mlayout, segments, world, rank, order)
    out = templated_cp_attention()(
        qs,
        ks,
        vs,
        None,  # attn_mask
        0.0,  # dropout_p
        False,  # is_causal
        scale,
        False,  # enable_gqa
        False,  # return_lse
        forward_op=op,
        backward_op=_backward,
        _parallel_config=proc._parallel_config,
    )  # (B, S_loc, H, D)
    if order is not None:
        out = out.index_select(2, torch.argsort(idx))  # back to global head order
    binding.runs[-1].record_density(key, op.density)
    return out if bshd else out.transpose(1, 2)


class UlyssesSparseOp:
    """``forward_op`` for ``_templated_context_parallel_attention``: (B, S_full, H_local, D) in post-all-to-all token
    order and this rank's global heads -> sparse attention output in the same layout."""

    def __init__(
        self,
        binding: TransformerBinding,
        layer: int,
        mlayout: MaskLayout,
        segments: Sequence[int],
        world: int,
        rank: int,
        head_order: Sequence[int] | None = None,
    ) -> None:
        self.binding, self.layer, self.mlayout = binding, layer, mlayout
        self.segments, self.world, self.rank = list(segments), world, rank
        self.head_order = None if head_order is None else list(head_order)  # global head at each position
        self.density: float | torch.Tensor = 1.0

    def __call__(
        self,
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ) -> torch.Tensor:
        if return_lse or attn_mask is not None or dropout_p or is_causal:
            raise ContextParallelError(
                "dit-sparse's Ulysses forward op got return_lse/attn_mask/dropout/is_causal; it only runs "
                "inference self-attention without a mask (this is a dit-sparse bug, please report it)"
            )
        n = query.shape[1]
        if n != self.mlayout.seq_len:
            raise ContextParallelError(
                f"dit-sparse layer {self.layer}: after the Ulysses all-to-all attention sees {n} tokens, the layout "
                f"has {self.mlayout.seq_len}"
            )
        heads = self.binding.profile.fingerprint.num_heads
        h0, h1 = head_slice(heads, self.world, self.rank)
        if query.shape[2] != h1 - h0:
            raise ContextParallelError(
                f"dit-sparse layer {self.layer}: Ulysses rank {self.rank}/{self.world} holds {query.shape[2]} heads, "
                f"expected global heads [{h0}, {h1}) of {heads}"
            )
        order, to_canon, identity = _orders(tuple(self.segments), self.world, str(query.device))
        qh, kh, vh = (
            (x if identity else x.index_select(1, to_canon)).transpose(1, 2) for x in (query, key, value)
        )  # (B, H_local, S, D), canonical order
        from .integration import _retention_heads

        plan = self.binding._static_plan(self.layer, self.mlayout, query.device)
        if plan.reuse or _retention_heads(plan):
            raise ContextParallelError(
                f"dit-sparse layer {self.layer}: skip(mode='reuse') and lse_topk(retention=True) heads keep "
                "per-head state across steps that context parallelism does not carry yet; use skip(mode='zero') "
                "or retention=False for this model under context parallelism"
            )
        # this rank's global heads: a contiguous slice, or the balanced order's slice
        heads_here = list(range(h0, h1)) if self.head_order is None else self.head_order[h0:h1]
        # static masks sliced to these heads; dynamic heads built from this rank's q/k (exactly what one process
        # builds for them: every head's mask depends only on its own q/k)
        mask, self.density = self.binding._step_mask(self.layer, plan, self.mlayout, qh, kh, heads=heads_here)
        perm = None if plan.perm is None else plan.perm[:, heads_here]  # per-head token orders (PARO, draft)
        out = self.binding._kernel(qh, kh, vh, mask, scale, perm).transpose(1, 2)  # (B, S, H_local, D)
        return out if identity else out.index_select(1, order)
