"""Candidate patterns, the kernel cost model and the per-head search.

Cost model (calibrated on the real kernel, ``impl`` as used at generation time, at the captured attention shape):

    sparse layer call:  t = overhead_s + per_block_s · Σ_heads computed_blocks(head) [+ permute_s]
    dense layer call:   t = dense_s   (the model's own SDPA; a layer whose heads are all dense runs it)

``permute_s`` is paid once per layer call when any head of the layer reorders its tokens (``reorder_window``,
PARO; ``draft``'s patch order): the kernel gathers q, k, v and scatters the output for all heads at once.
``draft_s`` (building draft-guidance masks: pooled q/k, a low-resolution attention map, top blocks per row) is paid
once per layer call when any head is a ``draft`` candidate; those are proposed with ``refresh=1`` (a fresh mask every
step, exactly what the statistics measured). ``lse_s`` (the exact block attention mass, a full attention pass) is
paid every ``STEP_CACHED_REFRESH`` steps when any head is a step-cached ``lse_topk`` candidate (amortised: ``lse_s /
STEP_CACHED_REFRESH`` per call); their errors are measured with the mask of the step before (the worst staleness). A draft head's computed blocks are its top ``ceil(budget·nB)`` blocks
per row plus its always-kept ones (diagonal, text): an upper bound, as the top blocks may include those.

``per_block_s`` and ``overhead_s`` come from timing ``sparse_attention`` at two densities (every block, and a
block-diagonal band of about a quarter of the blocks): the slope between the two is the cost of one (query block,
key block) pair over all heads divided by H, the intercept the per-call overhead (index building, launch). ``dense_s``
times ``scaled_dot_product_attention`` on the same shape; ``permute_s`` is the extra time of the same band call with
a token permutation. Partial blocks cost as much as full ones (the kernel
computes whole tiles).

Search, per layer and head: the cheapest candidate (fewest computed blocks; ties: lower error, then candidate
order) whose worst relative output error over the calibration samples and the sampled sparse steps fits the budget;
``dense`` always fits. A layer where some head picked a candidate with a per-layer cost (a reordering:
``permute_s``; draft guidance: ``draft_s``; a step-cached mask: ``lse_s``) is also priced with every combination of
those kinds forbidden to its heads, and the cheapest kept (ties: the first choice). Then per layer: if the predicted
sparse call is not cheaper than dense, the layer runs dense.
Then the dense warm-up: every ``w`` in ``{0} ∪ {s + 1 : s sampled}`` is tried (steps before ``w`` dense, errors of
steps ``>= w`` only), and the ``w`` with the lowest predicted total attention time wins (ties: smaller ``w``).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..patterns import MaskLayout, build_layer_mask, build_pattern_perm, is_dynamic, pattern_name
from ..patterns.reorder import AXIS_ORDERS

Candidate = tuple[str, dict[str, Any]]


# ------------------------------------------------------------------------------------------------ candidates
def candidate_grid(layout: MaskLayout) -> list[Candidate]:
    """Static patterns with small parameter grids scaled to the latent grid, the six axis reorderings (PARO
    ``reorder_window``: a band of neighbour blocks in F/H/W order), plus ``dense`` and ``skip``.

    Order matters only for ties (earlier wins) and de-duplication (the first of identical masks is kept)."""
    grid_f, grid_h, grid_w = layout.grid
    bs = layout.block_size
    frame = grid_h * grid_w
    cands: list[Candidate] = [("dense", {}), ("skip", {"mode": "zero"})]
    spans_f = sorted({0, 1, 2, max(0, grid_f // 4)} & set(range(grid_f)))
    for f in spans_f:
        for frac in (8, 4, 2):
            cands.append(("window", {"f": f, "h": max(1, grid_h // frac), "w": max(1, grid_w // frac)}))
    if grid_f > 1:
        for dense_frames in (0, 1):
            for band in sorted({bs, 2 * bs, 4 * bs, frame}):
                for sink in (0, 1):
                    cands.append(("radial", {"dense_frames": dense_frames, "band": band, "sink": sink}))
        tile = (min(2, grid_f), max(1, grid_h // 4), max(1, grid_w // 4))
        cands.append(
            ("tile_window", {"tf": tile[0], "th": tile[1], "tw": tile[2], "wf": 1, "wh": 1, "ww": 1})
        )
        for width in sorted({max(1, frame // 4), max(1, frame // 2)}):
            cands.append(("diagonal", {"width": width, "order": "frame"}))
    for width in sorted({bs, 4 * bs, 2 * frame}):
        cands.append(("diagonal", {"width": width, "order": "token"}))
    cands.append(("stripe", {"positions": [0], "width": frame, "order": "token"}))
    video_blocks = -(-layout.num_video // bs)
    for order in AXIS_ORDERS:
        for blocks in sorted({1, max(1, video_blocks // 16), max(1, video_blocks // 8)}):
            cands.append(("reorder_window", {"order": order, "blocks": blocks}))
    for budget in DRAFT_BUDGETS:  # dynamic: the mask is built from each step's q/k (refresh every step)
        cands.append(("draft", {"budget": budget, "refresh": 1}))
    for budget in STEP_CACHED_BUDGETS:  # exact block mass at a refresh step, reused at the next
        cands.append(("lse_topk", {"budget": budget, "refresh": STEP_CACHED_REFRESH}))
    return cands


DRAFT_BUDGETS = (0.1, 0.2, 0.35)  # fractions of the key blocks each query block keeps
STEP_CACHED_BUDGETS = (0.1, 0.2)
STEP_CACHED_REFRESH = 2  # lse_topk candidates rebuild their mask every other step


def is_step_cached(cand: Candidate) -> bool:
    """A candidate whose mask is built at a refresh step and reused at later steps (``lse_topk``, refresh > 1)."""
    return cand[0] == "lse_topk" and int(cand[1].get("refresh") or 0) > 1


def candidate_blocks(cands: list[Candidate], masks: torch.Tensor) -> torch.Tensor:
    """Computed (query block, key block) pairs per head of each candidate ``float64 (C,)``: a static mask's blocks;
    for a dynamic candidate its always-kept blocks (``masks``) plus ``ceil(budget·nB)`` per row (an upper bound)."""
    nb = masks.shape[-1]
    blocks = masks.flatten(1).sum(dim=1).double()
    for c, (name, params) in enumerate(cands):
        if is_dynamic(name):
            per_row = max(1, min(nb, math.ceil(float(params.get("budget", 1.0)) * nb)))
            blocks[c] = min(float(nb * nb), float(blocks[c]) + per_row * nb)
    return blocks


def candidate_dynamic(cands: list[Candidate]) -> list[Candidate | None]:
    """Each candidate's (pattern, params) if its mask is built at run time from q/k, else None."""
    return [cand if is_dynamic(cand[0]) else None for cand in cands]


