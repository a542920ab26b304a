"""sparse_attention against the fp64 reference: the Triton kernel (interpreter on CPU) and the CPU block-gather path.

Tolerance (DESIGN §4, no magic atol): the error of our output against fp64 is bounded by the error of the
same-dtype dense SDPA against fp64 on the same inputs, times a small multiple, plus one ulp of the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_sparse
from dit_sparse.kernels import reference_attention, triton_interpreting

IMPLS = ("triton", "gather")


def _needs_triton(impl: str) -> None:
    if impl == "triton" and not torch.cuda.is_available() and not triton_interpreting():
        pytest.skip("impl='triton' on CPU needs TRITON_INTERPRET=1 (set by conftest when CUDA is absent)")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(b: int, h: int, nq: int, nk: int, d: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, h, nk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, h, nk, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _random_mask(shape: tuple[int, ...], density: float, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < density).to(device)


def assert_close_to_reference(out, q, k, v, block_mask, block_size, scale=None) -> None:
    """err_ours <= 4 * err_sdpa + one ulp of the largest output.

    err_sdpa is dense same-dtype SDPA against the fp64 reference on the same q, k, v. The multiple 4 covers what a
    flash kernel does beyond SDPA on the CPU: it rounds P to the input dtype before P·V (CPU SDPA keeps P in fp32)
    and accumulates over tiles in a different order. The floor is one ulp (eps · max|ref|) of the largest output:
    storing the output in the dtype alone costs half an ulp, and a sparse row averages over fewer keys than a dense
    SDPA row, so its output (and that rounding error) is larger than anything err_sdpa sees.
    """
    ref = reference_attention(q, k, v, block_mask, block_size, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any(), "NaN in the output"
    err_ours = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
    err_sdpa = (sdpa.double() - reference_attention(q, k, v, None, scale=scale)).abs().max().item()
    floor = torch.finfo(q.dtype).eps * max(ref.abs().max().item(), 1e-30) if ref.numel() else 0.0
    assert err_ours <= 4 * err_sdpa + floor, f"err {err_ours:.3g} > 4 * sdpa err {err_sdpa:.3g} + {floor:.3g}"


def _assert_empty_rows_zero(out: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> None:
    """Query rows whose block row has no allowed block are exactly 0."""
    bsz, heads, nq, _ = out.shape
    rows = ~block_mask.expand(bsz, heads, -1, -1).any(dim=-1)  # (B, H, nQ)
    rows = rows.repeat_interleave(block_size, dim=-1)[..., :nq]  # (B, H, Nq)
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))


@dataclass(frozen=True)
class Case:
    name: str
    b: int = 1
    h: int = 2
    nq: int = 200
    nk: int = 200
    d: int = 64
    bs: int = 32
    density: float = 0.5
    dtype: torch.dtype = torch.float16
    mask_bh: tuple[int, int] | None = None  # mask's (B, H) dims; None = (b, h)
    scale: float | None = None


CASES = [
    Case("density0", density=0.0),
    Case("density0.1", density=0.1),
    Case("density0.5", density=0.5),
    Case("dense", density=1.0, bs=64),
    Case("single_block", nq=50, nk=50, bs=64),
    Case("single_block_bs128", nq=128, nk=128, bs=128, density=1.0),
    Case("ragged_bs128", nq=300, nk=260, bs=128, density=0.7),
    Case("ragged_bs16", nq=150, nk=150, bs=16, density=0.3),
    Case("nq_lt_nk", nq=70, nk=190, bs=32),
    Case("nq_gt_nk", nq=260, nk=90, bs=64),
    Case("batch2", b=2, nq=130, nk=130, bs=32),
    Case("bcast_11", b=2, nq=100, nk=140, bs=32, mask_bh=(1, 1)),
    Case("bcast_b1", b=2, nq=100, nk=100, bs=16, mask_bh=(2, 1)),
    Case("bcast_1h", b=2, nq=100, nk=100, bs=64, mask_bh=(1, 2)),
    Case("d128", d=128, nq=150, nk=150, bs=64),
    Case("d72", d=72, nq=150, nk=170, bs=32),
    Case("d96_bs128", d=96, nq=140, nk=140, bs=128, density=0.8),
    Case("bf16", dtype=torch.bfloat16, bs=16, nq=150, nk=150),
    Case("bf16_d128", dtype=torch.bfloat16, d=128, bs=128, nq=256, nk=200, density=0.6),
    Case("fp32", dtype=torch.float32, bs=32),
    Case("fp32_d72_bs64", dtype=torch.float32, d=72, bs=64, nq=129, nk=129),
    Case("custom_scale", scale=0.3, bs=64, nq=150, nk=150),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case: Case, impl: str) -> None:
    _needs_triton(impl)
    dev = _device()
    if dev == "cuda" and case.dtype == torch.float32:
        pytest.skip("float32 is CPU-only")
    q, k, v = _qkv(case.b, case.h, case.nq, case.nk, case.d, case.dtype, device=dev)
    mb, mh = case.mask_bh or (case.b, case.h)
    shape = (mb, mh, math.ceil(case.nq / case.bs), math.ceil(case.nk / case.bs))
    mask = _random_mask(shape, case.density, device=dev)
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=case.bs, scale=case.scale, impl=impl)
    assert_close_to_reference(out, q, k, v, mask, case.bs, case.scale)
    _assert_empty_rows_zero(out, mask, case.bs)
    if case.density == 0.0:
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bs", [16, 64])
def test_empty_rows_are_exact_zeros(impl: str, bs: int) -> None:
    """Whole block rows without an allowed key (and rows sharing a coarse index row with non-empty ones)."""
    _needs_triton(impl)
    dev = _device()
    nq = nk = 3 * bs + 5
    q, k, v = _qkv(1, 2, nq, nk, 64, torch.float16, seed=3, device=dev)
    mask = _random_mask((1, 2, 4, 4), 0.6, seed=4, device=dev)
    mask[:, 0, 1] = False  # head 0: block row 1 empty, row 0 / 2 share its coarse index row when bs < 128
    mask[:, 1, -1] = False  # head 1: the ragged last row empty
    mask[:, 1, 0] = False
    mask[:, 0, 0, 0] = True
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl=impl)
    _assert_empty_rows_zero(out, mask, bs)
    assert_close_to_reference(out, q, k, v, mask, bs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_bh", [(2, 2), (1, 1), (2, 1), (1, 2)])
def test_noncontiguous_qkv_and_expanded_mask(impl: str, mask_bh: tuple[int, int]) -> None:
    """q/k/v as transposed views of [B, N, H, D] (diffusers layout); the mask an expanded (stride-0) view."""
    _needs_triton(impl)
    dev = _device()
    b, h, n, d, bs = 2, 2, 100, 64, 32
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, b, n, h, d, generator=g).to(dev, torch.float16)  # (3, B, N, H, D)
    q, k, v = (t.transpose(1, 2) for t in qkv)  # (B, H, N, D) views
    assert not q.is_contiguous()
    small = _random_mask((*mask_bh, 4, 4), 0.5, seed=6, device=dev)
    mask = small.expand(b, h, 4, 4)
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl=impl)
    assert_close_to_reference(out, q, k, v, small, bs)
    # same numbers as with contiguous inputs and the small mask
    out_c = dit_sparse.sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), small, bs, impl=impl)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_all_block_sizes_gather(bs: int) -> None:
    q, k, v = _qkv(1, 2, 2 * bs + 7, 3 * bs - 5, 64, torch.float16, seed=bs)
    mask = _random_mask((1, 2, 3, 3), 0.5, seed=bs)
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl="gather")
    assert_close_to_reference(out, q, k, v, mask, bs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    nq=st.integers(1, 260),
    nk=st.integers(1, 260),
    d=st.sampled_from([16, 64, 72, 128]),
    bs=st.sampled_from([16, 32, 64, 128]),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_gather_property(b, h, nq, nk, d, bs, density, dtype, seed) -> None:
    q, k, v = _qkv(b, h, nq, nk, d, dtype, seed=seed)
    mask = _random_mask((b, h, math.ceil(nq / bs), math.ceil(nk / bs)), density, seed=seed + 1)
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl="gather")
    assert_close_to_reference(out, q, k, v, mask, bs)
    _assert_empty_rows_zero(out, mask, bs)


@pytest.mark.parametrize("budget", [1, 3 * 16 * 16, 10 * 16 * 16])
def test_gather_chunking(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Chunks of one row, of a few rows, and rows of many counts in one chunk (a score budget this small makes every
    chunk boundary happen on a small problem): padding slots, the ragged last kv block in some rows only, empty rows."""
    from dit_sparse.kernels import cpu_gather

    monkeypatch.setattr(cpu_gather, "_MAX_CHUNK_SCORES", budget)
    bs = 16
    q, k, v = _qkv(2, 3, 7 * bs + 5, 9 * bs + 3, 72, torch.float32, seed=budget)
    mask = _random_mask((2, 3, 8, 10), 0.45, seed=budget + 1)
    mask[0, 1, 2] = False  # an empty row
    mask[1, 2, :, -1] = True  # every row of one head holds the ragged last block
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl="gather")
    assert_close_to_reference(out, q, k, v, mask, bs)
    _assert_empty_rows_zero(out, mask, bs)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nq=st.integers(1, 200),
    nk=st.integers(1, 200),
    d=st.sampled_from([32, 64, 80]),
    bs=st.sampled_from([16, 32, 64, 128]),
    density=st.sampled_from([0.1, 0.5, 0.9]),
    mask_b=st.sampled_from([1, 2]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_triton_property(nq, nk, d, bs, density, mask_b, dtype, seed) -> None:
    _needs_triton("triton")
    if torch.cuda.is_available() and dtype == torch.float32:
        dtype = torch.float16
    dev = _device()
    q, k, v = _qkv(2, 1, nq, nk, d, dtype, seed=seed, device=dev)
    shape = (mask_b, 1, math.ceil(nq / bs), math.ceil(nk / bs))
    mask = _random_mask(shape, density, seed=seed + 1, device=dev)
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl="triton")
    assert_close_to_reference(out, q, k, v, mask, bs)
    _assert_empty_rows_zero(out, mask, bs)


