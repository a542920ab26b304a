"""Triton block-sparse flash-attention forward (DESIGN §4).

Design origin: the FlashAttention-2 forward of the Triton fused-attention tutorial (online softmax in exp2 with
``scale·log2e`` folded into one multiply, fp32 accumulators, grid ``(cdiv(Nq, BLOCK_M), B*H)`` with the q tile
fastest so one head's K/V stay hot in L2), with FlexAttention's block-sparse iteration: each program walks a sorted
list of *partial* kv blocks (element mask applied) and then a sorted list of *full* kv blocks (no masking at all),
read from the index of :func:`dit_sparse.kernels.indices.build_block_index`. No dense bitmask loop, no branches
around loads, no host synchronisation on the launch path (CUDA-graph and ``torch.compile`` friendly).

Constraints:

* Index granularity is fixed from the mask's block size *before* autotuning picks tiles:
  ``G_q = max(block_size, 128)`` query tokens and ``G_k = max(block_size, 64)`` key tokens per index row /
  column. Every autotune config's tiles divide it (``BLOCK_M | G_q``, ``BLOCK_N | G_k``), so tile sizes are
  independent of the mask's block size. A q tile smaller than ``G_q`` reads index row ``m·BLOCK_M // G_q``; a kv
  tile smaller than ``G_k`` loops over the ``G_k // BLOCK_N`` sub-tiles of each index block (FlexAttention's
  ``SPARSE_KV_MULTIPLE``), flattened into one loop so the pipeliner sees a single trip count.
* When the granularity is coarser than the mask's block size (block_size 16/32/64), partial blocks build their
  element mask from the fine bool mask at ``[row // bs, col // bs]``. Keys ``>= Nk`` are always masked on partial
  blocks; full blocks never hold an out-of-range key. A row with no allowed key writes exactly 0 (never NaN).
* Broadcast masks (``B`` or ``H`` of 1, or an expanded view with zero strides) are read with stride 0; the index
  is built once, never copied per head.
* q/k/v may be any strided view (e.g. ``[B, N, H, D]`` transposed): strides are passed, no ``.contiguous()``.
* head_dim: ``BLOCK_D`` = next power of two ≥ D (min 16), up to 256. D = 64 and 128 are the fast paths; other
  sizes (72, 80, 96, ...) load with a mask on the d dimension (zero padding in registers, no host-side copies).
* Token permutation (``HAS_PERM`` constexpr; the no-permutation path compiles exactly as before): positions in
  the mask are permuted positions; Q rows are gathered and O rows scattered through ``PERM`` once per program,
  K/V rows are gathered per tile (pointer-based ``tl.load``, the "gathered index vector" path of the kernel notes
  §6). ``PERM`` is ``[B|1, H|1, N]`` int32/int64, broadcast with stride 0.
* fp16 / bf16 on CUDA; fp32 only under the interpreter. On CUDA the configs are autotuned per
  ``(HEAD_DIM, dtype, granularity, Nk bucket)``; under ``TRITON_INTERPRET=1`` one fixed small config runs.

Status: tested under TRITON_INTERPRET=1 on CPU (fp16 / bf16 / fp32, against the fp64 reference); GPU performance
not yet measured on this machine (it has no GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .api import triton_interpreting
from .indices import (
    _BLOCK_M_MAX,
    BlockSparseIndex,
    build_block_index,
    index_granularity,
    squeeze_broadcast,
)

# _BLOCK_M_MAX (indices): the largest q tile in the config list; the q granularity is a multiple of it.
_MAX_HEAD_DIM = 256
# Fixed config under TRITON_INTERPRET=1: small enough to be quick, smaller than both granularities on purpose so
# the interpreter tests exercise the q-row mapping and the kv sub-tile loop the GPU configs use.
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32}


def _configs() -> list[triton.Config]:
    def cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)

    return [
        # d64: FlexAttention's H100 default is (128, 128, 3 stages, 4 warps)
        cfg(128, 128, 4, 3),
        cfg(128, 64, 4, 3),
        cfg(128, 64, 4, 4),
        # d128: (128, 64, 3, 8) bf16 / (128, 128, 3, 8) fp16 in Flex; the tutorial's test config is (128, 64, 2, 4)
        cfg(128, 64, 8, 3),
        cfg(128, 128, 8, 3),
        cfg(128, 64, 4, 2),
        cfg(128, 128, 8, 2),
        # head dims above 128 (register / shared-memory budget)
        cfg(64, 64, 4, 2),
        cfg(64, 64, 4, 3),
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep configs whose tiles divide the index granularity; small q tiles only for large head dims."""
    args = {**named_args, **kwargs}
    gq, gk, block_d = args["G_Q"], args["G_K"], args["BLOCK_D"]
    legal = [c for c in configs if gq % c.kwargs["BLOCK_M"] == 0 and gk % c.kwargs["BLOCK_N"] == 0]
    if block_d <= 128:
        preferred = [c for c in legal if c.kwargs["BLOCK_M"] == _BLOCK_M_MAX]
    else:
        preferred = [c for c in legal if c.kwargs["BLOCK_M"] < _BLOCK_M_MAX]
    return preferred or legal


