"""Static patterns (skip, tile_window, radial, diagonal, multi_diagonal, stripe) against brute-force token rules.

The oracle builds the full N×N token matrix from each pattern's written definition (small grids, N <= ~400) and
reduces it to blocks with ``any``; the factories never build it. Grids are not multiples of the block on purpose,
text sits first, last or nowhere, block sizes 16/32/64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse.patterns import (
    MaskLayout,
    build_layer_mask,
    build_pattern,
    parse_pattern_name,
    pattern_name,
    validate_pattern,
)
from dit_sparse.patterns.picture import ascii_mask, save_mask_png
from dit_sparse.patterns.static import pattern_density

MAX_TOKENS = 380


# ------------------------------------------------------------------------------------------------------ oracle
def token_coords(layout: MaskLayout) -> dict[str, torch.Tensor]:
    """Per sequence position: is it video, its raster video index v, frame f, row h, column w, in-frame s."""
    n = layout.seq_len
    pos = torch.arange(n)
    v = pos - layout.video_offset
    video = (v >= 0) & (v < layout.num_video)
    v = torch.where(video, v, torch.zeros_like(v))
    _, gh, gw = layout.grid
    f, h, w = v // (gh * gw), (v // gw) % gh, v % gw
    return {"video": video, "v": v, "f": f, "h": h, "w": w, "s": h * gw + w}


def brute_block_mask(layout: MaskLayout, rule) -> torch.Tensor:
    """``rule(q_coords, k_coords) -> bool (N, N)`` on video pairs, reduced to blocks by any()."""
    c = token_coords(layout)
    q = {k: t[:, None] for k, t in c.items()}
    k = {k: t[None, :] for k, t in c.items()}
    tok = rule(q, k) & q["video"] & k["video"]  # (N, N)
    nb, bs = layout.num_blocks, layout.block_size
    padded = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
    padded[: layout.seq_len, : layout.seq_len] = tok
    return padded.view(nb, bs, nb, bs).any(dim=3).any(dim=1)


def rule_tile_window(p):
    def rule(q, k):
        ok = torch.ones_like(q["f"] == k["f"])
        for ax, t, r in (("f", "tf", "wf"), ("h", "th", "wh"), ("w", "tw", "ww")):
            ok &= (q[ax] // p[t] - k[ax] // p[t]).abs() <= p[r]
        return ok

    return rule


def rule_radial(p, block_size):
    dense, band, sink = p["dense_frames"], p["band"], p["sink"]
    frozen = 0  # last halving level whose band is still >= one block
    while band / 2 ** (frozen + 1) >= block_size:
        frozen += 1

    def rule(q, k):
        d = (q["f"] - k["f"]).abs()
        full = (d <= dense) | (k["f"] < sink)
        ratio = d.double() / (dense + 1)
        level = torch.where(
            ratio >= 1, torch.floor(torch.log2(ratio.clamp(min=1))), torch.zeros_like(ratio)
        ).long()
        radius = (band // 2 ** level.clamp(max=frozen)) // 2
        kept = d % 2 ** (level - frozen).clamp(min=0) == 0
        return full | (kept & ((q["s"] - k["s"]).abs() <= radius))

    return rule


def rule_multi_diagonal(offsets, width, order):
    key = "v" if order == "token" else "s"

    def rule(q, k):
        ok = torch.zeros_like(q["f"] == k["f"])
        for o in offsets:
            ok |= ((k[key] - q[key]) - o).abs() <= width // 2
        return ok

    return rule


def rule_stripe(p):
    key = "v" if p["order"] == "token" else "s"

    def rule(q, k):
        ok = torch.zeros_like(q["f"] == k["f"])
        for pos in p["positions"]:
            ok |= (k[key] >= pos) & (k[key] < pos + p["width"])
        return ok

    return rule


def oracle(name: str, p: dict, layout: MaskLayout) -> torch.Tensor:
    if name == "skip":
        return brute_block_mask(layout, lambda q, k: torch.zeros_like(q["f"] == k["f"]))
    if name == "tile_window":
        return brute_block_mask(layout, rule_tile_window(p))
    if name == "radial":
        return brute_block_mask(layout, rule_radial(p, layout.block_size))
    if name == "diagonal":
        return brute_block_mask(layout, rule_multi_diagonal([0], p["width"], p["order"]))
    if name == "multi_diagonal":
        return brute_block_mask(layout, rule_multi_diagonal(p["offsets"], p["width"], p["order"]))
    if name == "stripe":
        return brute_block_mask(layout, rule_stripe(p))
    raise AssertionError(name)


# -------------------------------------------------------------------------------------------------- strategies
@st.composite
def layouts(draw, max_frames: int = 8) -> MaskLayout:
    f = draw(st.integers(1, max_frames))
    h = draw(st.integers(1, min(9, MAX_TOKENS // f)))
    w = draw(st.integers(1, max(1, min(9, MAX_TOKENS // (f * h)))))
    text = draw(st.sampled_from(["none", "first", "last"]))
    num_text = 0 if text == "none" else draw(st.integers(1, 20))
    return MaskLayout((f, h, w), num_text, text == "first", draw(st.sampled_from([16, 32, 64])))


orders = st.sampled_from(["token", "frame"])
PARAMS = {
    "skip": st.fixed_dictionaries({"mode": st.sampled_from(["zero", "reuse"])}),
    "tile_window": st.fixed_dictionaries(
        {
            "tf": st.integers(1, 4),
            "th": st.integers(1, 5),
            "tw": st.integers(1, 5),
            "wf": st.integers(0, 2),
            "wh": st.integers(0, 2),
            "ww": st.integers(0, 2),
        }
    ),
    "radial": st.fixed_dictionaries(
        {"dense_frames": st.integers(0, 2), "band": st.integers(1, 300), "sink": st.integers(0, 2)}
    ),
    "diagonal": st.fixed_dictionaries({"width": st.integers(1, 90), "order": orders}),
    "multi_diagonal": st.fixed_dictionaries(
        {
            "offsets": st.lists(st.integers(-200, 200), min_size=1, max_size=4),
            "width": st.integers(1, 40),
            "order": orders,
        }
    ),
    "stripe": st.fixed_dictionaries(
        {
            "positions": st.lists(st.integers(0, 300), min_size=1, max_size=3),
            "width": st.integers(1, 30),
            "order": orders,
        }
    ),
}


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_factory_equals_brute_force(name):
    max_frames = 24 if name == "radial" else 8  # radial: long videos reach the frame-dropping levels

    @settings(max_examples=40, deadline=None)
    @given(layout=layouts(max_frames), params=PARAMS[name])
    def check(layout, params):
        full = validate_pattern(name, params)
        got = build_pattern(name, params, layout, "cpu")
        assert got.dtype == torch.bool and got.shape == (layout.num_blocks, layout.num_blocks)
        assert torch.equal(got, oracle(name, full, layout)), (name, full, layout)
        # the layer mask keeps it and makes text rows/columns dense
        layer = build_layer_mask([(name, params)], layout, "cpu")[0, 0]
        text = layout.text_block_flags()
        assert torch.equal(layer, got | text[:, None] | text[None, :])

    check()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_density_counts_token_pairs(name):
    @settings(max_examples=15, deadline=None)
    @given(layout=layouts(), params=PARAMS[name])
    def check(layout, params):
        mask = build_layer_mask([(name, params)], layout, "cpu")[0, 0]
        bs, n = layout.block_size, layout.seq_len
        tok = mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]  # in-range token pairs only
        assert pattern_density(name, params, layout) == pytest.approx(tok.double().mean().item(), abs=1e-12)

    check()


def test_density_examples_by_hand():
    lay = MaskLayout((2, 4, 4), 0, False, 16)  # one frame per block
    assert pattern_density("skip", {}, lay) == 0.0
    assert pattern_density("diagonal", {"width": 1}, lay) == 0.5  # diagonal blocks only
    assert pattern_density("radial", {"dense_frames": 0, "band": 1, "sink": 0}, lay) == 1.0  # Δs = 0 in both
    lay_text = MaskLayout((2, 4, 4), 8, True, 16)  # text block 0 dense: 8 text tokens + 8 video share it
    # 40×40 tokens; text block row and column (16 tokens each) dense, video blocks (2×16 + 8 tail) skipped
    assert pattern_density("skip", {}, lay_text) == pytest.approx((16 * 40 + 24 * 16) / 40**2)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_names_encode_and_parse_params(name):
    @settings(max_examples=10, deadline=None)
    @given(params=PARAMS[name])
    def check(params):
        text = pattern_name(name, params)
        for key, value in params.items():
            rendered = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
            assert f"{key}={rendered}" in text
        parsed_name, parsed = parse_pattern_name(text)
        assert parsed_name == name and parsed == validate_pattern(name, params)
        assert pattern_name(parsed_name, parsed) == text

    check()


def test_name_examples():
    assert pattern_name("radial", {"band": 64}) == "radial(band=64,dense_frames=1,sink=1)"
    assert pattern_name("multi_diagonal", {"offsets": (-8, 0, 8)}) == pattern_name(
        "multi_diagonal", {"offsets": [-8, 0, 8]}
    )
    assert parse_pattern_name("dense") == ("dense", {})
    with pytest.raises(ValueError, match="key=value"):
        parse_pattern_name("radial(band)")
    with pytest.raises(ValueError, match="band"):
        parse_pattern_name("radial(band=0)")


BAD = [
    ("skip", {"mode": "drop"}, "mode"),
    ("tile_window", {"tf": 0}, "tf"),
    ("tile_window", {"wh": -1}, "wh"),
    ("tile_window", {"tw": 2.5}, "tw"),
    ("radial", {"dense_frames": -1}, "dense_frames"),
    ("radial", {"band": 0}, "band"),
    ("radial", {"sink": True}, "sink"),
    ("diagonal", {"width": 0}, "width"),
    ("diagonal", {"order": "hwf"}, "order"),
    ("multi_diagonal", {"offsets": []}, "offsets"),
    ("multi_diagonal", {"offsets": [1, "2"]}, "offsets"),
    ("multi_diagonal", {"order": "col"}, "order"),
    ("stripe", {"positions": [-1]}, "positions"),
    ("stripe", {"positions": 3}, "positions"),
    ("stripe", {"width": 0}, "width"),
    ("radial", {"decay": 0.2}, "decay"),
]


@pytest.mark.parametrize(("name", "params", "key"), BAD)
def test_bad_params_name_the_parameter(name, params, key):
    with pytest.raises(ValueError, match=key):
        validate_pattern(name, params)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_pictures(name, tmp_path):
    layout = MaskLayout((5, 6, 7), 10, False, 16)  # 220 tokens, 14 blocks
    mask = build_layer_mask([(name, {})], layout, "cpu")[0, 0]
    art = ascii_mask(mask)
    lines = art.splitlines()
    assert lines[0].startswith("block mask 14×14")
    assert len(lines) == 15 and all(len(line) == 14 for line in lines[1:])
    assert "".join(lines[1:]) == "".join("█" if x else "·" for x in mask.flatten().tolist())

    from PIL import Image

    path = save_mask_png(mask, tmp_path / "sub" / f"{name}.png", scale=3)
    with Image.open(path) as img:
        assert img.size == (14 * 3, 14 * 3)
        pix = torch.from_numpy(np.asarray(img).copy())  # (42, 42) uint8
    assert torch.equal(pix[::3, ::3] == 0, mask)
    assert [p.name for p in path.parent.iterdir()] == [f"{name}.png"]  # no temporary file left behind


def test_ascii_downsamples_large_masks():
    mask = torch.zeros(200, 130, dtype=torch.bool)
    mask[:100] = True  # top half full
    mask[150:, 0] = True
    lines = ascii_mask(mask, max_size=64).splitlines()
    assert "4×3 blocks per character" in lines[0]
    rows = lines[1:]
    assert len(rows) == 50 and all(len(r) == 44 for r in rows)
    assert set(rows[0]) == {"█"} and set(rows[30][1:]) == {"·"} and rows[45][0] in "░▒▓"
    with pytest.raises(ValueError, match="2-D"):
        ascii_mask(mask[None])


def test_radial_frame_dropping_by_hand():
    """One frame per block (4×4 tokens, block 16): the block mask is the frame mask. A band below one block from
    the start (K = 0) keeps, at level k (2^k <= d < 2^(k+1)), only distances d divisible by 2^k: the powers of 2."""
    layout = MaskLayout((40, 4, 4), 0, False, 16)
    mask = build_pattern("radial", {"dense_frames": 0, "band": 8, "sink": 0}, layout, "cpu")
    d = (torch.arange(40)[:, None] - torch.arange(40)[None, :]).abs()
    assert torch.equal(mask, (d == 0) | ((d & (d - 1)) == 0))
    sink = build_pattern("radial", {"dense_frames": 0, "band": 8, "sink": 2}, layout, "cpu")
    assert torch.equal(sink, mask | (torch.arange(40)[None, :] < 2))


@settings(max_examples=30, deadline=None)
@given(
    frames=st.integers(6, 18),
    block=st.sampled_from([16, 32]),
    params=PARAMS["radial"],
)
def test_radial_frame_aligned_blocks(frames, block, params):
    """Blocks that hold whole frames make every frame-pair decision (band, dropping, sink) visible."""
    layout = MaskLayout((frames, 4, block // 4), 0, False, block)
    got = build_pattern("radial", params, layout, "cpu")
    assert torch.equal(got, oracle("radial", validate_pattern("radial", params), layout))


def test_radial_block_count_grows_like_n_log_n():
    """Blocks per query frame grow by a constant per doubling of the frame count (a + b·log F), so the total is
    O(n log n); quadratic growth would double the per-frame count instead."""
    per_frame = {}
    for frames in (16, 32, 64, 128, 256):
        layout = MaskLayout((frames, 8, 8), 0, False, 16)  # 4 blocks per frame
        mask = build_pattern("radial", {"dense_frames": 1, "band": 16, "sink": 1}, layout, "cpu")
        per_frame[frames] = int(mask.sum()) / frames
    steps = [per_frame[f] - per_frame[f // 2] for f in (32, 64, 128, 256)]
    assert max(steps) / min(steps) < 1.05, per_frame  # constant increment per doubling: ~ log F per frame
    assert per_frame[256] / per_frame[128] < 1.2, per_frame  # n²  would give 2
    assert per_frame[256] / (256 * 4) < 0.3  # fraction of key blocks per query frame row: already small


def test_radial_uniform_profile_runs_on_tiny_wan():
    from tiny_wan import run, tiny_wan_pipeline

    import dit_sparse
    from dit_sparse import Profile

    pipe = tiny_wan_pipeline()
    res = dict(
        height=128, width=128, frames=13, steps=2, cfg=1.0
    )  # latent grid (4, 8, 8): 4 blocks of 16 a frame
    params = {
        "dense_frames": 0,
        "band": 1,
        "sink": 0,
    }  # frames 1 and 2 apart: diagonal blocks; 3 apart: dropped
    ref = run(pipe, **res)
    with dit_sparse.apply(pipe, Profile.uniform(pipe.transformer, "radial", params, block_size=16)) as handle:
        out = run(pipe, **res)
        rep = handle.report()
    expected = pattern_density("radial", params, MaskLayout((4, 8, 8), 0, False, 16))
    assert rep.sparse_density() == pytest.approx(expected) and expected < 0.5
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert not torch.equal(out, ref)
