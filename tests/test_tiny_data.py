"""Procedural clips and the detector that checks a generated video against its prompt."""

from __future__ import annotations

import pytest
import torch

from dit_sparse.pipelines.tiny_data import COLOURS, ClipSpec, all_specs, detect, make_clip


@pytest.mark.parametrize("spec", [*all_specs()[::7], ClipSpec("white", "triangle", "up")])
@pytest.mark.parametrize(("frames", "height", "width"), [(17, 64, 64), (9, 48, 80)])
def test_detector_reads_back_what_was_drawn(spec, frames, height, width):
    video = make_clip(spec, frames, height, width, seed=len(spec.prompt) * frames)
    det = detect(video)
    assert det.matches(spec), f"{spec.prompt}: detected {det}"
    assert 0.01 < det.blob_fraction < 0.5


def test_clips_are_reproducible_and_seed_dependent():
    spec = ClipSpec("red", "circle", "left")
    a = make_clip(spec, 9, 32, 32, seed=1)
    assert torch.equal(a, make_clip(spec, 9, 32, 32, seed=1))
    assert not torch.equal(a, make_clip(spec, 9, 32, 32, seed=2))
    assert a.shape == (9, 3, 32, 32) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_detector_finds_nothing_in_a_static_or_noise_free_video():
    still = torch.full((9, 3, 32, 32), 0.3)
    assert detect(still).colour is None and detect(still).blob_fraction == 0.0
    # channels-last input is accepted too
    spec = ClipSpec("blue", "square", "down")
    assert detect(make_clip(spec, 17, 64, 64).permute(0, 2, 3, 1)).matches(spec)


def test_prompts_parse_and_bad_prompts_are_clear():
    assert ClipSpec.parse("A Yellow Square moving right") == ClipSpec("yellow", "square", "right")
    with pytest.raises(ValueError, match="must name a colour"):
        ClipSpec.parse("a purple blob dancing")
    assert len(all_specs()) == len(COLOURS) * 3 * 4


@pytest.mark.parametrize("height,width", [(48, 80), (80, 48)])
def test_moving_clip_keeps_the_whole_path_inside_a_non_square_frame(height, width):
    from dit_sparse.pipelines.tiny_data import BACKGROUND, moving_clip

    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1)
    for i, spec in enumerate(all_specs()[::5]):
        clip = moving_clip(spec, 9, height, width, seed=i, speed=2.0, radius=(6.0, 8.0))
        assert clip.shape == (9, 3, height, width)
        area = ((clip - bg).abs().amax(dim=1) > 0.05).sum(dim=(1, 2))  # shape pixels per frame
        # never clipped by the border: the same number of pixels in every frame, up to rasterisation
        assert int(area.min()) > 0 and int(area.max() - area.min()) <= 0.2 * int(area.max()), (spec, area)
        assert torch.equal(clip, moving_clip(spec, 9, height, width, seed=i, speed=2.0, radius=(6.0, 8.0)))
        assert detect(clip).matches(spec)