@triton.jit
def _round_to_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32.

    Only used under the interpreter, whose fp32 -> bf16 cast truncates; the GPU cast already rounds to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    K_bh,
    V_bh,
    Fine_bh,
    Perm_bh,
    start_n,
    offs_m,
    offs_d,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_fm,
    stride_fn,
    stride_pn,
    N_Q,
    N_K,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    MASKED: tl.constexpr,
    NEED_FINE: tl.constexpr,
    DOT_F32: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_PERM: tl.constexpr,
):
    """One BLOCK_N-key step of the online softmax; ``MASKED`` applies the key bound and the fine element mask.

    ``offs_n`` are key positions in mask (permuted) order; with ``HAS_PERM`` the K/V rows are gathered through
    ``Perm_bh`` (original row of each permuted position), otherwise they are the positions themselves.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if HAS_PERM:
        if MASKED:
            rows_n = tl.load(Perm_bh + offs_n * stride_pn, mask=offs_n < N_K, other=0).to(tl.int64)
        else:
            rows_n = tl.load(Perm_bh + offs_n * stride_pn).to(tl.int64)
    else:
        rows_n = offs_n
    k_ptrs = K_bh + rows_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # (BLOCK_N, BLOCK_D)
    v_ptrs = V_bh + rows_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        kv_ok = offs_n[:, None] < N_K
        if BLOCK_D != HEAD_DIM:
            kv_ok = kv_ok & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(k_ptrs)
    if DOT_F32:
        k = k.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) fp32
    qk = qk * qk_scale  # scale·log2e: scores in log2 units
    if MASKED:
        allowed = offs_n[None, :] < N_K
        if NEED_FINE:
            f_ptrs = Fine_bh + (offs_m // BS)[:, None] * stride_fm + (offs_n // BS)[None, :] * stride_fn
            fine = tl.load(f_ptrs, mask=(offs_m[:, None] < N_Q) & allowed, other=0)
            allowed = allowed & (fine != 0)
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with nothing allowed so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        v = tl.load(v_ptrs)
    # P·V runs in the input dtype, like every flash kernel (P rounded once)
    if DOT_F32:
        p = _round_to_bf16(p)
        v = v.to(tl.float32)
    else:
        p = p.to(v.dtype)
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc)
    return acc, l_i, m_new


@triton.jit
def _block_sparse_fwd(
    Q,
    K,
    V,
    Out,
    KV_NUM,
    KV_IDX,
    FULL_NUM,
    FULL_IDX,
    FINE,
    PERM,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_nb,
    stride_nh,
    stride_nm,
    stride_ib,
    stride_ih,
    stride_im,
    stride_in,
    stride_fnb,
    stride_fnh,
    stride_fnm,
    stride_fib,
    stride_fih,
    stride_fim,
    stride_fin,
    stride_fb,
    stride_fh,
    stride_fm,
    stride_fn,
    stride_pb,
    stride_ph,
    stride_pn,
    H,
    N_Q,
    N_K,
    qk_scale,
    NK_BUCKET,  # only an autotune key: bucket of N_K
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BS: tl.constexpr,
    G_Q: tl.constexpr,
    G_K: tl.constexpr,
    NEED_FINE: tl.constexpr,
    DOT_F32: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(G_Q % BLOCK_M == 0)
    tl.static_assert(G_K % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row = (pid_m * BLOCK_M) // G_Q  # index row of this q tile

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Perm_bh = PERM + b * stride_pb + h * stride_ph
    if HAS_PERM:
        # gather Q rows (and later scatter O rows) through the permutation: one load per program
        rows_m = tl.load(Perm_bh + offs_m * stride_pn, mask=offs_m < N_Q, other=0).to(tl.int64)
    else:
        rows_m = offs_m
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_ok = offs_m[:, None] < N_Q
    if BLOCK_D != HEAD_DIM:
        q_ok = q_ok & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=q_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_F32:
        q = q.to(tl.float32)

    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    Fine_bh = FINE + b * stride_fb + h * stride_fh

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # partial blocks: key bound + fine element mask; G_K // BLOCK_N sub-tiles per index block
    num = tl.load(KV_NUM + b * stride_nb + h * stride_nh + row * stride_nm)
    idx_row = KV_IDX + b * stride_ib + h * stride_ih + row * stride_im
    for it in range(0, num * (G_K // BLOCK_N)):
        kb = tl.load(idx_row + (it // (G_K // BLOCK_N)) * stride_in)
        start_n = kb * G_K + (it % (G_K // BLOCK_N)) * BLOCK_N
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, K_bh, V_bh, Fine_bh, Perm_bh, start_n, offs_m, offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_fm, stride_fn, stride_pn, N_Q, N_K, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, BS, True, NEED_FINE, DOT_F32, IEEE, HAS_PERM,
        )  # fmt: skip

    # full blocks: every key in range and allowed, no masking at all
    num = tl.load(FULL_NUM + b * stride_fnb + h * stride_fnh + row * stride_fnm)
    idx_row = FULL_IDX + b * stride_fib + h * stride_fih + row * stride_fim
    for it in range(0, num * (G_K // BLOCK_N)):
        kb = tl.load(idx_row + (it // (G_K // BLOCK_N)) * stride_fin)
        start_n = kb * G_K + (it % (G_K // BLOCK_N)) * BLOCK_N
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, K_bh, V_bh, Fine_bh, Perm_bh, start_n, offs_m, offs_d,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_fm, stride_fn, stride_pn, N_Q, N_K, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, BS, False, False, DOT_F32, IEEE, HAS_PERM,
        )  # fmt: skip

    # empty rows: acc == 0 and l == 0 -> write 0, not 0/0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DOT_F32:
        out = _round_to_bf16(out)
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_ok)


_block_sparse_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=[
        "HEAD_DIM",
        "G_Q",
        "G_K",
        "NK_BUCKET",
        "HAS_PERM",
    ],  # the autotuner appends the tensors' dtypes to the key
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_fwd)


def _strides(t: torch.Tensor) -> list[int]:
    """Element strides, 0 for size-1 dims (broadcast index / mask dims are read with stride 0)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim())]


