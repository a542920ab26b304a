"""``sparse_attention``: the one operation dit-sparse runs on (DESIGN §3–§4).

Validation, the choice of implementation (``impl=``), and the ``torch.library.custom_op`` so ``torch.compile``
traces through it without a graph break. An explicitly requested implementation never falls back to another.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .cpu_gather import gather_block_sparse_attention
from .indices import (
    SUPPORTED_BLOCK_SIZES,
    BlockSparseIndex,
    build_block_index,
    cdiv,
    compact_index,
    index_granularity,
    squeeze_broadcast,
)
from .permutation import check_permutation, permute_tokens, unpermute_tokens, validate_perm

IMPLS = ("auto", "triton", "gather", "reference")
DEFAULT_BLOCK_SIZE = 128  # of a bool block mask given without block_size
_HALF = (torch.float16, torch.bfloat16)


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_flex_block_mask(obj: Any) -> bool:
    cls = type(obj)
    return cls.__name__ == "BlockMask" and cls.__module__.startswith("torch.nn.attention.flex_attention")


def _flex_to_bool(block_mask: Any, block_size: int | None, nq: int, nk: int) -> tuple[torch.Tensor, int]:
    """Turn a FlexAttention ``BlockMask`` into our bool block mask (union of its partial and full blocks).

    Partial blocks are only accepted when the mask_mod allows every in-range element inside them: this kernel
    computes whole blocks and has no element-level ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import noop_mask

    bq, bk = block_mask.BLOCK_SIZE
    if bq != bk or bq not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"BlockMask BLOCK_SIZE {block_mask.BLOCK_SIZE} is not supported: use a square block of "
            f"{SUPPORTED_BLOCK_SIZES}"
        )
    if block_size is not None and bq != block_size:
        raise ValueError(
            f"block_size={block_size} disagrees with the BlockMask's BLOCK_SIZE {bq}: omit block_size"
        )
    if tuple(block_mask.seq_lengths) != (nq, nk):
        raise ValueError(
            f"BlockMask was built for (Q_LEN, KV_LEN)={tuple(block_mask.seq_lengths)}, but q has {nq} and k {nk} tokens"
        )
    nqb, nkb = cdiv(nq, bq), cdiv(nk, bq)

    def dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        from .indices import indices_to_block_mask

        return indices_to_block_mask(num, idx, max(nkb, idx.shape[-1]))[..., :nqb, :nkb]

    partial = dense(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = (
        dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        if block_mask.full_kv_num_blocks is not None
        else torch.zeros_like(partial)
    )
    if block_mask.mask_mod is not noop_mask and bool(partial.any()):
        _check_partial_blocks_uniform(block_mask.mask_mod, partial, bq, nq, nk)
    return partial | full, bq


def _check_partial_blocks_uniform(mask_mod: Any, partial: torch.Tensor, bs: int, nq: int, nk: int) -> None:
    b, h, qb, kb = partial.nonzero(as_tuple=True)
    t = torch.arange(bs, device=partial.device)
    q_idx = (qb[:, None, None] * bs + t[None, :, None]).expand(-1, bs, bs)
    kv_idx = (kb[:, None, None] * bs + t[None, None, :]).expand(-1, bs, bs)
    in_range = (q_idx < nq) & (kv_idx < nk)
    try:
        allowed = mask_mod(b[:, None, None], h[:, None, None], q_idx, kv_idx)
    except Exception as exc:  # a mask_mod that cannot take broadcast tensors
        raise ValueError(
            "cannot check the BlockMask's mask_mod on its partial blocks; pass a bool block mask instead"
        ) from exc
    bad = (in_range & ~allowed.bool()).any(dim=(-1, -2))
    if bool(bad.any()):
        raise ValueError(
            f"BlockMask's mask_mod masks single elements inside {int(bad.sum())} partial block(s); sparse_attention "
            "computes whole blocks only. Use flex_attention for element-level masks, or a block-level mask_mod."
        )


def _validate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, block_size: int | None, impl: str
) -> tuple[torch.Tensor, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [B, H, N, D] (torch SDPA layout), got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim ([B, H, N, D] layout)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (*_HALF, torch.float32):
        raise TypeError(f"unsupported dtype {q.dtype}: use torch.float16 or torch.bfloat16 (float32 on CPU)")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise TypeError(
            "float32 is supported on CPU only; cast q, k, v to torch.bfloat16 or torch.float16 on CUDA"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")

    bsz, heads, nq, _ = q.shape
    nk = k.shape[2]
    if _is_flex_block_mask(block_mask):
        mask, block_size = _flex_to_bool(block_mask, block_size, nq, nk)
    elif isinstance(block_mask, BlockSparseIndex):
        mask, block_size = _check_prepared(block_mask, block_size, nq, nk, q.device)
    elif isinstance(block_mask, torch.Tensor):
        mask, block_size = block_mask, DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a torch.bool tensor, got {mask.dtype}")
    else:
        raise TypeError(
            "block_mask must be a bool tensor, a FlexAttention BlockMask or a prepare_block_mask() index, got "
            f"{type(block_mask).__name__}"
        )
    nqb, nkb = cdiv(nq, block_size), cdiv(nk, block_size)
    if mask.dim() != 4:
        raise ValueError(f"block_mask must be 4-D [B|1, H|1, nQ, nK], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, bsz) or mask.shape[1] not in (1, heads):
        raise ValueError(
            f"block_mask batch/heads {tuple(mask.shape[:2])} must be 1 or match q's ({bsz}, {heads})"
        )
    if mask.shape[2] != nqb or mask.shape[3] != nkb:
        raise ValueError(
            f"block_mask has {mask.shape[2]}×{mask.shape[3]} blocks; with block_size={block_size}, Nq={nq} and "
            f"Nk={nk} it must have ceil(Nq/bs)×ceil(Nk/bs) = {nqb}×{nkb}"
        )
    return mask.to(q.device), block_size


def _check_prepared(
    index: BlockSparseIndex, block_size: int | None, nq: int, nk: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """A :func:`prepare_block_mask` index: its fine mask and block size, after checking it fits these q/k."""
    if block_size is not None and block_size != index.block_size:
        raise ValueError(
            f"block_size={block_size} disagrees with the prepared index's block size {index.block_size}: omit "
            "block_size"
        )
    if (index.seq_len_q, index.seq_len_kv) != (nq, nk):
        raise ValueError(
            f"the prepared index was built for {index.seq_len_q} query and {index.seq_len_kv} key tokens, but q has "
            f"{nq} and k {nk}: prepare it again for this sequence length"
        )
    if (index.q_granularity, index.kv_granularity) != index_granularity(index.block_size):
        raise ValueError(
            f"the index has granularity ({index.q_granularity}, {index.kv_granularity}); the kernel needs "
            f"{index_granularity(index.block_size)}: build it with prepare_block_mask()"
        )
    if index.kv_num_blocks.device != device:
        raise ValueError(f"the prepared index is on {index.kv_num_blocks.device}, q on {device}")
    return index.fine_mask, index.block_size


def prepare_block_mask(
    block_mask: torch.Tensor,
    block_size: int,
    seq_len_q: int,
    seq_len_kv: int | None = None,
    *,
    compact: bool = True,
) -> BlockSparseIndex:
    """Turn a bool block mask into the Triton kernel's index once, to pass to :func:`sparse_attention` in its place
    on every call that uses the same mask (a layer's mask across steps): the call then skips the index build.

    ``block_mask`` is ``[B|1, H|1, ceil(Nq/bs), ceil(Nk/bs)]`` as :func:`sparse_attention` takes it; an expanded
    view (stride 0 over batch or heads) is indexed once. ``compact`` cuts the index lists to the longest row (one
    host sync here, none per call). The CPU paths read the mask kept inside the index.
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise TypeError("block_mask must be a torch.bool tensor [B|1, H|1, nQ, nK]")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    nk = seq_len_q if seq_len_kv is None else seq_len_kv
    want = (cdiv(seq_len_q, block_size), cdiv(nk, block_size))
    if block_mask.dim() != 4 or tuple(block_mask.shape[2:]) != want:
        raise ValueError(
            f"block_mask must be [B|1, H|1, {want[0]}, {want[1]}] for {seq_len_q}×{nk} tokens in blocks of "
            f"{block_size}, got shape {tuple(block_mask.shape)}"
        )
    mask = squeeze_broadcast(block_mask)  # an expanded view: index it once, not per batch row or head
    gq, gk = index_granularity(block_size)
    index = build_block_index(mask, block_size, seq_len_q, nk, q_granularity=gq, kv_granularity=gk)
    return compact_index(index) if compact else index


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``sparse_attention(..., impl=impl)`` runs for tensors on ``device``: ``"auto"`` is the
    Triton kernel on CUDA and the block-gather path elsewhere; ``ValueError`` for ``"triton"`` on the CPU without
    the interpreter."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "gather"
    if impl == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            "impl='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "dit_sparse, or use impl='gather' (the CPU path)"
        )
    return impl


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Any,
    block_size: int | None = None,
    scale: float | None = None,
    *,
    impl: str = "auto",
    perm: torch.Tensor | None = None,
    check_perm: bool = False,
) -> torch.Tensor:
    """Block-sparse attention.

    Args:
        q: ``[B, H, Nq, D]`` (torch SDPA layout), float16 / bfloat16 (float32 on CPU).
        k, v: ``[B, H, Nk, D]``; ``Nk`` may differ from ``Nq``.
        block_mask: bool ``[B|1, H|1, ceil(Nq/block_size), ceil(Nk/block_size)]`` (broadcast over batch and heads):
            query ``i`` may attend key ``j`` iff ``block_mask[b, h, i // block_size, j // block_size]``.
            A FlexAttention ``BlockMask`` is accepted too (its own ``BLOCK_SIZE`` is used), and so is an index
            from :func:`prepare_block_mask` (the Triton kernel then skips building it).
        block_size: 16, 32, 64 or 128 tokens per mask block (default: 128 for a bool mask, the block size of a
            ``BlockMask`` or prepared index, which an explicit value must match); N need not be a multiple of it.
        scale: softmax scale, default ``1/sqrt(D)``.
        impl: ``"auto"`` (Triton on CUDA, block-gather on CPU), ``"triton"`` (also on CPU under
            ``TRITON_INTERPRET=1``), ``"gather"`` or ``"reference"`` (fp64, slow). Never falls back silently.
        perm: optional token permutation, int32/int64 ``[B|1, H|1, N]`` (needs ``Nq == Nk == N``): permuted
            position ``i`` holds original token ``perm[b, h, i]``. ``block_mask`` is then in *permuted* order and
            the output is in *original* order. Triton gathers Q/K/V rows and scatters O rows inside the kernel;
            the CPU path uses one fused gather/scatter for all heads. Values are not checked on the hot path.
        check_perm: debug: also check that every ``perm[b, h]`` is a permutation (synchronises the host).

    Returns:
        ``[B, H, Nq, D]`` in q's dtype; a query row with no allowed key is all zeros (never NaN).
    """
    mask, block_size = _validate(q, k, v, block_mask, block_size, impl)
    lists: list[torch.Tensor | None] = [None] * 4
    if isinstance(block_mask, BlockSparseIndex):
        lists = [
            block_mask.kv_num_blocks,
            block_mask.kv_indices,
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
        ]
    if perm is not None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"perm needs as many queries as keys (self-attention), got Nq={q.shape[2]} and Nk={k.shape[2]}"
            )
        validate_perm(perm, q.shape[0], q.shape[1], q.shape[2], q.device)
        if check_perm:
            check_permutation(perm)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    if k.shape[2] == 0:
        return q.new_zeros(q.shape)
    resolved = resolve_impl(impl, q.device)
    return torch.ops.dit_sparse.block_sparse_attention(
        q, k, v, mask, block_size, scale, resolved, perm, *lists
    )


@torch.library.custom_op("dit_sparse::block_sparse_attention", mutates_args=())
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    impl: str,
    perm: torch.Tensor | None = None,
    kv_num_blocks: torch.Tensor | None = None,
    kv_indices: torch.Tensor | None = None,
    full_kv_num_blocks: torch.Tensor | None = None,
    full_kv_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    if impl == "triton":
        from .triton_attention import triton_sparse_attention

        prepared = None
        if kv_num_blocks is not None and kv_indices is not None:
            assert full_kv_num_blocks is not None and full_kv_indices is not None
            prepared = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)
        return triton_sparse_attention(q, k, v, block_mask, block_size, scale, perm, prepared)
    if impl == "gather":
        if perm is None:
            return gather_block_sparse_attention(q, k, v, block_mask, block_size, scale)
        # one fused gather for all heads in, one scatter out (no per-head loop)
        qp, kp, vp = permute_tokens(q, perm), permute_tokens(k, perm), permute_tokens(v, perm)  # (B, H, N, D)
        out_p = gather_block_sparse_attention(qp, kp, vp, block_mask, block_size, scale)
        return unpermute_tokens(out_p, perm).contiguous()
    if impl == "reference":
        from .reference import reference_attention

        return reference_attention(q, k, v, block_mask, block_size, scale, perm=perm).to(q.dtype)
    raise ValueError(f"unknown impl {impl!r}")


@_block_sparse_attention_op.register_fake
def _(  # type: ignore[no-untyped-def]
    q,
    k,
    v,
    block_mask,
    block_size,
    scale,
    impl,
    perm=None,
    kv_num_blocks=None,
    kv_indices=None,
    full_kv_num_blocks=None,
    full_kv_indices=None,
):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
