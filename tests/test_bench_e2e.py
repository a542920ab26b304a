"""``dit-sparse bench e2e``: the real configs are the published models, the tiny CPU run writes an honest JSON record
for every requested model / pattern / density, and bad options fail clearly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from dit_sparse.benchmarks import e2e as bench
from dit_sparse.benchmarks.e2e_args import GPU_MODELS, MODELS, TINY, TINY_MODELS
from dit_sparse.cli import main

TINY_ARGS = ["bench", "e2e", "--tiny", "--reps", "1", "--warmup", "0"]

# DESIGN §7/§8: self-attention tokens and heads × head_dim per model; parameters of the published checkpoints
# (billions) and their self-attention layers
DOCUMENTED = {
    "wan2.1-1.3b-480p": (32_760, 12, 128, 1.42, 30),
    "wan2.1-14b-720p": (75_600, 40, 128, 14.29, 40),
    "hunyuanvideo-720p": (119_056, 24, 128, 12.82, 60),
    "cogvideox-5b": (17_776, 48, 64, 5.57, 42),
    "flux-1024": (4_608, 24, 128, 11.90, 57),
}


def _run(tmp_path: Path, *extra: str) -> dict:
    assert main([*TINY_ARGS, *extra, "--out", str(tmp_path)]) == 0
    (path,) = sorted(tmp_path.glob("e2e-cpu-*.json"))
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text())


def test_real_configs_are_the_published_models():
    """Built on the meta device (no memory): parameter count, layers, heads and token count of each real model."""
    from dit_sparse.pipelines import family_for

    assert [m.name for m in GPU_MODELS] == list(DOCUMENTED)
    for spec in GPU_MODELS:
        tokens, heads, head_dim, params_b, layers = DOCUMENTED[spec.name]
        assert (spec.seq_len, spec.heads, spec.head_dim) == (tokens, heads, head_dim), spec.name
        import diffusers

        with torch.device("meta"):
            model = getattr(diffusers, spec.transformer_class)(**dict(spec.config))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(params_b, abs=0.01), (
            spec.name
        )
        fam = family_for(model)
        assert len(fam.self_attention_modules(model)) == layers
        assert fam.fingerprint(model).num_heads == heads
    assert [m.batch for m in GPU_MODELS] == [2, 2, 1, 2, 1]  # CFG batch for Wan and CogVideoX


@pytest.mark.parametrize("spec", TINY_MODELS, ids=lambda s: s.name)
def test_inputs_give_the_grid_the_family_reads(spec):
    """make_inputs builds what the pipeline passes; the family adapter reads the same grid and text span."""
    from dit_sparse.pipelines import family_for

    model = bench.build_transformer(spec, "cpu", torch.float32, seed=0)
    inputs = bench.make_inputs(spec, model, spec.batch, "cpu", torch.float32, seed=1)
    got = family_for(model).read_inputs(model, (), inputs)
    assert got.grid == spec.grid and got.num_text == spec.num_text and got.batch_size == spec.batch
    assert got.text_first == bench._mask_layout(spec, 32).text_first


def test_fit_pattern_finds_the_closest_density():
    """The bisection search agrees with trying every candidate of the same family on a small layout."""
    from dit_sparse.patterns import MaskLayout

    layout = MaskLayout(grid=(6, 8, 12), num_text=0, block_size=16)
    for target in (0.3, 0.15):
        params, got = bench.fit_pattern("window", layout, target, "cpu")
        assert got == pytest.approx(bench.mask_density("window", params, layout, "cpu"))
        # the same family: temporal radius f, spatial radius r scaled to the 8×12 aspect
        family = [{"f": f, "h": round(r * 8 / 12), "w": r} for f in range(6) for r in range(12)]
        brute = min(abs(bench.mask_density("window", p, layout, "cpu") - target) for p in family)
        assert abs(got - target) <= brute + 1e-12
        params, got = bench.fit_pattern("radial", layout, target, "cpu")
        assert got == bench.mask_density("radial", params, layout, "cpu")
    assert bench.fit_pattern("draft", layout, 0.2, "cpu")[0] == {"budget": 0.2}


def test_tiny_run_has_every_entry_and_the_profile_density(tmp_path, capsys):
    data = _run(tmp_path, "--models", "wan2.1-1.3b-480p,hunyuanvideo-720p", "--densities", "0.5")
    out = capsys.readouterr().out
    assert bench.CPU_NOTE in out and "not GPU performance" in bench.CPU_NOTE
    assert data["benchmark"] == "dit-sparse bench e2e" and data["device"] == "cpu" and data["gpu"] is None
    assert data["note"] == bench.CPU_NOTE
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["diffusers"]
    assert isinstance(data["command"], str) and data["argv"]
    st = data["settings"]
    assert st["tiny"] and st["dtype"] == "fp32" and st["block_size"] == 32 and st["densities"] == [0.5]
    assert (st["schedule_steps"], st["dense_steps"]) == (50, 10)

    assert [m["name"] for m in data["models"]] == ["wan2.1-1.3b-480p", "hunyuanvideo-720p"]
    for m in data["models"]:
        spec = TINY[m["name"]]
        assert m["tiny"] and m["error"] is None and m["seq_len"] == spec.seq_len and m["batch"] == spec.batch
        assert m["self_attention_layers"] == 2
        rows = {r["config"]: r for r in data["rows"] if r["model"] == m["name"]}
        assert set(rows) == {"dense", "dense-cudnn", "dense-hooked", "radial@0.5", "window@0.5", "draft@0.5"}
        dense, hooked = rows["dense"], rows["dense-hooked"]
        assert rows["dense-cudnn"]["skipped"] == "needs CUDA (CPU run)"
        assert dense["step_ms"] > 0 and dense["attention_ms"] is None and dense["error"] is None
        assert 0 < hooked["attention_ms"] < hooked["step_ms"]  # measured around the model's own attention
        assert hooked["hook_overhead_ms"] == pytest.approx(hooked["step_ms"] - dense["step_ms"])
        for pattern in ("radial", "window", "draft"):
            r = rows[f"{pattern}@0.5"]
            assert r["error"] is None and r["skipped"] is None, (pattern, r)
            assert r["requested_density"] == 0.5 and r["compile"] is False
            assert r["pattern_desc"].startswith(pattern + "(")
            assert 0 < r["attention_ms"] < r["step_ms"] and r["mask_build_ms"] > 0
            if pattern == "draft":
                assert 0.5 <= r["density"] < 1 and r["draft_ms"] > 0 and r["fit_density"] is None
            else:  # the run computed exactly the fitted profile's mask
                assert r["density"] == pytest.approx(r["fit_density"], abs=1e-12)
                assert abs(r["density"] - 0.5) <= 0.25 and r["draft_ms"] is None
            assert r["speedup_vs_dense"] == pytest.approx(dense["step_ms"] / r["step_ms"])
            assert r["attention_speedup"] == pytest.approx(hooked["attention_ms"] / r["attention_ms"])
            s = r["schedule"]
            expected = 10 * hooked["step_ms"] + 40 * r["step_ms"] + r["mask_build_ms"]
            assert s["total_s"] == pytest.approx(expected / 1e3)
            assert s["speedup_vs_dense"] == pytest.approx(50 * dense["step_ms"] / expected)
            assert s["speedup_vs_cudnn"] is None
    assert "schedule" in out
    (md,) = tmp_path.glob("e2e-cpu-*.md")
    assert bench.CPU_NOTE in md.read_text()


def test_compile_rows_trace_through_the_plugin(tmp_path):
    """--compile times every configuration again under torch.compile ('eager' backend: dynamo tracing without code
    generation, fast on the CPU); the compiled sparse run computes the same mask."""
    data = _run(
        tmp_path,
        *("--models", "wan2.1-1.3b-480p", "--patterns", "window", "--densities", "0.5"),
        *("--compile", "--compile-backend", "eager"),
    )
    assert data["settings"]["compile"] and data["settings"]["compile_backend"] == "eager"
    rows = {(r["config"], r["compile"]): r for r in data["rows"]}
    assert set(rows) == {
        (c, m) for c in ("dense", "dense-cudnn", "dense-hooked", "window@0.5") for m in (False, True)
    }
    for config in ("dense", "dense-hooked", "window@0.5"):
        eager, compiled = rows[(config, False)], rows[(config, True)]
        assert eager["error"] is None and compiled["error"] is None, compiled["error"]
        assert eager["compile_s"] is None and compiled["compile_s"] > 0
        assert compiled["warmup_steps"] == bench.COMPILED_MIN_WARMUP and compiled["step_ms"] > 0
        assert compiled["attention_ms"] is None  # the event timer is not used under torch.compile
        assert compiled["density"] == eager["density"]
        assert compiled["speedup_vs_dense"] == pytest.approx(
            rows[("dense", True)]["step_ms"] / compiled["step_ms"]
        )


def test_unreachable_density_is_skipped_with_the_reason(tmp_path):
    """FLUX has one frame: radial is dense there, so a 0.1 target is not timed, and says why."""
    data = _run(tmp_path, "--models", "flux-1024", "--patterns", "radial", "--densities", "0.1")
    (row,) = [r for r in data["rows"] if r["config"] == "radial@0.1"]
    assert "cannot reach density 0.1" in row["skipped"] and row["step_ms"] is None and row["error"] is None
    assert row["fit_density"] > 0.5


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """gpu_check.sh stops a stage with SIGINT at its time limit: the rows measured before must reach the JSON, the
    one in progress says it was interrupted, and the command fails."""
    real_fit = bench.fit_pattern

    def fit(name, *args, **kwargs):
        if name == "window":  # the second pattern: radial is measured, window is in progress
            raise KeyboardInterrupt
        return real_fit(name, *args, **kwargs)

    monkeypatch.setattr(bench, "fit_pattern", fit)
    args = ["--models", "wan2.1-1.3b-480p,flux-1024", "--patterns", "radial", "window", "--densities", "0.5"]
    assert main([*TINY_ARGS, *args, "--out", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("e2e-cpu-*.json")
    data = json.loads(path.read_text())
    assert data["interrupted"].startswith("interrupted after")
    assert [m["name"] for m in data["models"]] == ["wan2.1-1.3b-480p"]  # flux never started
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "dense-cudnn", "dense-hooked", "radial@0.5", "window@0.5"]
    assert (
        rows["dense"]["step_ms"] > 0
        and rows["radial@0.5"]["step_ms"] > 0
        and rows["radial@0.5"]["error"] is None
    )
    assert rows["window@0.5"]["error"] == "interrupted before it was measured"
    assert "**interrupted after" in path.with_suffix(".md").read_text()
    assert "INTERRUPTED: interrupted after" in capsys.readouterr().out


def test_bad_options_fail_clearly(tmp_path, capsys):
    for bad, message in (
        (["--models", "sd9"], "unknown model 'sd9'"),
        (["--densities", "0"], "outside (0, 1]"),
        (["--patterns", "stripe"], "unknown pattern 'stripe'"),
        (["--block-size", "48"], "invalid choice"),
    ):
        with pytest.raises(SystemExit) as exc:
            main([*TINY_ARGS, *bad, "--out", str(tmp_path)])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert main([*TINY_ARGS, "--dense-steps", "60", "--out", str(tmp_path)]) == 2
    assert "--dense-steps must be in 0..--schedule-steps (50)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "e2e", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        bench.resolve_settings(argparse.Namespace(models=["nope"], tiny=True))
    assert not list(tmp_path.iterdir())  # nothing written
    assert set(MODELS) == set(TINY)  # --tiny maps every model name to a tiny config