def _nk_bucket(nk: int) -> int:
    return max(1024, triton.next_power_of_2(nk))


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    perm: torch.Tensor | None = None,
    index_lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Block-sparse attention with the Triton kernel; inputs already validated by ``sparse_attention``.

    ``q [B,H,Nq,D]``, ``k/v [B,H,Nk,D]`` (any strides), bool ``block_mask [B|1, H|1, ceil(Nq/bs), ceil(Nk/bs)]``
    on q's device, optional ``perm [B|1, H|1, N]`` (mask in permuted order; Q/K/V rows gathered and O rows
    scattered inside the kernel). ``index_lists``: ``(kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices)`` of ``block_mask`` at :func:`index_granularity`, built beforehand
    (:func:`dit_sparse.kernels.prepare_block_mask`); otherwise built here. Returns ``[B,H,Nq,D]`` in q's dtype
    (contiguous).
    """
    bsz, heads, nq, dim = q.shape
    nk = k.shape[2]
    if dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {dim} is not supported by the Triton kernel (at most {_MAX_HEAD_DIM})")
    out = torch.empty((bsz, heads, nq, dim), dtype=q.dtype, device=q.device)  # (B, H, Nq, D)
    if nq == 0 or nk == 0:
        return out.zero_()

    mask = squeeze_broadcast(block_mask)
    gq, gk = index_granularity(block_size)
    if index_lists is None:
        index = build_block_index(mask, block_size, nq, nk, q_granularity=gq, kv_granularity=gk)
    else:
        index = BlockSparseIndex(*index_lists, mask, block_size, gq, gk, nq, nk)
    fine = index.fine_mask.view(torch.uint8)  # same bytes; a plain integer pointer for the kernel

    interpreting = triton_interpreting()
    meta = {
        "HEAD_DIM": dim,
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        "BS": block_size,
        "G_Q": gq,
        "G_K": gk,
        "NEED_FINE": gq > block_size or gk > block_size,
        # the interpreter's dot multiplies bf16 bit patterns as integers: compute its dots in fp32
        "DOT_F32": interpreting and q.dtype == torch.bfloat16,
        "IEEE": q.dtype == torch.float32,
        "HAS_PERM": perm is not None,
    }
    # without a permutation the kernel never reads PERM: pass any int tensor with zero strides
    perm_arg = perm if perm is not None else index.kv_num_blocks
    perm_strides = _strides(perm) if perm is not None else [0, 0, 0]
    args = (
        q, k, v, out,
        index.kv_num_blocks, index.kv_indices, index.full_kv_num_blocks, index.full_kv_indices, fine, perm_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        *_strides(index.kv_num_blocks), *_strides(index.kv_indices),
        *_strides(index.full_kv_num_blocks), *_strides(index.full_kv_indices),
        *_strides(fine), *perm_strides,
        heads, nq, nk, scale * math.log2(math.e), _nk_bucket(nk),
    )  # fmt: skip

    if interpreting:
        cfg = _INTERPRET_CONFIG
        fixed_grid = (triton.cdiv(nq, cfg["BLOCK_M"]), bsz * heads)
        _block_sparse_fwd[fixed_grid](*args, **meta, **cfg, num_warps=4)
        return out

    def grid(meta_: dict) -> tuple[int, int]:
        return (triton.cdiv(nq, meta_["BLOCK_M"]), bsz * heads)

    with torch.cuda.device(q.device):
        _block_sparse_fwd_tuned[grid](*args, **meta)
    return out
