"""Dynamic patterns: masks computed from the layer's own q/k at generation time (DraftAttention).

``draft`` average-pools Q and K per mask block, computes a low-resolution attention map per head (softmax over the
pooled keys) and keeps, per query block, the top key blocks by a ``budget`` (fraction of blocks) or by a
cumulative probability ``mass``; the diagonal block is always kept (text rows/columns are forced dense by the
processor). With ``patch`` (default ``"auto"``: 8×16 latent tokens for 128-token blocks) the video tokens are
first reordered so each latent patch of ``ph × pw`` tokens of one frame is contiguous: one patch = one block when
the grid divides (partial patches at the edges just make some blocks straddle two patches). Everything runs on the
tensors' device, batched over heads, with no host synchronisation.

Masks are computed per call or, with ``refresh`` (default: the profile's ``schedule.refresh_interval``), at refresh
steps and reused in between (step caching, AdaSpa/SparseD); the processor keeps that cache and resets it per run.

``lse_topk`` (AdaSpa/SparseD-style) ranks blocks by the *exact* attention mass instead: at a refresh step it runs
the softmax of the current q/k with the true log-sum-exp of every query row (in chunks of query rows, never an
``N × N`` matrix), pools the probabilities per block and keeps the top blocks per row; no reordering. With
``retention=True`` the processor also applies the Re-ttention correction (:func:`retention_stats`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import PatternSpec, register
from .layout import MaskLayout

# ph × pw latent tokens per patch for each block size (DraftAttention's 8×16 at 128)
_AUTO_PATCH = {16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16)}


def patch_permutation(
    layout: MaskLayout, ph: int, pw: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 ``[seq_len]``: per frame, ``ph × pw`` latent patches in raster order, tokens raster inside a patch;
    text in place. Any grid: edge patches are smaller."""
    _, h, w = layout.grid
    coords = layout.token_coords(device)  # (N, 3); text rows are -1
    off = layout.video_offset
    video = coords[off : off + layout.num_video]  # (Nv, 3) in raster order
    fi, hi, wi = video.unbind(1)
    n_pw = -(-w // pw)
    n_ph = -(-h // ph)
    # lexicographic key (frame, patch row, patch col, row in patch, col in patch); all fit in int64
    key = (((fi * n_ph + hi // ph) * n_pw + wi // pw) * ph + hi % ph) * pw + wi % pw
    order = torch.argsort(key)  # permuted position -> raster index (keys are unique)
    perm = torch.arange(layout.seq_len, device=device)
    perm[off : off + layout.num_video] = order + off
    return perm


def resolve_patch(patch: Any, block_size: int) -> tuple[int, int] | None:
    if patch == "none":
        return None
    if patch == "auto":
        return _AUTO_PATCH[block_size]
    return int(patch[0]), int(patch[1])


def pool_blocks(x: torch.Tensor, block_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, N, D)`` -> float32 ``(B, H, nB, D)``: mean over the tokens of each block (the last may be short),
    in the order ``perm [N]`` gives (permuted position ``i`` holds token ``perm[i]``) when given. ``x`` is read in
    place: no permuted or float32 copy of it (:func:`dit_sparse.kernels.pooling.block_mean`)."""
    from ..kernels.pooling import block_mean

    return block_mean(x, block_size, perm)


def pooled_attention_map(
    q: torch.Tensor, k: torch.Tensor, block_size: int, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 ``(B, H, nB, nB)``: softmax over pooled keys of pooled-query · pooled-key / sqrt(D), blocks in
    ``perm`` order when given."""
    qp, kp = pool_blocks(q, block_size, perm), pool_blocks(k, block_size, perm)
    scores = qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, nB, nB)
    return torch.softmax(scores, dim=-1)


def select_blocks(probs: torch.Tensor, budget: float, mass: float | None) -> torch.Tensor:
    """bool like ``probs``: per row the top ``ceil(budget·nB)`` blocks, or (``mass``) the fewest largest blocks
    whose probabilities sum to at least ``mass``; plus the diagonal."""
    nb = probs.shape[-1]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if mass is None:
        top = torch.topk(probs, max(1, min(nb, math.ceil(budget * nb))), dim=-1).indices
        keep.scatter_(-1, top, True)
    else:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly larger blocks
        keep.scatter_(-1, idx, before < mass)  # the first block always (before = 0 < mass)
    eye = torch.eye(nb, dtype=torch.bool, device=probs.device)
    return keep | eye


def _check_draft(p: dict[str, Any], name: str = "draft") -> None:
    b = p["budget"]
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
        raise ValueError(f"{name} parameter budget must be a fraction of blocks in (0, 1], got {b!r}")
    m = p["mass"]
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1):
        raise ValueError(f"{name} parameter mass must be None or a probability in (0, 1], got {m!r}")
    patch = p["patch"]
    ok = patch in ("auto", "none") or (
        isinstance(patch, (list, tuple))
        and len(patch) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in patch)
    )
    if not ok:
        raise ValueError(
            f"{name} parameter patch must be 'auto', 'none' or [ph, pw] (latent tokens), got {patch!r}"
        )
    r = p["refresh"]
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
        raise ValueError(
            f"{name} parameter refresh must be None (the profile's refresh_interval) or an integer >= 0, got {r!r}"
        )


def _draft_static(layout: MaskLayout, device: torch.device, **_: Any) -> torch.Tensor:
    """What draft always keeps, whatever q/k are: the diagonal (text is forced dense by the processor)."""
    return torch.eye(layout.num_blocks, dtype=torch.bool, device=device)


def _draft_perm(layout: MaskLayout, device: torch.device, patch: Any, **_: Any) -> torch.Tensor | None:
    ph_pw = resolve_patch(patch, layout.block_size)
    return None if ph_pw is None else patch_permutation(layout, *ph_pw, device=device)


def draft_mask(
    layout: MaskLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    perm: torch.Tensor | None,
    budget: float,
    mass: float | None,
    **_: Any,
) -> torch.Tensor:
    """bool ``(B, H, nB, nB)`` in permuted order (if ``perm``) from ``q, k (B, H, N, D)`` in original order."""
    # the pooling reads q/k through perm in place: no permuted copy
    probs = pooled_attention_map(q, k, layout.block_size, perm)
    return select_blocks(probs, float(budget), None if mass is None else float(mass))


register(
    PatternSpec(
        "draft",
        _draft_static,
        {"budget": 0.25, "mass": None, "patch": "auto", "refresh": None},
        _check_draft,
        doc="DraftAttention: pooled q/k per latent patch, keep the top blocks per row (budget or mass)",
        permutation=_draft_perm,
        dynamic=draft_mask,
    )
)


# ---------------------------------------------------------------------------------------------------- lse_topk
# Upper bound on float32 score elements one chunk of query rows materialises (B·H·rows·N): 16M = 64 MiB.
_LSE_CHUNK_SCORES = 16 * 1024 * 1024


def _row_chunk(bsz: int, heads: int, n: int, block_size: int) -> int:
    """Query rows per chunk: a multiple of ``block_size`` (chunks never split a query block), at least one block."""
    blocks = max(1, _LSE_CHUNK_SCORES // max(1, bsz * heads * n * block_size))
    return blocks * block_size


def exact_block_mass(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """float32 ``(B, H, nB, nB)``: exact softmax attention mass pooled per block.

    ``mass[b, h, I, J] = mean over query rows i in block I of sum over keys j in block J of softmax_j(s_ij)`` with
    ``s = scale · q · k`` and the true log-sum-exp of each row, so every row of the result sums to 1. Computed in
    chunks of whole query blocks: no ``N × N`` matrix is held (at most ``_LSE_CHUNK_SCORES`` scores at a time).
    """
    bsz, heads, n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    nb = -(-n // block_size)
    kf = k.float()
    out = torch.empty(bsz, heads, nb, nb, dtype=torch.float32, device=q.device)
    chunk = _row_chunk(bsz, heads, n, block_size)
    counts = torch.full((nb,), float(block_size), device=q.device)
    counts[-1] = n - (nb - 1) * block_size  # rows of the (maybe short) last query block
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = (q[:, :, start:stop].float() @ kf.transpose(-1, -2)) * scale  # (B, H, c, N)
        p = torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True))  # exact softmax rows (B, H, c, N)
        p = torch.nn.functional.pad(p, (0, nb * block_size - n))  # (B, H, c, nB*bs)
        per_key = p.view(bsz, heads, stop - start, nb, block_size).sum(-1)  # (B, H, c, nB)
        qb0, qb1 = start // block_size, -(-stop // block_size)
        rows = torch.nn.functional.pad(per_key, (0, 0, 0, (qb1 - qb0) * block_size - (stop - start)))
        sums = rows.view(bsz, heads, qb1 - qb0, block_size, nb).sum(3)  # (B, H, c/bs, nB)
        out[:, :, qb0:qb1] = sums / counts[qb0:qb1, None]
    return out


def lse_topk_mask(
    layout: MaskLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    perm: torch.Tensor | None,
    budget: float,
    mass: float | None,
    **_: Any,
) -> torch.Tensor:
    """bool ``(B, H, nB, nB)`` in raster order from ``q, k (B, H, N, D)``: per query block the top key blocks of
    the exact pooled attention mass (:func:`exact_block_mass`) by ``budget`` or cumulative ``mass``; diagonal kept."""
    if perm is not None:  # lse_topk has no permutation; another head's reordering is not ours to follow
        q = q.index_select(2, perm)  # (B, H, N, D) permuted
        k = k.index_select(2, perm)
    probs = exact_block_mass(q, k, layout.block_size)
    return select_blocks(probs, float(budget), None if mass is None else float(mass))


def _check_lse_topk(p: dict[str, Any]) -> None:
    _check_draft({**p, "patch": "none"}, "lse_topk")
    if not isinstance(p["retention"], bool):
        raise ValueError(f"lse_topk parameter retention must be True or False, got {p['retention']!r}")


register(
    PatternSpec(
        "lse_topk",
        _draft_static,
        {"budget": 0.25, "mass": None, "refresh": None, "retention": False},
        _check_lse_topk,
        doc="AdaSpa/SparseD-style: exact (true-LSE) block attention mass at refresh steps, top blocks per row "
        "(budget or mass), reused until the next refresh; retention=True adds the Re-ttention correction",
        dynamic=lse_topk_mask,
    )
)


def retention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_size: int,
    out_sparse: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ttention statistics at a refresh step: float32 ``r (B, H, N)`` and ``residual (B, H, N, D)``.

    Re-ttention (NeurIPS'25, ``cccrrrccc/Re-ttention``: "statistical reshape", /work/shared/notes/methods.md §10)
    caches at full-attention steps, per query row, the ratio of the in-mask softmax denominator to the full one and
    the residual of the full output; on sparse steps the sparse output's denominator is divided by the cached ratio
    and the residual is added. Implemented exactly as, per query row ``i`` with scores ``s = scale · q · k``::

        Z_in = sum_{j in mask(i)} exp(s_ij),   Z = sum_j exp(s_ij)            (from the true log-sum-exps)
        r_i = Z_in / Z,   residual_i = out_full_i - r_i · out_sparse_i
        corrected_i = r_i · out_sparse_i + residual_i                          (see :func:`apply_retention`)

    where ``out_sparse`` is the block-sparse kernel's in-mask normalised output for ``mask`` (bool
    ``(B|1, H, nB, nB)``, raster order) and ``out_full`` the dense output, both at this step, so the corrected
    output equals dense attention at the refresh step itself (``residual`` is then the out-of-mask part
    ``sum_{j not in mask(i)} exp(s_ij) v_j / Z``). The paper's per-step ratio drift heuristic is not applied.
    Chunked over query blocks like :func:`exact_block_mass`.
    """
    bsz, heads, n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    kf, vf = k.float(), v.float()
    mask = mask.expand(bsz, heads, -1, -1)  # (B, H, nB, nB)
    key_block = torch.arange(n, device=q.device) // block_size  # (N,) block of each key
    r = torch.empty(bsz, heads, n, dtype=torch.float32, device=q.device)
    residual = torch.empty(bsz, heads, n, dim, dtype=torch.float32, device=q.device)
    chunk = _row_chunk(bsz, heads, n, block_size)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = (q[:, :, start:stop].float() @ kf.transpose(-1, -2)) * scale  # (B, H, c, N)
        row_block = torch.arange(start, stop, device=q.device) // block_size  # (c,)
        allowed = mask[:, :, row_block][..., key_block]  # (B, H, c, N) token mask of these rows
        lse = torch.logsumexp(s, dim=-1)  # (B, H, c)
        lse_in = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)  # -inf for an empty row
        ratio = torch.exp(lse_in - lse)  # (B, H, c); 0 where no key is allowed
        full = torch.exp(s - lse[..., None]) @ vf  # (B, H, c, D) dense output rows
        r[:, :, start:stop] = ratio
        residual[:, :, start:stop] = full - ratio[..., None] * out_sparse[:, :, start:stop].float()
    return r, residual


def apply_retention(out_sparse: torch.Tensor, r: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Re-ttention correction ``r · out_sparse + residual`` (``out (B, H, N, D)``, ``r (B, H, N)``), in out's dtype."""
    return (r[..., None] * out_sparse.float() + residual).to(out_sparse.dtype)