@pytest.mark.parametrize("impl", ["gather", "triton", "reference"])
def test_empty_sequences(impl: str) -> None:
    _needs_triton(impl)
    q, k, v = _qkv(1, 1, 0, 10, 64, torch.float16)
    out = dit_sparse.sparse_attention(q, k, v, torch.ones(1, 1, 0, 1, dtype=torch.bool), 16, impl=impl)
    assert out.shape == (1, 1, 0, 64)
    q, k, v = _qkv(1, 1, 10, 0, 64, torch.float16)
    out = dit_sparse.sparse_attention(q, k, v, torch.ones(1, 1, 1, 0, dtype=torch.bool), 16, impl=impl)
    assert torch.equal(out, torch.zeros_like(q))


# ------------------------------------------------------------------------------------------------ bad input


def _ok_inputs():
    q, k, v = _qkv(1, 2, 40, 40, 64, torch.float16)
    return q, k, v, torch.ones(1, 2, 3, 3, dtype=torch.bool)


def test_rejects_wrong_rank() -> None:
    q, k, v, m = _ok_inputs()
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        dit_sparse.sparse_attention(q[0], k, v, m, 16)
    with pytest.raises(ValueError, match=r"block_mask must be 4-D"):
        dit_sparse.sparse_attention(q, k, v, m[0], 16)


