"""What the demo computes, without any gradio: settings, profile choice, the density knob, pictures, one comparison.

The gradio layer (:mod:`dit_sparse.app.ui`) only wires widgets to these functions, so they are tested directly on
the bundled tiny model. Generation goes through :mod:`dit_sparse.generate` (``run_mode``, ``frame_metrics``,
``write_mp4``, ``side_by_side``): the demo runs exactly what ``dit-sparse generate`` runs.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..generate import RunResult, frame_metrics, load_pipeline, run_mode, side_by_side, write_mp4
from ..patterns import MaskLayout, build_pattern, force_text_dense
from ..profile import MAX_PROFILE_BYTES, HeadSpec, Profile, ProfileError

DENSE_CHOICE = "dense"
UPLOAD_CHOICE = "uploaded JSON"
# the bundled model knows only "a {colour} {shape} moving {direction}" (pipelines/tiny_data.py)
EXAMPLE_PROMPTS = [
    "a red circle moving left",
    "a blue square moving up",
    "a yellow triangle moving right",
    "a white circle moving down",
]
PSNR_PLOT_CAP = 100.0  # identical frames have infinite PSNR; the plot shows them at this value
Progress = Callable[..., Any]


class DemoError(ValueError):
    """A problem the user can fix (bad profile, bad settings); shown in the UI as a message, not a traceback."""


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """One generation request. Defaults are demo-sized: dense + sparse take seconds on a 2-core CPU, on a canvas
    big enough (33 frames × 128², 2,304 video tokens, 36 blocks of 64) and with steps enough (8) that the shipped
    profile's windows and its dense warm-up steps leave sparse work to see."""

    prompt: str = EXAMPLE_PROMPTS[0]
    seed: int = 0
    steps: int = 8
    height: int = 128
    width: int = 128
    frames: int = 33
    guidance: float = 1.0  # 1 = no classifier-free guidance: half the cost of the CLI's 5.0 (a demo default)
    negative_prompt: str = ""

    def namespace(self) -> argparse.Namespace:
        """The ``args`` object :func:`dit_sparse.generate.run_mode` reads."""
        return argparse.Namespace(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=int(self.seed),
            steps=int(self.steps),
            height=int(self.height),
            width=int(self.width),
            frames=int(self.frames),
            guidance=float(self.guidance),
        )

    def check(self) -> None:
        if not self.prompt.strip():
            raise DemoError("the prompt is empty: type what the video should show")
        for name in ("steps", "height", "width", "frames"):
            if int(getattr(self, name)) < 1:
                raise DemoError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------------------------ profiles
def shipped_profiles() -> list[str]:
    """File names of the profiles that ship inside the package."""
    root = resources.files("dit_sparse.profiles")
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".json"))


def read_shipped(name: str) -> Profile:
    if name not in shipped_profiles():
        raise DemoError(f"no shipped profile named {name!r}; shipped: {shipped_profiles()}")
    text = resources.files("dit_sparse.profiles").joinpath(name).read_text(encoding="utf-8")
    return Profile.loads(text, source=f"shipped profile {name}")


def read_uploaded(path: str | Path | None, limit: int = MAX_PROFILE_BYTES) -> Profile:
    """An uploaded profile: size-limited before it is read, then validated like any profile (JSON only)."""
    if path is None or not str(path):
        raise DemoError(
            f"profile {UPLOAD_CHOICE!r} is selected but no file was uploaded: upload a profile JSON"
        )
    p = Path(path)
    size = p.stat().st_size
    if size > limit:
        raise DemoError(f"the uploaded profile is {size} bytes; the limit is {limit} bytes")
    try:
        return Profile.loads(p.read_bytes(), source=f"uploaded profile {p.name}")
    except ProfileError as exc:
        raise DemoError(str(exc)) from None


