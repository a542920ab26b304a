"""The profiler behind ``dit-sparse profile``: calibrate a DiT, search each head's pattern, write a profile.

* :mod:`.stats` — per-head statistics of one attention call (block-pooled mass, candidate errors), no N×N memory;
* :mod:`.search` — candidate patterns, the kernel cost model, the per-head / warm-up / dense-layer search;
* :mod:`.run` — the calibration loop with checkpoint and resume, verification, provenance;
* :mod:`.inspect` — ``dit-sparse inspect``: tables and PNG pictures of a profile.
"""

from __future__ import annotations

from .run import ProfileConfig, ProfilerError, profile_pipeline, read_prompts
from .search import (
    CostModel,
    calibrate_cost_model,
    candidate_blocks,
    candidate_dynamic,
    candidate_grid,
    candidate_masks,
    candidate_perms,
    choose_heads,
    search,
)
from .stats import call_stats

__all__ = [
    "CostModel",
    "ProfileConfig",
    "ProfilerError",
    "calibrate_cost_model",
    "call_stats",
    "candidate_blocks",
    "candidate_dynamic",
    "candidate_grid",
    "candidate_masks",
    "candidate_perms",
    "choose_heads",
    "profile_pipeline",
    "read_prompts",
    "search",
]