def test_rejects_mismatched_shapes() -> None:
    q, k, v, m = _ok_inputs()
    with pytest.raises(ValueError, match=r"must agree on batch, heads and head_dim"):
        dit_sparse.sparse_attention(q, k[..., :32], v[..., :32], m, 16)
    with pytest.raises(ValueError, match=r"must agree on batch, heads and head_dim"):
        dit_sparse.sparse_attention(q, k[:, :1], v[:, :1], m, 16)
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        dit_sparse.sparse_attention(q, k, v[:, :, :30], m, 16)


def test_rejects_wrong_block_count() -> None:
    q, k, v, m = _ok_inputs()
    with pytest.raises(ValueError, match=r"must have ceil\(Nq/bs\)×ceil\(Nk/bs\) = 3×3"):
        dit_sparse.sparse_attention(q, k, v, m[..., :2], 16)
    with pytest.raises(ValueError, match=r"batch/heads"):
        dit_sparse.sparse_attention(q, k, v, torch.ones(1, 3, 3, 3, dtype=torch.bool), 16)


def test_rejects_non_bool_mask() -> None:
    q, k, v, m = _ok_inputs()
    with pytest.raises(TypeError, match=r"block_mask must be a torch.bool tensor"):
        dit_sparse.sparse_attention(q, k, v, m.float(), 16)
    with pytest.raises(
        TypeError, match=r"bool tensor, a FlexAttention BlockMask or a prepare_block_mask\(\) index"
    ):
        dit_sparse.sparse_attention(q, k, v, m.tolist(), 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_unsupported_dtype(dtype: torch.dtype) -> None:
    q, k, v, m = _ok_inputs()
    with pytest.raises(TypeError, match=r"unsupported dtype"):
        dit_sparse.sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), m, 16)
    with pytest.raises(TypeError, match=r"share one dtype"):
        dit_sparse.sparse_attention(q, k.float(), v, m, 16)