def choose_profile(choice: str, upload: str | Path | None, pipe: Any, extra: dict[str, Profile]) -> Profile:
    """``dense``, a shipped file name, a profile given on the command line (``extra``), or the uploaded file;
    checked against the pipeline's transformer so a wrong profile is a message, not a crash mid-generation."""
    if choice == DENSE_CHOICE:
        return Profile.dense(pipe.transformer)
    if choice == UPLOAD_CHOICE:
        profile = read_uploaded(upload)
    elif choice in extra:
        profile = extra[choice]
    else:
        profile = read_shipped(choice)
    from ..pipelines import UnsupportedModelError, family_for

    try:
        family = family_for(pipe.transformer)
        profile.check_compatible(family.fingerprint(pipe.transformer), family.name)
    except (ProfileError, UnsupportedModelError) as exc:
        raise DemoError(f"profile {choice!r} does not fit this model: {exc}") from None
    return profile


# ------------------------------------------------------------------------------------------------ layout + knob
def demo_layout(pipe: Any, settings: Settings, block_size: int) -> MaskLayout:
    """The self-attention token layout a generation at ``settings`` will have, predicted from the pipeline's VAE
    compression factors and the transformer's patch size; joint-attention text counts where the transformer's config
    names its length (``max_text_seq_length``, CogVideoX), else only video tokens are counted."""
    spatial = getattr(pipe, "vae_scale_factor_spatial", None)
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    if spatial is None or temporal is None:
        raise DemoError(
            f"cannot predict the latent grid of a {type(pipe).__name__} (it has no vae_scale_factor_spatial/"
            "temporal); the mask picture and the density knob need it. Generation itself still works"
        )
    from ..pipelines import family_for

    try:  # each family knows its transformer's patch (an int, a list, or a separate temporal patch)
        family = family_for(pipe.transformer)
        patch = family.patch_size(pipe.transformer) or [1]
    except TypeError as err:  # UnsupportedModelError
        raise DemoError(f"cannot predict the latent grid: {err}") from err
    # joint attention (text inside self-attention, e.g. CogVideoX): the text length its pipeline pads to
    num_text = 0
    if family.text_position != "none":
        num_text = int(getattr(pipe.transformer.config, "max_text_seq_length", 0) or 0)
    pt, ph, pw = patch if len(patch) == 3 else (1, patch[0], patch[-1])
    frames = (int(settings.frames) - 1) // int(temporal) + 1
    grid = (
        # a temporal patch that does not divide the latent frames: the pipeline pads them (CogVideoX 1.5)
        max(1, -(-frames // pt)),
        max(1, int(settings.height) // int(spatial) // ph),
        max(1, int(settings.width) // int(spatial) // pw),
    )
    return MaskLayout(grid, num_text, family.text_position == "first", block_size)


def head_density(mask: torch.Tensor, layout: MaskLayout) -> float:
    """Fraction of token pairs a ``[nB, nB]`` block mask computes (partial last block weighted by its size)."""
    from ..kernels import token_density

    return float(token_density(mask, layout.block_size, layout.seq_len, layout.seq_len))


def _scaled_window(base: dict[str, Any], t: float) -> dict[str, int]:
    f, h, w = (int(base.get(k, 0)) for k in ("f", "h", "w"))
    if f == h == w == 0:
        f = h = w = 1
    return {"f": round(t * f), "h": round(t * h), "w": round(t * w)}


def fit_window(base: dict[str, Any], layout: MaskLayout, target: float) -> tuple[dict[str, int], float]:
    """The largest window of the same shape as ``base`` (all sides scaled by one factor) whose density on
    ``layout`` is at most ``target``; the smallest (``0,0,0``: own token's neighbourhood only) if none is."""
    longest = max(layout.grid)
    smallest = min(v for v in (*_scaled_window(base, 1.0).values(), 1) if v > 0)
    candidates: list[dict[str, int]] = []
    for i in range(0, 4 * longest + 1):
        cand = _scaled_window(base, i / (4 * smallest))
        if cand not in candidates:
            candidates.append(cand)
        if all(v >= g for v, g in zip(cand.values(), layout.grid)):
            break  # already covers the whole grid

    def density(params: dict[str, int]) -> float:  # as the kernel sees it: text rows/columns dense
        mask = build_pattern("window", params, layout, "cpu")[None, None]
        return head_density(force_text_dense(mask, layout)[0, 0], layout)

    best = candidates[0]
    best_d = density(best)
    for cand in candidates[1:]:  # density grows with the window: stop at the first one over the target
        d = density(cand)
        if d > target + 1e-9:
            break
        best, best_d = cand, d
    return best, best_d


def retarget(profile: Profile, layout: MaskLayout, target: float | None) -> Profile:
    """A copy of ``profile`` whose window heads are resized to a density target on ``layout`` (None or 0: as is).

    Dense heads, the step schedule and the block size stay as they are: the knob changes how far each window
    reaches, not which heads are sparse."""
    if not target or target <= 0:
        return profile
    if target > 1:
        raise DemoError(f"the density target is a fraction in (0, 1], got {target}")
    layout = replace(layout, block_size=profile.block_size)
    fitted: dict[tuple[tuple[str, Any], ...], tuple[dict[str, int], float]] = {}
    layers = []
    for heads in profile.layers:
        new_heads = []
        for spec in heads:
            if spec.pattern != "window":
                new_heads.append(spec)
                continue
            key = tuple(sorted(spec.params.items()))
            if key not in fitted:
                fitted[key] = fit_window(spec.params, layout, target)
            params, density = fitted[key]
            new_heads.append(HeadSpec("window", dict(params), round(density, 4), None))
        layers.append(new_heads)
    out = replace(profile, layers=layers, summary={}, calibration={**profile.calibration})
    out.calibration["demo_density_target"] = target
    out.validate()
    return out


def has_windows(profile: Profile) -> bool:
    return any(s.pattern == "window" for heads in profile.layers for s in heads)


def _is_dynamic(pattern: str) -> bool:
    try:
        from ..patterns import is_dynamic
    except ImportError:  # a dit-sparse without dynamic patterns
        return False
    return bool(is_dynamic(pattern))


def density_table(profile: Profile, layout: MaskLayout) -> np.ndarray:
    """``(layers, heads)`` fraction of attention each head computes on its sparse steps (dense layers: 1).
    Dynamic heads (their mask depends on q/k) are NaN: their density is only known during generation."""
    layout = replace(layout, block_size=profile.block_size)
    out = np.ones((len(profile.layers), profile.fingerprint.num_heads), dtype=np.float64)
    for i, heads in enumerate(profile.layers):
        if i in profile.schedule.dense_layers:
            continue
        for h, spec in enumerate(heads):
            if _is_dynamic(spec.pattern):
                out[i, h] = math.nan
                continue
            out[i, h] = head_density(head_mask(profile, layout, i, h), layout)
    return out


def head_mask(profile: Profile, layout: MaskLayout, layer: int, head: int) -> torch.Tensor:
    """``[nB, nB]`` bool block mask of one head on its sparse steps (text rows/columns dense, as the kernel sees
    them; for a reordering pattern, in its permuted token order)."""
    n_layers, n_heads = len(profile.layers), profile.fingerprint.num_heads
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise DemoError(f"layer {layer} head {head} is out of range: the profile has {n_layers} × {n_heads}")
    layout = replace(layout, block_size=profile.block_size)
    if layer in profile.schedule.dense_layers:
        return torch.ones(layout.num_blocks, layout.num_blocks, dtype=torch.bool)
    spec = profile.layers[layer][head]
    if _is_dynamic(spec.pattern):
        raise DemoError(
            f"layer {layer} head {head} runs the dynamic pattern {spec.pattern!r}: its mask depends on the "
            "queries and keys of each step, so there is no picture of it before generation; pick another head"
        )
    mask = build_pattern(spec.pattern, spec.params, layout, "cpu")[None, None]  # (1, 1, nB, nB)
    return force_text_dense(mask, layout)[0, 0]


def first_sparse_head(profile: Profile) -> tuple[int, int]:
    """The (layer, head) whose mask picture is worth opening on: the first head that runs a static sparse pattern
    (not dense, not in a dense layer, not dynamic); ``(0, 0)`` when there is none."""
    for layer, heads in enumerate(profile.layers):
        if layer in profile.schedule.dense_layers:
            continue
        for head, spec in enumerate(heads):
            if spec.pattern not in ("dense", "full") and not _is_dynamic(spec.pattern):
                return layer, head
    return 0, 0


# ------------------------------------------------------------------------------------------------ pictures
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)  # 5 anchor colours of matplotlib's viridis, 0 -> 1


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (viridis, linear between anchors); shape ``values.shape + (3,)``."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def _cell_size(rows: int, cols: int, target: int) -> int:
    return max(1, target // max(rows, cols, 1))


HEATMAP_MARGIN = (18, 30)  # (top, left) pixels for the head and layer labels


def heatmap_image(table: np.ndarray, target: int = 320) -> np.ndarray:
    """``(layers, heads)`` densities -> uint8 RGB picture: one cell per head (rows = layers ``L0..``, columns =
    heads ``h0..``), each value written in its cell, white margins for the labels."""
    from PIL import Image, ImageDraw

    rows, cols = table.shape
    cell = max(24, _cell_size(rows, cols, target))
    top, left = HEATMAP_MARGIN
    pic = np.full((top + rows * cell, left + cols * cell, 3), 255, dtype=np.uint8)
    pic[top:, left:] = np.repeat(
        np.repeat(colormap(table), cell, axis=0), cell, axis=1
    )  # (rows·cell, cols·cell, 3)
    img = Image.fromarray(pic)
    draw = ImageDraw.Draw(img)
    for c in range(cols):
        draw.text((left + c * cell + cell // 2 - 6, 3), f"h{c}", fill=(0, 0, 0))
    for r in range(rows):
        draw.text((3, top + r * cell + cell // 2 - 5), f"L{r}", fill=(0, 0, 0))
        for c in range(cols):
            val = table[r, c]
            ink = (0, 0, 0) if val > 0.6 else (255, 255, 255)
            text = "dyn" if math.isnan(val) else f"{val:.2f}"
            draw.text((left + c * cell + cell // 2 - 11, top + r * cell + cell // 2 - 5), text, fill=ink)
    return np.asarray(img)


def mask_image(mask: torch.Tensor, layout: MaskLayout, target: int = 320) -> np.ndarray:
    """``[nB, nB]`` block mask -> uint8 RGB picture (computed blocks yellow, skipped dark), with thin lines where
    a new latent frame starts (when blocks align with frames)."""
    m = mask.detach().cpu().numpy().astype(np.float64)
    n = m.shape[0]
    cell = max(2, _cell_size(n, n, target))
    pic = np.repeat(np.repeat(colormap(m), cell, axis=0), cell, axis=1)
    per_frame = layout.grid[1] * layout.grid[2]
    if per_frame % layout.block_size == 0 and per_frame // layout.block_size < n and cell >= 4:
        step = per_frame // layout.block_size
        for b in range(step, n, step):
            pic[b * cell, :] = pic[:, b * cell] = (200, 200, 200)
    return pic


def upscale(frames: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale ``(F, H, W, 3)`` by an integer factor so tiny videos are visible in a browser."""
    k = max(1, -(-min_side // max(1, min(frames.shape[1:3]))))
    return np.repeat(np.repeat(frames, k, axis=1), k, axis=2) if k > 1 else frames


# ------------------------------------------------------------------------------------------------ session
@dataclass
class Comparison:
    """Everything one dense-vs-sparse generation shows."""

    dense: RunResult
    sparse: RunResult
    dense_cached: bool
    metrics: dict[str, Any]
    dense_video: Path
    sparse_video: Path
    pair_video: Path
    profile: Profile
    layout: MaskLayout | None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense.seconds / self.sparse.seconds


class DenseCache:
    """LRU of dense runs keyed by everything that determines them: re-running the same dense side is instant."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], RunResult] = OrderedDict()

    @staticmethod
    def key(model: str, settings: Settings) -> tuple[Any, ...]:
        return (model, *(getattr(settings, f) for f in Settings.__dataclass_fields__))

    def get(self, key: tuple[Any, ...]) -> RunResult | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: tuple[Any, ...], value: RunResult) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class DemoSession:
    """One loaded pipeline, the profiles it may use, the dense cache and an output folder."""

    def __init__(
        self,
        model: str = "tiny",
        profile: str | None = "auto",
        device: str | None = None,
        out_dir: str | Path | None = None,
        fps: int = 8,
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe, self.model_name = load_pipeline(model, self.device, None)
        self.extra: dict[str, Profile] = {}
        self.default_choice = DENSE_CHOICE
        if profile not in (None, "auto"):
            try:
                self.extra[Path(profile).name] = Profile.load(profile)
            except ProfileError as exc:
                raise DemoError(str(exc)) from None
            self.default_choice = Path(profile).name
        elif self.model_name == "tiny":
            self.default_choice = "tiny-cogvideox.json"
        self.cache = DenseCache()
        self.lock = (
            threading.Lock()
        )  # one pipeline: generations run one at a time (the queue also serialises)
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dit-sparse-demo-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self._count = 0
        self._warm: set[tuple[int, int, int, bool]] = set()  # sizes the pipeline has already run once

    def warm_up(self, settings: Settings) -> bool:
        """One untimed 1-step dense run the first time a size is generated, so first-call costs (allocation,
        lazy initialisation) do not land in the dense time and inflate the speedup. True if it ran."""
        key = (int(settings.height), int(settings.width), int(settings.frames), float(settings.guidance) > 1)
        if key in self._warm:
            return False
        args = replace(settings, steps=1).namespace()
        run_mode(self.pipe, args, self.model_name, "dense", None)
        self._warm.add(key)
        return True

    def profile_choices(self) -> list[str]:
        return [*self.extra, *shipped_profiles(), DENSE_CHOICE, UPLOAD_CHOICE]

    def profile(
        self, choice: str, upload: str | Path | None, settings: Settings, target: float | None
    ) -> Profile:
        base = choose_profile(choice, upload, self.pipe, self.extra)
        if not target:
            return base
        return retarget(base, demo_layout(self.pipe, settings, base.block_size), target)

    def layout(self, settings: Settings, profile: Profile) -> MaskLayout | None:
        try:
            return demo_layout(self.pipe, settings, profile.block_size)
        except DemoError:
            return None

    def compare(
        self,
        settings: Settings,
        choice: str,
        upload: str | Path | None = None,
        target: float | None = None,
        progress: Progress | None = None,
    ) -> Comparison:
        """Dense (cached) and sparse generation of ``settings``, PSNR/SSIM per frame, three mp4s."""
        settings.check()
        say = progress or (lambda *a, **k: None)
        say(0.0, desc="profile")
        profile = self.profile(choice, upload, settings, target)
        args = settings.namespace()
        notes = []
        with self.lock:
            key = DenseCache.key(self.model_name, settings)
            dense = self.cache.get(key)
            cached = dense is not None
            if dense is None:
                say(0.02, desc="warm-up (untimed)")
                if self.warm_up(settings):
                    notes.append("a first run at this size was preceded by an untimed 1-step warm-up")
                say(0.05, desc="dense generation")
                dense = run_mode(self.pipe, args, self.model_name, "dense", None)
                self.cache.put(key, dense)
            say(0.5, desc="sparse generation")
            sparse = run_mode(self.pipe, args, self.model_name, "sparse", profile)
        say(0.9, desc="metrics and videos")
        metrics = frame_metrics(dense.frames, sparse.frames)
        run_dir = self._new_dir()
        big_d, big_s = upscale(dense.frames), upscale(sparse.frames)
        files = (
            write_mp4(run_dir / "dense.mp4", big_d, self.fps),
            write_mp4(run_dir / "sparse.mp4", big_s, self.fps),
            write_mp4(run_dir / "side_by_side.mp4", side_by_side(big_d, big_s), self.fps),
        )
        say(1.0, desc="done")
        return Comparison(
            dense,
            sparse,
            cached,
            metrics,
            *files,
            profile=profile,
            layout=self.layout(settings, profile),
            notes=notes,
        )

    def _new_dir(self) -> Path:
        with self.lock:
            self._count += 1
            d = self.out_dir / f"run{self._count:04d}"
        d.mkdir(parents=True, exist_ok=False)
        return d


def psnr_points(per_frame: list[float], cap: float = PSNR_PLOT_CAP) -> list[tuple[int, float]]:
    """``(frame, PSNR dB)`` for the plot; infinite PSNR (identical frames) drawn at ``cap``."""
    return [(i, p if math.isfinite(p) else (cap if p > 0 else 0.0)) for i, p in enumerate(per_frame)]


def fmt_psnr(value: float) -> str:
    return "inf dB (identical)" if math.isinf(value) else f"{value:.2f} dB"