def candidate_masks(cands: list[Candidate], layout: MaskLayout) -> tuple[list[Candidate], torch.Tensor]:
    """Masks ``bool (C, nB, nB)`` (text forced dense; a reordering candidate's mask is in its permuted order; a
    dynamic one's always-kept blocks) for the candidates; later duplicates (same mask and same token order, static
    candidates only) are dropped."""
    kept: list[Candidate] = []
    masks: list[torch.Tensor] = []
    seen: set[bytes] = set()
    for name, params in cands:
        m = build_layer_mask([(name, params)], layout, "cpu")[0, 0]  # (nB, nB)
        perm = _candidate_perm((name, params), layout)
        key = m.numpy().tobytes() + (b"" if perm is None else perm.numpy().tobytes())
        if is_dynamic(name):  # its mask is chosen at run time: its static part says nothing about it
            key += pattern_name(name, params).encode()
        if name != "dense" and key in seen:  # "dense" stays even if "full"-shaped (it runs SDPA)
            continue
        seen.add(key)
        kept.append((name, params))
        masks.append(m)
    return kept, torch.stack(masks)


def candidate_perms(cands: list[Candidate], layout: MaskLayout) -> list[torch.Tensor | None]:
    """Each candidate's token permutation ``int64 [N]`` (None: raster order; the identity counts as None)."""
    return [_candidate_perm(cand, layout) for cand in cands]