def test_rejects_unsupported_block_size() -> None:
    q, k, v, _ = _ok_inputs()
    with pytest.raises(ValueError, match=r"block_size must be one of"):
        dit_sparse.sparse_attention(q, k, v, torch.ones(1, 2, 1, 1, dtype=torch.bool), 48)


def test_rejects_unknown_impl() -> None:
    q, k, v, m = _ok_inputs()
    with pytest.raises(ValueError, match=r"impl must be one of"):
        dit_sparse.sparse_attention(q, k, v, m, 16, impl="flash")


def test_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, m = _ok_inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"impl='triton' on a CPU tensor needs the Triton interpreter"):
        dit_sparse.sparse_attention(q, k, v, m, 16, impl="triton")


def test_resolve_impl_is_what_sparse_attention_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from dit_sparse.kernels import resolve_impl

    assert resolve_impl("auto", torch.device("cpu")) == "gather"
    assert resolve_impl("auto", torch.device("cuda")) == "triton"  # a device object only: no GPU needed
    assert [resolve_impl(i, torch.device("cpu")) for i in ("gather", "reference")] == ["gather", "reference"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs the Triton interpreter"):
        resolve_impl("triton", torch.device("cpu"))
    assert resolve_impl("triton", torch.device("cuda")) == "triton"


# ------------------------------------------------------------------------------------------------ FlexAttention


def _flex_block_mask(table: torch.Tensor, bs: int, nq: int, nk: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def block_level(b, h, q_idx, kv_idx):
        return table[b, h, q_idx // bs, kv_idx // bs]

    return create_block_mask(block_level, table.shape[0], table.shape[1], nq, nk, device="cpu", BLOCK_SIZE=bs)


@pytest.mark.parametrize("impl", IMPLS)
def test_flex_block_mask_equals_bool_mask(impl: str) -> None:
    _needs_triton(impl)
    bs, nq, nk = 32, 150, 110  # ragged: the last q and kv blocks are partial in FlexAttention's sense
    q, k, v = _qkv(2, 2, nq, nk, 64, torch.float16, seed=7)
    table = _random_mask((2, 2, math.ceil(nq / bs), math.ceil(nk / bs)), 0.5, seed=8)
    block_mask = _flex_block_mask(table, bs, nq, nk)
    out_flex = dit_sparse.sparse_attention(q, k, v, block_mask, impl=impl)
    out_bool = dit_sparse.sparse_attention(q, k, v, table, block_size=bs, impl=impl)
    torch.testing.assert_close(out_flex, out_bool, rtol=0, atol=0)
    torch.testing.assert_close(
        dit_sparse.sparse_attention(q, k, v, block_mask, bs, impl=impl), out_flex, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match=r"block_size=128 disagrees with the BlockMask's BLOCK_SIZE 32"):
        dit_sparse.sparse_attention(q, k, v, block_mask, 128, impl=impl)
    assert_close_to_reference(out_flex, q, k, v, table, bs)


def test_flex_block_mask_with_element_mask_rejected() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    nq = nk = 100
    q, k, v = _qkv(1, 1, nq, nk, 64, torch.float16)
    block_mask = create_block_mask(causal, 1, 1, nq, nk, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match=r"masks single elements inside \d+ partial block"):
        dit_sparse.sparse_attention(q, k, v, block_mask, impl="gather")


# ------------------------------------------------------------------------------------------------ prepared index
PREPARED_CASES = [
    c
    for c in CASES
    if c.name
    in (
        "density0",
        "ragged_bs128",
        "ragged_bs16",
        "nq_lt_nk",
        "bcast_11",
        "bcast_1h",
        "bf16_d128",
        "fp32_d72_bs64",
    )
]


@pytest.mark.parametrize("impl", (*IMPLS, "reference"))
@pytest.mark.parametrize("case", PREPARED_CASES, ids=lambda c: c.name)
def test_prepared_index_gives_the_same_output(case: Case, impl: str) -> None:
    """A mask turned into the kernel's index once (compact or not) gives bit for bit what the mask gives."""
    _needs_triton(impl)
    dev = _device()
    if dev == "cuda" and case.dtype == torch.float32:
        pytest.skip("float32 is CPU-only")
    q, k, v = _qkv(case.b, case.h, case.nq, case.nk, case.d, case.dtype, seed=21, device=dev)
    mb, mh = case.mask_bh or (case.b, case.h)
    mask = _random_mask(
        (mb, mh, math.ceil(case.nq / case.bs), math.ceil(case.nk / case.bs)), case.density, 22, dev
    )
    want = dit_sparse.sparse_attention(q, k, v, mask, case.bs, case.scale, impl=impl)
    for compact in (True, False):
        prepared = dit_sparse.kernels.prepare_block_mask(mask, case.bs, case.nq, case.nk, compact=compact)
        got = dit_sparse.sparse_attention(q, k, v, prepared, case.bs, case.scale, impl=impl)
        assert torch.equal(got, want), (compact, (got.double() - want.double()).abs().max())
        got = dit_sparse.sparse_attention(
            q, k, v, prepared, scale=case.scale, impl=impl
        )  # block size: the index's
        assert torch.equal(got, want)


def test_prepared_index_is_compact_and_indexes_an_expanded_mask_once() -> None:
    from dit_sparse.kernels import build_block_index, index_granularity, prepare_block_mask

    mask = _random_mask((1, 3, 12, 12), 0.3, seed=23)  # 1500 tokens in blocks of 128: the last is short
    mask[0, 1] = False  # a head with no block at all
    wide = mask.expand(4, -1, -1, -1)  # batch 4 as a stride-0 view
    prepared = prepare_block_mask(wide, 128, 1500)
    gq, gk = index_granularity(128)
    full = build_block_index(mask, 128, 1500, 1500, gq, gk)
    assert prepared.kv_num_blocks.shape[0] == 1  # indexed once, not per batch row
    for num, idx, full_idx in (
        (prepared.kv_num_blocks, prepared.kv_indices, full.kv_indices),
        (prepared.full_kv_num_blocks, prepared.full_kv_indices, full.full_kv_indices),
    ):
        assert idx.shape[-1] == max(1, int(num.max()))  # as wide as the longest row
        live = torch.arange(idx.shape[-1]) < num[..., None]
        assert torch.equal(idx[live], full_idx[..., : idx.shape[-1]][live])
    assert prepared.full_kv_indices.shape[-1] < full.full_kv_indices.shape[-1] == 12


def test_prepared_index_rejects_what_it_was_not_built_for() -> None:
    from dit_sparse.kernels import build_block_index, prepare_block_mask

    q, k, v = _qkv(1, 2, 100, 100, 16, torch.float32, seed=24)
    mask = _random_mask((1, 2, 4, 4), 0.5, seed=25)
    prepared = prepare_block_mask(mask, 32, 100)
    with pytest.raises(ValueError, match=r"built for 100 query and 100 key tokens, but q has 90"):
        dit_sparse.sparse_attention(q[:, :, :90], k, v, prepared, 32)
    for explicit in (64, 128):  # 128, the bool mask's default, is caught too when given
        with pytest.raises(
            ValueError, match=rf"block_size={explicit} disagrees with the prepared index's block size 32"
        ):
            dit_sparse.sparse_attention(q, k, v, prepared, explicit)
    other = build_block_index(mask, 32, 100, 100)  # the mask's own granularity, not the kernel's
    with pytest.raises(ValueError, match=r"build it with prepare_block_mask"):
        dit_sparse.sparse_attention(q, k, v, other, 32)
    with pytest.raises(ValueError, match=r"must be \[B\|1, H\|1, 4, 4\] for 100×100 tokens"):
        prepare_block_mask(mask[..., :3], 32, 100)
    with pytest.raises(TypeError, match=r"torch.bool"):
        prepare_block_mask(mask.float(), 32, 100)


# ------------------------------------------------------------------------------------------------ torch.compile


def test_torch_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 40, 40, 16, torch.float32, seed=9)
    mask = _random_mask((1, 2, 3, 3), 0.5, seed=10)

    def attend(q, k, v, mask):
        return dit_sparse.sparse_attention(q, k, v, mask, block_size=16, impl="gather") * 2.0

    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), attend(q, k, v, mask), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_op_opcheck(impl: str) -> None:
    """The fake kernel agrees with the real one (shape, dtype, strides) under every torch.library check."""
    _needs_triton(impl)
    q, k, v = _qkv(1, 2, 37, 21, 16, torch.float32, seed=15)
    mask = _random_mask((1, 1, 3, 2), 0.7, seed=16)
    torch.library.opcheck(
        torch.ops.dit_sparse.block_sparse_attention.default, (q, k, v, mask, 16, 0.25, impl)
    )
    if impl == "triton":  # with a prepared index passed through the op
        p = dit_sparse.kernels.prepare_block_mask(mask, 16, 37, 21)
        lists = (p.kv_num_blocks, p.kv_indices, p.full_kv_num_blocks, p.full_kv_indices)
        torch.library.opcheck(
            torch.ops.dit_sparse.block_sparse_attention.default, (q, k, v, mask, 16, 0.25, impl, None, *lists)
        )


@pytest.mark.parametrize("head_dim", [64, 72, 128, 256])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_triton_configs_divide_granularity(bs: int, head_dim: int) -> None:
    """Granularity is fixed from block_size before autotuning: every surviving config must be legal for it."""
    pytest.importorskip("triton")
    from dit_sparse.kernels import triton_attention as ta

    gq, gk = ta.index_granularity(bs)
    assert gq % bs == 0 and gk % bs == 0
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    kept = ta._prune_configs(ta._configs(), {}, G_Q=gq, G_K=gk, BLOCK_D=block_d)
    assert kept
    for cfg in kept:
        assert gq % cfg.kwargs["BLOCK_M"] == 0 and gk % cfg.kwargs["BLOCK_N"] == 0
    fixed = ta._INTERPRET_CONFIG
    assert gq % fixed["BLOCK_M"] == 0 and gk % fixed["BLOCK_N"] == 0


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("bs", [16, 64, 128])
def test_triton_cuda_matches_reference(dtype: torch.dtype, d: int, bs: int) -> None:
    nq, nk = 1000, 777
    q, k, v = _qkv(2, 3, nq, nk, d, dtype, seed=11, device="cuda")
    mask = _random_mask((2, 1, math.ceil(nq / bs), math.ceil(nk / bs)), 0.3, seed=12, device="cuda")
    out = dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl="triton")
    assert_close_to_reference(out, q, k, v, mask, bs)
    _assert_empty_rows_zero(out, mask, bs)


@pytest.mark.gpu
def test_triton_cuda_launch_has_no_host_sync() -> None:
    bs, n = 64, 1000
    q, k, v = _qkv(1, 2, n, n, 128, torch.bfloat16, seed=13, device="cuda")
    mask = _random_mask((1, 2, math.ceil(n / bs), math.ceil(n / bs)), 0.3, seed=14, device="cuda")
    dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl="triton")  # autotune (may sync) first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dit_sparse.sparse_attention(q, k, v, mask, block_size=bs, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
