"""The demo's functions (``dit_sparse.app``) on the bundled tiny model, without a browser (CPU, offline)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from importlib import resources

import numpy as np
import pytest
import torch
from tiny_profiles import SHIPPED, write_sparse_profile

from dit_sparse.app.core import (
    _VIRIDIS,
    DENSE_CHOICE,
    HEATMAP_MARGIN,
    UPLOAD_CHOICE,
    DemoError,
    DemoSession,
    Settings,
    colormap,
    demo_layout,
    density_table,
    fit_window,
    fmt_psnr,
    head_density,
    head_mask,
    heatmap_image,
    mask_image,
    psnr_points,
    read_shipped,
    read_uploaded,
    retarget,
    upscale,
)
from dit_sparse.patterns import MaskLayout, build_pattern
from dit_sparse.profile import Profile

# awkward on purpose: 48×64 px, 17 frames -> latent 5×6×8 = 240 tokens, blocks of 64 straddle frames (48 per frame)
SMALL = Settings(
    prompt="a red circle moving left", seed=3, steps=3, height=48, width=64, frames=17, guidance=1.0
)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return DemoSession(out_dir=tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def sparse_file(tmp_path_factory):
    # a profile with sparse heads in every layer (the shipped one keeps a layer dense)
    return write_sparse_profile(tmp_path_factory.mktemp("profiles") / "tiny-sparse.json")


@pytest.fixture(scope="module")
def first(session, sparse_file):
    """One dense + sparse comparison with a sparse profile (the dense side lands in the cache)."""
    return session.compare(SMALL, UPLOAD_CHOICE, sparse_file)


# ------------------------------------------------------------------------------------------------ generation
def test_compare_writes_three_videos_and_metrics(first):
    import imageio.v3 as iio

    dense = iio.imread(first.dense_video)
    pair = iio.imread(first.pair_video)
    # 17 frames; upscaled by an integer factor so the shortest side is >= 256 px (48 -> 288)
    assert dense.shape == (17, 288, 384, 3)
    assert pair.shape[0] == 17 and pair.shape[1] == 288 and pair.shape[2] > 2 * 384
    assert iio.imread(first.sparse_video).shape == dense.shape
    m = first.metrics
    assert len(m["psnr_per_frame"]) == 17 and len(m["ssim_per_frame"]) == 17
    assert first.speedup == pytest.approx(first.dense.seconds / first.sparse.seconds)
    assert not first.dense_cached
    assert any("untimed 1-step warm-up" in n for n in first.notes)  # first run at this size
    assert not any("not trained" in n for n in first.notes)  # the bundled model is trained: no such caveat


def test_dense_side_is_cached_and_dense_profile_is_bit_identical(session, first):
    """Same prompt/seed/settings: the dense run comes from the cache (the same object, no new generation), and a
    'dense' profile on the sparse side reproduces it exactly (PSNR infinite)."""
    again = session.compare(SMALL, DENSE_CHOICE)
    assert again.dense_cached and again.dense is first.dense
    np.testing.assert_array_equal(again.sparse.frames, first.dense.frames)
    assert all(math.isinf(p) for p in again.metrics["psnr_per_frame"])
    assert fmt_psnr(again.metrics["psnr_mean"]) == "inf dB (identical)"
    other = replace(SMALL, seed=4)
    assert (
        session.cache.get(session.cache.key(session.model_name, other)) is None
    )  # the key includes the seed


def test_predicted_mask_densities_equal_what_the_integration_measured(first):
    """The heatmap's per-head densities (masks built on the layout the app predicts from the settings) averaged per
    layer equal the densities the sparse processors measured on the sparse steps of the real run."""
    layout = first.layout
    assert layout is not None and layout.grid == (5, 6, 8)
    table = density_table(first.profile, layout)
    measured = first.sparse.report["per_layer_step_density"]
    sparse_steps = range(first.profile.schedule.dense_steps, SMALL.steps)
    for layer in range(len(first.profile.layers)):
        for step in sparse_steps:
            assert measured[f"{layer},{step}"] == pytest.approx(table[layer].mean(), rel=1e-12)
    assert 0 < table.min() < 1  # the shipped windows skip blocks at this size


def test_generation_errors_are_messages(session):
    with pytest.raises(DemoError, match="prompt is empty"):
        session.compare(replace(SMALL, prompt="  "), SHIPPED)
    with pytest.raises(DemoError, match="no file was uploaded"):
        session.compare(SMALL, UPLOAD_CHOICE, None)


# ------------------------------------------------------------------------------------------------ profiles
def test_uploaded_profiles_are_size_limited_and_validated(session, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(read_shipped(SHIPPED).to_dict()))
    assert read_uploaded(good).layers == read_shipped(SHIPPED).layers
    with pytest.raises(DemoError, match=r"bytes; the limit is 100 bytes"):
        read_uploaded(good, limit=100)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DemoError, match="not valid JSON"):
        read_uploaded(bad)
    other = read_shipped(SHIPPED).to_dict()
    other["model"]["fingerprint"]["num_heads"] = 3
    other["layers"] = [[{"pattern": "dense"}] * 3 for _ in other["layers"]]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(other))
    with pytest.raises(DemoError, match=r"does not fit this model.*3 heads"):
        session.profile(UPLOAD_CHOICE, str(wrong), SMALL, None)


# ------------------------------------------------------------------------------------------------ density knob
def _brute_best(base, layout, target):
    """Every scale factor on a fine grid, densities from the pattern itself: the largest window within target."""
    best = None
    for i in range(0, 80):  # t up to 4: covers the 5×7×9 grid for this base
        t = i / 20
        cand = {k: round(t * base[k]) for k in ("f", "h", "w")}
        d = head_density(build_pattern("window", cand, layout, "cpu"), layout)
        if d <= target + 1e-9 and (best is None or d >= best[1]):
            best = (cand, d)
    return best


@pytest.mark.parametrize("target", [0.3, 0.55, 0.8])
def test_fit_window_is_the_largest_window_within_the_target(target):
    layout = MaskLayout((5, 7, 9), 0, False, 32)  # 315 tokens, 10 blocks, last one partial
    base = {"f": 1, "h": 3, "w": 4}
    params, density = fit_window(base, layout, target)
    assert density <= target + 1e-9
    expected = _brute_best(base, layout, target)
    assert expected is not None and density == pytest.approx(expected[1])
    assert density == pytest.approx(head_density(build_pattern("window", params, layout, "cpu"), layout))


def test_retarget_changes_only_window_heads(session, sparse_file):
    base = read_uploaded(sparse_file)
    base.layers[1][0] = replace(base.layers[1][0], pattern="dense", params={}, density=None)
    layout = demo_layout(session.pipe, Settings(height=128, width=128, frames=33), base.block_size)
    low = retarget(base, layout, 0.2)
    assert low.layers[1][0].pattern == "dense"
    assert low.schedule == base.schedule and low.block_size == base.block_size
    table = density_table(low, layout)
    window_heads = [
        (i, h) for i, heads in enumerate(low.layers) for h, s in enumerate(heads) if s.pattern == "window"
    ]
    assert all(table[i, h] <= 0.2 + 1e-9 for i, h in window_heads)
    assert table[1, 0] == 1.0
    assert retarget(base, layout, None) is base
    with pytest.raises(DemoError, match=r"fraction in \(0, 1\]"):
        retarget(base, layout, 1.5)


def test_demo_layout_follows_the_settings(session):
    # the bundled CogVideoX: VAE /8 in space, /4 in time, 1×1 patches; no hard-coded sizes
    assert demo_layout(session.pipe, Settings(height=96, width=160, frames=21), 64).grid == (6, 12, 20)
    assert demo_layout(session.pipe, Settings(height=48, width=48, frames=1), 64).grid == (1, 6, 6)


# ------------------------------------------------------------------------------------------------ pictures
def test_colormap_hits_the_viridis_anchors():
    vals = np.linspace(0, 1, len(_VIRIDIS))
    np.testing.assert_array_equal(colormap(vals), _VIRIDIS.astype(np.uint8))
    assert colormap(np.array([np.nan]))[0].tolist() == _VIRIDIS[0].tolist()


def test_mask_image_shows_each_block():
    layout = MaskLayout((3, 4, 5), 0, False, 16)  # 60 tokens -> 4 blocks
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    pic = mask_image(mask, layout, target=40)
    cell = pic.shape[0] // 4
    assert pic.shape == (4 * cell, 4 * cell, 3)
    for i in range(4):
        for j in range(4):
            want = _VIRIDIS[-1] if mask[i, j] else _VIRIDIS[0]
            assert pic[i * cell + cell // 2, j * cell + cell // 2].tolist() == want.tolist()


def test_heatmap_and_mask_of_a_profile(session, sparse_file):
    prof = read_uploaded(sparse_file)
    layout = demo_layout(session.pipe, Settings(height=64, width=64, frames=17), prof.block_size)
    table = density_table(prof, layout)
    assert table.shape == (4, 2)
    img = heatmap_image(table)
    top, left = HEATMAP_MARGIN
    cell = (img.shape[0] - top) // 4
    assert img.dtype == np.uint8 and img.shape[:2] == (top + 4 * cell, left + 2 * cell)  # rows = layers
    for r in range(4):
        for c in range(2):  # a cell's corner (away from the printed value) has the colour of its density
            assert img[top + r * cell + 1, left + c * cell + 1].tolist() == colormap(table[r, c]).tolist()
    mask = head_mask(prof, layout, 3, 1)
    assert head_density(mask, layout) == pytest.approx(table[3, 1])
    with pytest.raises(DemoError, match="out of range"):
        head_mask(prof, layout, 4, 0)
    dense = density_table(Profile.dense(session.pipe.transformer), layout)
    assert (dense == 1.0).all()


def test_psnr_points_and_upscale():
    assert psnr_points([30.0, math.inf, math.nan]) == [(0, 30.0), (1, 100.0), (2, 0.0)]
    frames = np.random.default_rng(0).random((2, 3, 5, 3))
    big = upscale(frames, min_side=10)  # factor ceil(10 / 3) = 4
    assert big.shape == (2, 12, 20, 3)
    np.testing.assert_array_equal(big[:, ::4, ::4], frames)


# ------------------------------------------------------------------------------------------------ gradio layer
def test_ui_results_preview_and_error_messages(session, first, sparse_file):
    gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'dit-sparse[demo]')")
    from dit_sparse.app import ui

    out = ui.results(first, 0, 1)
    assert set(out) == set(ui.OUTPUT_KEYS)
    assert float(out["speedup"].rstrip("×")) == pytest.approx(first.speedup, abs=0.006)
    assert out["psnr"].split()[0] == f"{first.metrics['psnr_mean']:.2f}"
    assert list(out["psnr_plot"]["frame"]) == list(range(17))
    heat, mask, info = ui.preview(session, UPLOAD_CHOICE, str(sparse_file), 48, 64, 17, 0.0, 0, 1)
    assert heat.ndim == mask.ndim == 3 and "5×6×8" in info
    assert "has none" in ui.preview(session, DENSE_CHOICE, None, 48, 64, 17, 0.5, 0, 0)[2]
    nan = float("nan")
    table = np.array([[0.25, nan], [1.0, 0.5]])
    assert ui.density_summary(table) == (
        "sparse-step density 0.583 (mean over the 3 static heads; 1 dynamic head(s) are measured during generation)"
    )
    assert ui.density_summary(np.array([[0.5, 1.0]])) == "sparse-step density 0.750 (mean over heads)"
    assert "all 2 heads dynamic" in ui.density_summary(np.array([[nan, nan]]))

    def boom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")

    with pytest.raises(gr.Error, match="out of memory: choose a smaller resolution"):
        ui._guard(boom)()
    assert "invalid settings" in ui.user_message(ValueError("height must be divisible by 16"))


def test_build_demo_has_the_elements_the_browser_test_uses(session):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'dit-sparse[demo]')")
    from dit_sparse.app.ui import build_demo

    demo = build_demo(session)
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    for elem in (
        "prompt",
        "generate",
        "dense_video",
        "sparse_video",
        "pair_video",
        "speedup",
        "psnr",
        "status",
    ):
        assert elem in ids
    # the mask picture opens on the first head the shipped profile makes sparse, not on a dense one
    props = {c.get("props", {}).get("elem_id"): c["props"] for c in demo.config["components"]}
    start = (props["layer"]["value"], props["head"]["value"])
    prof = Profile.loads(resources.files("dit_sparse.profiles").joinpath(SHIPPED).read_bytes())
    first = next(
        (layer, h)
        for layer, heads in enumerate(prof.layers)
        for h, spec in enumerate(heads)
        if layer not in prof.schedule.dense_layers and spec.pattern not in ("dense", "full")
    )
    assert start == first and prof.layers[start[0]][start[1]].pattern == "window"


def test_first_sparse_head_skips_dense_layers_dense_and_dynamic_heads(session):
    from dit_sparse.app.core import first_sparse_head
    from dit_sparse.profile import HeadSpec

    prof = Profile.dense(session.pipe.transformer)
    assert first_sparse_head(prof) == (0, 0)  # nothing sparse: the first head
    n_layers, n_heads = len(prof.layers), len(prof.layers[0])
    assert n_layers >= 3 and n_heads >= 2
    prof.layers[0][1] = HeadSpec("window", {"f": 1, "h": 1, "w": 1})  # in a dense layer
    prof.layers[1][0] = HeadSpec("draft", {})  # dynamic: no picture before generation
    prof.layers[1][1] = HeadSpec("full", {})
    prof.layers[2][1] = HeadSpec("radial", {})
    prof.schedule.dense_layers = [0]
    assert first_sparse_head(prof) == (2, 1)


# ------------------------------------------------------------------------------------------------ CLI
def test_demo_command_help_and_lazy_gradio():
    code = (
        "import sys; from dit_sparse.cli import build_parser; p = build_parser(); "
        "a = p.parse_args(['demo']); assert a.host == '127.0.0.1' and a.port == 7860 and not a.share, a; "
        "assert 'gradio' not in sys.modules, 'the CLI imported gradio at start-up'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "dit_sparse", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for opt in ("--model", "--profile", "--host", "--port", "--share", "127.0.0.1"):
        assert opt in out