def _candidate_perm(cand: Candidate, layout: MaskLayout) -> torch.Tensor | None:
    perm = build_pattern_perm(cand[0], cand[1], layout, "cpu")
    if perm is None or torch.equal(perm, torch.arange(layout.seq_len)):
        return None  # the raster order ("FHW" too): the same attention as the mask alone
    return perm


# ------------------------------------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one layer's attention call (see the module docstring)."""

    overhead_s: float
    per_block_s: float  # one (query block, key block) pair of one head
    dense_s: float
    source: str = "given"
    permute_s: float = 0.0  # gather q/k/v + scatter o, once per layer call when any head reorders
    draft_s: float = 0.0  # building the draft-guidance masks of one layer call
    lse_s: float = (
        0.0  # the exact block attention mass of one layer call (step-cached masks, at refresh steps)
    )

    def sparse_call(
        self, blocks: float, reorders: bool = False, dynamic: bool = False, cached: bool = False
    ) -> float:
        extra = (self.permute_s if reorders else 0.0) + (self.draft_s if dynamic else 0.0)
        extra += self.lse_s / STEP_CACHED_REFRESH if cached else 0.0
        return self.overhead_s + self.per_block_s * blocks + extra

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(
            float(d["overhead_s"]),
            float(d["per_block_s"]),
            float(d["dense_s"]),
            str(d.get("source", "")),
            float(d.get("permute_s", 0.0)),
            float(d.get("draft_s", 0.0)),
            float(d.get("lse_s", 0.0)),
        )


def _median_time(fn: Any, reps: int, device: torch.device) -> float:
    fn()  # warm-up (Triton compile, allocator)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def calibrate_cost_model(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    impl: str = "auto",
    reps: int = 3,
    layout: MaskLayout | None = None,
) -> CostModel:
    """Time the real kernel at two densities (every block; a band of ~1/4 of the blocks), the band again with a
    token permutation, dense SDPA, and (given the call's ``layout``) building draft-guidance masks for all heads.

    Static masks are timed as the processor runs them, with the index prepared once (``prepare_block_mask``); a
    dynamic mask's index is built on every call, so that build (the band given as a bool mask) counts in
    ``draft_s``."""
    from ..kernels import prepare_block_mask, sparse_attention
    from ..patterns.dynamic import draft_mask, exact_block_mass

    bsz, heads, n, dim = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(bsz, heads, n, dim, generator=g).to(device, dtype) for _ in range(3))
    nb = -(-n // block_size)
    full = torch.ones(1, 1, nb, nb, dtype=torch.bool, device=device)
    idx = torch.arange(nb, device=device)
    radius = max(0, math.ceil(nb / 8) - 1)
    band = ((idx[:, None] - idx[None, :]).abs() <= radius)[None, None]  # ~1/4 of the blocks
    full_p, band_p = (prepare_block_mask(m, block_size, n) for m in (full, band))
    t_full = _median_time(lambda: sparse_attention(q, k, v, full_p, block_size, impl=impl), reps, device)
    t_band = _median_time(lambda: sparse_attention(q, k, v, band_p, block_size, impl=impl), reps, device)
    perm = torch.randperm(n, generator=g).to(device).view(1, 1, n)
    t_perm = _median_time(
        lambda: sparse_attention(q, k, v, band_p, block_size, impl=impl, perm=perm), reps, device
    )
    t_dense = _median_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), reps, device)
    t_draft = 0.0
    if layout is not None and layout.seq_len == n and layout.block_size == block_size:
        draft_perm = build_pattern_perm("draft", {"budget": 0.2}, layout, device)
        t_draft = _median_time(lambda: draft_mask(layout, q, k, draft_perm, 0.2, None), reps, device)
        t_unprepared = _median_time(
            lambda: sparse_attention(q, k, v, band, block_size, impl=impl), reps, device
        )
        t_draft += max(t_unprepared - t_band, 0.0)  # a dynamic mask's index is built on every call
    t_lse = _median_time(lambda: exact_block_mass(q, k, block_size), reps, device)
    b_full, b_band = heads * nb * nb, heads * int(band.sum())
    per_block = max((t_full - t_band) / max(1, b_full - b_band), 1e-12)  # slope per (head, block pair)
    overhead = max(t_full - per_block * b_full, 0.0)
    return CostModel(
        overhead,
        per_block,
        t_dense,
        source=f"timed {impl} on {device.type} {shape}",
        permute_s=max(t_perm - t_band, 0.0),
        draft_s=t_draft,
        lse_s=t_lse,
    )


