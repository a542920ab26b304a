"""`dit-sparse eval`: dense vs sparse on the same prompts and seeds, on a tiny WanPipeline saved to a local folder
(tokenizer + text encoder included, as in test_generate_local_model.py), CPU and offline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_wan import tiny_text_wan_pipeline, tiny_wan_transformer

from dit_sparse import Profile
from dit_sparse.cli import build_parser, main

# latent 3×8×10 -> 3×4×5 = 60 video tokens per self-attention, 4 blocks of 16: a window profile skips blocks;
# no classifier-free guidance (one transformer call per step) to keep the file fast
ARGS = ["--height", "64", "--width", "80", "--frames", "9", "--steps", "2", "--guidance", "1", "--no-warmup"]
PROMPTS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "moving", "left", "blue", "square", "up"]
    pipe = tiny_text_wan_pipeline(words)
    transformer = pipe.transformer
    root = tmp_path_factory.mktemp("eval-models")
    pipe.save_pretrained(root / "tiny-wan")
    Profile.uniform(transformer, "window", {"f": 0, "h": 1, "w": 1}, block_size=16).save(root / "window.json")
    Profile.dense(transformer).save(root / "dense.json")
    Profile.dense(tiny_wan_transformer(num_layers=3)).save(root / "other.json")
    return root


def _eval_args(saved, profile: str, *extra: str) -> list[str]:
    return ["eval", "--model", str(saved / "tiny-wan"), "--profile", str(saved / profile), *ARGS, *extra]


def test_dense_profile_gives_identical_videos_and_replaces_only_with_force(saved, tmp_path, capsys):
    out = tmp_path / "dense-eval.json"
    out.write_text("keep me\n")
    cmd = _eval_args(saved, "dense.json", "--prompts", PROMPTS[0], "--seeds", "5", "--out", str(out))
    # an existing file is never replaced without --force, and that is checked before any model loads
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(cmd)
    assert out.read_text() == "keep me\n"
    assert main([*cmd, "--force"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())  # strict JSON: no Infinity/NaN
    (case,) = data["cases"]
    assert case["prompt"] == PROMPTS[0] and case["seed"] == 5 and case["frames"] == 9
    assert case["identical"] is True and case["max_abs_diff"] == 0.0
    assert case["density"] == 1.0 and case["dense_calls"] > 0  # every (layer, step) ran dense, none sparse
    assert case["psnr_mean"] is None and case["psnr_min"] is None  # infinite PSNR: written as null
    assert case["psnr_per_frame"] == [None] * 9
    assert case["ssim_min"] == pytest.approx(1.0)
    s = data["summary"]
    assert s["identical_cases"] == 1 and s["density_mean"] == 1.0 and s["psnr_min"] is None
    assert data["profile"]["source"] == str(saved / "dense.json")
    assert "inf / inf" in printed and "all (1 cases)" in printed


def test_sparse_metrics_match_an_independent_recomputation(saved, tmp_path):
    import dit_sparse
    from dit_sparse.eval import evaluate

    args = build_parser().parse_args(
        _eval_args(saved, "window.json", "--prompts", *PROMPTS, "--seeds", "3", "--out", str(tmp_path))
    )
    result = evaluate(args)
    data = json.loads(result.path.read_text())
    # --out FOLDER: a new, automatically named file (+ Markdown table), never an existing one
    assert result.path.parent == tmp_path and result.path.name.startswith("eval-tiny-wan-cpu-")
    assert result.path.with_suffix(".md").exists()
    assert data["benchmark"] == "dit-sparse eval"
    assert data["device"] == "cpu" and "not GPU performance" in data["note"]
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["diffusers"]
    assert data["settings"]["prompts"] == PROMPTS and data["settings"]["seeds"] == [3]
    assert [(c["prompt"], c["seed"]) for c in data["cases"]] == [(p, 3) for p in PROMPTS]

    for case, rec in zip(result.cases, data["cases"], strict=True):
        d, s = case.dense.frames.astype(np.float64), case.sparse.frames.astype(np.float64)
        assert d.shape == (9, 64, 80, 3)
        # PSNR per frame from the two videos, by hand: 10·log10(1 / MSE), data range 1
        mse = ((d - s) ** 2).reshape(9, -1).mean(axis=1)
        psnr = 10 * np.log10(1.0 / mse)
        assert rec["psnr_per_frame"] == pytest.approx(psnr.tolist(), rel=1e-6)
        assert rec["psnr_mean"] == pytest.approx(psnr.mean(), rel=1e-6)
        assert rec["psnr_min"] == pytest.approx(psnr.min(), rel=1e-6)
        assert math.isfinite(rec["psnr_min"]) and rec["identical"] is False
        assert rec["max_abs_diff"] == pytest.approx(np.abs(d - s).max())
        assert 0 < rec["ssim_min"] <= rec["ssim_mean"] < 1
        assert 0 < rec["density"] < 1  # the window profile really skipped attention blocks
        assert rec["speedup"] == pytest.approx(rec["dense_s"] / rec["sparse_s"])
    # different prompts give different videos
    assert not np.array_equal(result.cases[0].dense.frames, result.cases[1].dense.frames)
    s = data["summary"]
    assert s["speedup"] == pytest.approx(sum(c["dense_s"] for c in data["cases"]) / s["sparse_s"])
    assert s["psnr_min"] == min(c["psnr_min"] for c in data["cases"])
    assert s["density_mean"] == pytest.approx(np.mean([c["density"] for c in data["cases"]]))

    # the same videos straight from diffusers: same seed and settings, dense and with the profile applied
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(saved / "tiny-wan"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=80, num_frames=9, num_inference_steps=2, guidance_scale=args.guidance)

    def video() -> np.ndarray:
        return pipe(PROMPTS[1], generator=torch.Generator().manual_seed(3), output_type="np", **kw).frames[0]

    np.testing.assert_array_equal(np.clip(video(), 0, 1), result.cases[1].dense.frames)
    with dit_sparse.apply(pipe, Profile.load(saved / "window.json")):
        np.testing.assert_array_equal(np.clip(video(), 0, 1), result.cases[1].sparse.frames)


def test_bad_input_is_a_clear_error(saved, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o.json")]
    with pytest.raises(SystemExit, match=r"profile has 3 layers × 2 heads.*transformer has 2 × 2"):
        main(_eval_args(saved, "other.json", *out))
    with pytest.raises(SystemExit, match="no profile ships"):
        main(["eval", "--model", str(saved / "tiny-wan"), *ARGS, *out])
    # a missing or broken profile file fails before the model loads (the model does not exist here)
    (tmp_path / "broken.json").write_text("{not json")
    for name, message in (
        ("missing.json", "profile file not found"),
        (str(tmp_path / "broken.json"), "not valid JSON"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(["eval", "--model", "no/such-model", "--profile", str(saved / name), *ARGS, *out])
    with pytest.raises(SystemExit, match="cannot load 'no/such-model' offline"):
        main(["eval", "--model", "no/such-model", *ARGS, *out])
    assert not (tmp_path / "o.json").exists()  # nothing written for a failed run
    for bad, message in (
        (["--steps", "0"], "must be >= 1"),
        (["--frames", "x"], "is not an integer"),
        (["--prompts", "  "], "a prompt must not be empty"),
        (["--seeds", "one"], "invalid int value"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(_eval_args(saved, "window.json", *bad, *out))
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_eval_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--profile", "--prompts", "--seeds", "--steps", "--frames", "--out", "--force"):
        assert opt in text
