"""Procedural training clips for the bundled tiny model, and the detector that checks what a model generated.

A clip shows one coloured shape (circle, square or triangle) moving in a straight line (left, right, up or down) on
a plain background; its prompt says so: "a red circle moving left". Everything is a pure function of its arguments
(no global RNG), so data sets are reproducible from a seed.

:func:`detect` reads a video back: the moving blob is where pixels differ from the per-pixel temporal median (the
background), its colour is the palette colour most of its pixels are nearest to, and its direction is the dominant axis of
its centroid's displacement between the first and last third of the clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "white": (0.97, 0.97, 0.97),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
BACKGROUND = (0.12, 0.12, 0.14)
VOCAB = ("a", "moving", *COLOURS, *SHAPES, *DIRECTIONS)


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @classmethod
    def parse(cls, prompt: str) -> ClipSpec:
        words = prompt.lower().split()
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        direction = next((w for w in words if w in DIRECTIONS), None)
        if colour is None or shape is None or direction is None:
            raise ValueError(
                f"prompt {prompt!r} must name a colour {sorted(COLOURS)}, a shape {list(SHAPES)} and a direction "
                f"{list(DIRECTIONS)}, e.g. 'a red circle moving left'"
            )
        return cls(colour, shape, direction)


def all_specs() -> list[ClipSpec]:
    return [ClipSpec(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def eval_prompts(n: int) -> list[ClipSpec]:
    """``n`` prompts spread over colours, shapes and directions (deterministic): the training script's detector
    check, and the profiler's calibration prompts for a trained bundled model."""
    specs = all_specs()
    step = max(len(specs) // n, 1)
    return [specs[(i * step + i // 4) % len(specs)] for i in range(n)]


def _shape_mask(
    shape: str, yy: torch.Tensor, xx: torch.Tensor, cy: float, cx: float, r: float
) -> torch.Tensor:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)
    if shape == "triangle":  # apex up: inside if below the two slanted edges and above the base
        return (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def make_clip(
    spec: ClipSpec, frames: int, height: int, width: int, seed: int = 0, travel_frames: int | None = None
) -> torch.Tensor:
    """``(frames, 3, height, width)`` float in [0, 1]. The seed picks the start point, size and speed.

    The shape crosses 45–60 % of the frame in ``travel_frames`` frames (default: the clip's length, path centred);
    with ``travel_frames`` > ``frames`` the clip shows a random stretch of that slower path, so clips of every
    length share one speed range.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(4, generator=g)
    r = float(min(height, width) * (0.14 + 0.06 * u[0]))  # shape radius in pixels
    dy, dx = DIRECTIONS[spec.direction]
    travel = 0.45 + 0.15 * float(u[1])  # fraction of the frame crossed over the clip
    # start so the path stays inside the frame; the perpendicular coordinate is random
    along_start = 0.5 - travel / 2
    span = max(travel_frames or frames, frames)
    if span > frames:
        shown = travel * (frames - 1) / max(span - 1, 1)
        along_start += (travel - shown) * float(u[3])
        travel = shown
    across = 0.3 + 0.4 * float(u[2])
    centres = []
    for t in range(frames):
        pos = along_start + travel * t / max(frames - 1, 1)  # 0..1 along the motion axis
        if dx:
            centres.append((across * height, (pos if dx > 0 else 1 - pos) * width))
        else:
            centres.append(((pos if dy > 0 else 1 - pos) * height, across * width))
    return _render(spec, centres, r, height, width, pixel_centre=0.0)


def moving_clip(
    spec: ClipSpec,
    frames: int,
    height: int,
    width: int,
    seed: int = 0,
    speed: float = 2.0,
    radius: tuple[float, float] = (8.0, 11.0),
) -> torch.Tensor:
    """``(frames, 3, height, width)`` float in [0, 1]: the shape moves exactly ``speed`` px per frame.

    Its radius is uniform in ``radius`` (px); the start along the motion is uniform over the positions that keep the
    whole path inside the frame (centred when none does), the position across it uniform inside the frame. At
    2 px per frame the shape moves one latent cell per latent frame of an 8× spatial / 4× temporal VAE, the speed
    at which the tiny transformer learned direction (docs/tiny-model-training-notes.md).
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(3, generator=g)
    r = radius[0] + (radius[1] - radius[0]) * float(u[0])
    dy, dx = DIRECTIONS[spec.direction]
    along, across_size = (width, height) if dx else (height, width)
    length = speed * (frames - 1)
    lo, hi = r, along - r - length
    start = lo + (hi - lo) * float(u[1]) if hi > lo else (along - length) / 2
    across = r + (across_size - 2 * r) * float(u[2])
    centres = []
    for t in range(frames):
        pos = start + speed * t
        if dx:
            centres.append((across, pos if dx > 0 else width - pos))
        else:
            centres.append((pos if dy > 0 else height - pos, across))
    return _render(spec, centres, r, height, width, pixel_centre=0.5)


def centred_clip(
    spec: ClipSpec,
    frames: int,
    height: int,
    width: int,
    seed: int = 0,
    radius: tuple[float, float] = (0.126, 0.154),
    travel: float = 0.5,
) -> torch.Tensor:
    """``(frames, 3, height, width)`` float in [0, 1]: the shape crosses ``travel`` of the frame at constant speed on
    a path centred in the frame (the middle row or column), the same for every clip of a prompt; the seed picks only
    its radius, uniform in ``radius`` × the shorter side. Everything scales with the canvas, so clips of two sizes
    and lengths show the same motion in canvas-relative space and time (the bundled model's training data)."""
    g = torch.Generator().manual_seed(seed)
    u = float(torch.rand(1, generator=g))
    r = min(height, width) * (radius[0] + (radius[1] - radius[0]) * u)
    dy, dx = DIRECTIONS[spec.direction]
    along = width if dx else height
    length = travel * along
    centres = []
    for t in range(frames):
        pos = (along - length) / 2 + length * t / max(frames - 1, 1)
        if dx:
            centres.append((height / 2, pos if dx > 0 else width - pos))
        else:
            centres.append((pos if dy > 0 else height - pos, width / 2))
    return _render(spec, centres, r, height, width, pixel_centre=0.5)


def _render(
    spec: ClipSpec, centres: list[tuple[float, float]], r: float, height: int, width: int, pixel_centre: float
) -> torch.Tensor:
    """``(len(centres), 3, height, width)``: the spec's shape of radius ``r`` at each frame's ``(cy, cx)`` on the
    background; pixel ``i`` sits at coordinate ``i + pixel_centre``."""
    yy = torch.arange(height, dtype=torch.float32).view(-1, 1) + pixel_centre
    xx = torch.arange(width, dtype=torch.float32).view(1, -1) + pixel_centre
    colour = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1)
    bg = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, height, width)
    out = torch.empty(len(centres), 3, height, width)
    for t, (cy, cx) in enumerate(centres):
        out[t] = torch.where(_shape_mask(spec.shape, yy, xx, cy, cx, r).unsqueeze(0), colour, bg)
    return out


@dataclass(frozen=True)
class Detection:
    colour: str | None
    direction: str | None
    blob_fraction: float  # mean fraction of pixels in the moving blob (0 means nothing was found)

    def matches(self, spec: ClipSpec) -> bool:
        return self.colour == spec.colour and self.direction == spec.direction


def detect(video: torch.Tensor, threshold: float = 0.15) -> Detection:
    """Read colour and direction of the moving blob in ``(F, 3, H, W)`` float [0, 1] (or ``(F, H, W, 3)``)."""
    if video.dim() != 4:
        raise ValueError(f"expected a video (F, 3, H, W) or (F, H, W, 3), got shape {tuple(video.shape)}")
    if video.shape[1] != 3 and video.shape[-1] == 3:
        video = video.permute(0, 3, 1, 2)
    video = video.float()
    frames = video.shape[0]
    background = video.median(
        dim=0
    ).values  # (3, H, W): the shape moves, so most frames show background there
    diff = (video - background).abs().amax(dim=1)  # (F, H, W)
    blob = diff > threshold
    frac = float(blob.float().mean())
    if frac == 0.0 or frames < 3:
        return Detection(None, None, frac)
    # colour: every blob pixel votes for its nearest palette colour; votes for the background colour are dropped
    # (where the shape overlaps itself in most frames the median is the shape's colour, so some "blob" pixels
    # are really background)
    pixels = video.permute(0, 2, 3, 1)[blob]  # (P, 3)
    palette = torch.tensor([*COLOURS.values(), BACKGROUND])  # (C+1, 3)
    votes = torch.cdist(pixels, palette).argmin(dim=1)
    counts = torch.bincount(votes, minlength=len(palette))[: len(COLOURS)]
    if int(counts.sum()) == 0:
        return Detection(None, None, frac)
    colour = list(COLOURS)[int(counts.argmax())]
    h, w = blob.shape[1:]
    yy = torch.arange(h, dtype=torch.float32).view(1, -1, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, -1)
    mass = blob.float().sum(dim=(1, 2)).clamp_min(1.0)
    cy = (blob * yy).sum(dim=(1, 2)) / mass  # (F,)
    cx = (blob * xx).sum(dim=(1, 2)) / mass
    seen = blob.any(dim=2).any(dim=1)
    third = max(frames // 3, 1)
    first, last = seen[:third], seen[-third:]
    if not bool(first.any()) or not bool(last.any()):
        return Detection(colour, None, frac)
    dy = float(cy[-third:][last].mean() - cy[:third][first].mean())
    dx = float(cx[-third:][last].mean() - cx[:third][first].mean())
    if abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return Detection(colour, direction, frac)
