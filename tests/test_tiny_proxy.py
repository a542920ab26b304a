"""The developer harness ``scripts/tiny_proxy.py``: its data is what it claims, its proxy latent keeps what the
detector reads, and a run of a few steps works for both transformer classes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dit_sparse.pipelines.tiny_data import all_specs, detect, moving_clip

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "tiny_proxy.py"
_spec = importlib.util.spec_from_file_location("tiny_proxy", _PATH)
assert _spec is not None and _spec.loader is not None
proxy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proxy)


def _centroid(frame: torch.Tensor) -> tuple[float, float]:
    m = (frame - torch.tensor([0.12, 0.12, 0.14]).view(3, 1, 1)).abs().amax(0) > 0.1
    yy, xx = torch.nonzero(m, as_tuple=True)
    return float(yy.float().mean()), float(xx.float().mean())


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_moving_clip_moves_exactly_speed_px_per_frame(direction):
    spec = next(s for s in all_specs() if s.direction == direction and s.shape == "square")
    clip = moving_clip(spec, 13, 64, 64, seed=5, speed=2.0, radius=(6.0, 8.0))
    first, last = _centroid(clip[0]), _centroid(clip[-1])
    dy, dx = last[0] - first[0], last[1] - first[1]
    want = {"left": (0, -24), "right": (0, 24), "up": (-24, 0), "down": (24, 0)}[direction]
    assert abs(dy - want[0]) <= 1.0 and abs(dx - want[1]) <= 1.0, (dy, dx)
    assert clip.min() >= 0 and clip.max() <= 1


def test_pooled_latent_keeps_colour_and_direction():
    """Encode (avg-pool) then decode (nearest upsampling): the detector still reads the training clips."""
    fake = type("P", (), {})()
    fake.mean, fake.std = torch.zeros(1, 3, 1, 1, 1), torch.ones(1, 3, 1, 1, 1)
    specs = all_specs()[::3]
    ok = 0
    for i, spec in enumerate(specs):
        clip = moving_clip(spec, 17, 64, 64, seed=i)
        z = proxy.pool(clip)
        assert z.shape == (3, 5, 8, 8)
        ok += detect(proxy.Proxy.decode(fake, z)).matches(spec)
    assert ok == len(specs)


@pytest.mark.parametrize("arch", ["wan", "cog"])
def test_a_short_run_trains_evaluates_and_is_continued_from_its_weights(arch, capsys, tmp_path):
    from safetensors.torch import load_file

    argv = ["--arch", arch, "--size", "16", "--lf", "2", "--eval-lf", "2", "--batch", "2"]
    argv += ["--clips-per-prompt", "1", "--eval-every", "1", "--eval-steps", "1", "--dirs", "left,right"]
    argv += ["--frame-noise", "0.5" if arch == "wan" else "0", "--speed", "1"]
    saved = tmp_path / "run.safetensors"
    assert proxy.main([*argv, "--steps", "2", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.count("eval 2 latent frames: ") == 2 and "/12 " in out
    weights = load_file(saved)  # safetensors, not pickle
    assert weights and all(v.is_floating_point() for v in weights.values())
    # evaluate-only from the saved weights: the same model, so the same samples as the trained run's last check
    assert proxy.main([*argv, "--steps", "0", "--init", str(saved)]) == 0
    again = capsys.readouterr().out
    assert again.strip() == out.strip().splitlines()[-1].strip()


def test_noise_levels_are_shared_or_per_frame_as_asked():
    noise_levels = proxy.noise_levels
    g = torch.Generator().manual_seed(0)
    shared = noise_levels(64, 5, 0.0, g)
    own = noise_levels(64, 5, 1.0, g)
    mixed = noise_levels(4000, 3, 0.25, g)
    for s in (shared, own, mixed):
        assert ((s > 0) & (s < 1)).all()
    assert (shared == shared[:, :1]).all()
    assert (own != own[:, :1]).any(dim=1).all()
    share = (mixed != mixed[:, :1]).any(dim=1).float().mean().item()
    assert 0.22 < share < 0.28