# ------------------------------------------------------------------------------------------------ search
@dataclass
class SearchResult:
    choice: list[list[int]]  # (L, H) candidate index per head
    dense_steps: int
    dense_layers: list[int]
    worst_error: list[list[float]]  # (L, H) worst error of the chosen candidate over steps >= dense_steps
    predicted_seconds: float  # attention seconds for all steps (cost model)
    dense_seconds: float  # the same, all dense
    budget: float


def choose_heads(
    errors: torch.Tensor,
    blocks: torch.Tensor,
    budget: float,
    dense_index: int,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``errors (S, C, H)`` worst error per sampled step; ``blocks (C,)`` computed blocks per head. Returns the
    chosen candidate per head ``(H,)``: fewest blocks with ``max_s errors <= budget``; ties: lower error, index.
    ``allowed`` (bool ``(C,)``): only these candidates (and dense) may be chosen."""
    worst = errors.amax(dim=0) if errors.shape[0] else torch.zeros(errors.shape[1:], dtype=errors.dtype)
    num_c, num_h = worst.shape
    out = []
    for h in range(num_h):
        keys = [
            (float(blocks[c]), float(worst[c, h]), c)
            for c in range(num_c)
            if c == dense_index or (float(worst[c, h]) <= budget and (allowed is None or bool(allowed[c])))
        ]
        out.append(min(keys)[2])
    return torch.tensor(out, dtype=torch.long)


def search(
    errors: torch.Tensor,
    steps_sampled: list[int],
    num_steps: int,
    blocks: torch.Tensor,
    dense_index: int,
    cost: CostModel,
    budget: float,
    reorders: torch.Tensor | None = None,
    dynamic: torch.Tensor | None = None,
    cached: torch.Tensor | None = None,
) -> SearchResult:
    """``errors (L, S, C, H)``: worst relative error over calibration samples per (layer, sampled step,
    candidate, head); ``reorders`` / ``dynamic`` / ``cached`` (bool ``(C,)``): candidates that permute tokens /
    build their mask every step / build it at refresh steps. See the module docstring."""
    if budget < 0 or math.isnan(budget):
        raise ValueError(f"budget must be a relative error >= 0, got {budget}")
    num_layers = errors.shape[0]
    num_heads = errors.shape[3]
    options = [0] + [s + 1 for s in steps_sampled if s + 1 < num_steps]
    num_c = errors.shape[2]
    no = torch.zeros(num_c, dtype=torch.bool)
    reorders = no if reorders is None else reorders
    dynamic = no if dynamic is None else dynamic
    cached = no if cached is None else cached
    extras = reorders | dynamic | cached
    kinds = [k for k in (reorders, dynamic, cached) if bool(k.any())]
    forbids = [  # every non-empty combination of kinds, the single kinds first, all of them last
        functools.reduce(torch.logical_or, combo)
        for size in range(1, len(kinds) + 1)
        for combo in itertools.combinations(kinds, size)
    ]

    def layer_t(c: torch.Tensor) -> float:
        return cost.sparse_call(
            float(blocks[c].sum()),
            reorders=bool(reorders[c].any()),
            dynamic=bool(dynamic[c].any()),
            cached=bool(cached[c].any()),
        )

    best: SearchResult | None = None
    dense_all = num_steps * num_layers * cost.dense_s
    for w in sorted(set(options)):
        keep = [i for i, s in enumerate(steps_sampled) if s >= w]
        choice, worst, dense_layers = [], [], []
        per_step = 0.0
        for layer in range(num_layers):
            e = errors[layer, keep]  # (S', C, H)
            c = choose_heads(e, blocks, budget, dense_index)
            heads_worst = e.amax(dim=0) if len(keep) else torch.zeros(errors.shape[2:], dtype=errors.dtype)
            sparse_t = layer_t(c)
            # a per-layer cost (permutation, mask building) may cost more than the blocks it saves: the layer is
            # also priced with each combination of those kinds forbidden, and the cheapest kept
            for forbid in forbids if bool(extras[c].any()) else []:
                c_alt = choose_heads(e, blocks, budget, dense_index, allowed=~forbid)
                alt_t = layer_t(c_alt)
                if alt_t < sparse_t:
                    c, sparse_t = c_alt, alt_t
            if bool((c == dense_index).all()) or sparse_t >= cost.dense_s:
                c = torch.full((num_heads,), dense_index, dtype=torch.long)
                dense_layers.append(layer)
                per_step += cost.dense_s
            else:
                per_step += sparse_t
            choice.append(c.tolist())
            worst.append([float(heads_worst[c[h], h]) for h in range(num_heads)])
        total = w * num_layers * cost.dense_s + (num_steps - w) * per_step
        if best is None or total < best.predicted_seconds:
            best = SearchResult(choice, w, dense_layers, worst, total, dense_all, budget)
    assert best is not None
    return best


def search_density(
    errors: torch.Tensor,
    steps_sampled: list[int],
    num_steps: int,
    blocks: torch.Tensor,
    dense_index: int,
    cost: CostModel,
    target: float,
    total_blocks: int,
    reorders: torch.Tensor | None = None,
    dynamic: torch.Tensor | None = None,
    cached: torch.Tensor | None = None,
) -> SearchResult:
    """The smallest error budget whose profile has mean head density ``<= target`` (density of a head = its
    candidate's blocks / all blocks; dense layers count 1). If even the loosest budget misses the target, that
    profile is returned (the caller reports the miss)."""
    if not 0 < target <= 1:
        raise ValueError(f"target density must be in (0, 1], got {target}")
    budgets = sorted({0.0, *(float(x) for x in errors.flatten().tolist() if math.isfinite(x))})
    result: SearchResult | None = None

    def at(budget: float) -> SearchResult:
        flags = (reorders, dynamic, cached)
        return search(errors, steps_sampled, num_steps, blocks, dense_index, cost, budget, *flags)

    lo, hi = 0, len(budgets) - 1
    while lo <= hi:  # density is non-increasing in the budget: bisect
        mid = (lo + hi) // 2
        r = at(budgets[mid])
        if mean_density(r, blocks, total_blocks) <= target:
            result, hi = r, mid - 1
        else:
            lo = mid + 1
    if result is None:
        result = at(budgets[-1])
    return result


def mean_density(result: SearchResult, blocks: torch.Tensor, total_blocks: int) -> float:
    vals = [float(blocks[c]) / total_blocks for heads in result.choice for c in heads]
    return sum(vals) / len(vals)


def describe(cand: Candidate) -> str:
    return pattern_name(*cand)
