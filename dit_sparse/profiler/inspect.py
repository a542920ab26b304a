"""``dit-sparse inspect P.json``: what a profile holds, as a table and (``--png-dir``) as pictures.

Pictures: ``density.png`` (layers down, heads across; black = dense, white = nothing computed), ``patterns.png``
(one colour per pattern kind, legend printed), and one ``mask_<pattern>.png`` per distinct pattern at the profile's
calibration grid (query blocks down, key blocks across; black = computed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..patterns import MaskLayout, build_layer_mask, pattern_name
from ..profile import Profile

# pattern kind -> RGB for patterns.png
PALETTE = {
    "dense": (20, 20, 20),
    "full": (80, 80, 80),
    "skip": (255, 255, 255),
    "window": (31, 119, 180),
    "tile_window": (23, 190, 207),
    "radial": (255, 127, 14),
    "diagonal": (44, 160, 44),
    "multi_diagonal": (148, 103, 189),
    "stripe": (214, 39, 40),
}
_OTHER = (188, 189, 34)


def calibration_layout(profile: Profile) -> MaskLayout | None:
    cal = profile.calibration
    grid = cal.get("latent_grid")
    if not (isinstance(grid, list) and len(grid) == 3):
        return None
    return MaskLayout(
        tuple(int(g) for g in grid),  # type: ignore[arg-type]
        int(cal.get("num_text", 0)),
        bool(cal.get("text_first", False)),
        profile.block_size,
    )


def head_density(profile: Profile, layer: int, head: int) -> float:
    """The recorded density, else 1 for dense heads (and layers the schedule keeps dense)."""
    spec = profile.layers[layer][head]
    if layer in profile.schedule.dense_layers or spec.pattern == "dense":
        return 1.0
    return float(spec.density) if spec.density is not None else float("nan")


def describe(profile: Profile) -> str:
    fp = profile.fingerprint
    lines = [
        f"profile for {profile.model_id or '?'} ({profile.family}: {fp.describe()}), block size {profile.block_size}",
        f"schedule: {profile.schedule.dense_steps} dense warm-up steps, dense layers {profile.schedule.dense_layers}",
    ]
    cal = profile.calibration
    if cal:
        lines.append(
            "calibrated: "
            + ", ".join(
                f"{k}={cal[k]}"
                for k in ("height", "width", "frames", "steps", "latent_grid", "device", "date")
                if k in cal
            )
        )
        if "command" in cal:
            lines.append(f"command: {cal['command']}")
    lines.append("")
    lines.append(f"{'layer':>5}  {'density':>7}  {'max err':>7}  pattern mix")
    for layer, heads in enumerate(profile.layers):
        dens = [head_density(profile, layer, h) for h in range(len(heads))]
        mix: dict[str, int] = {}
        for spec in heads:
            key = (
                "dense" if layer in profile.schedule.dense_layers else pattern_name(spec.pattern, spec.params)
            )
            mix[key] = mix.get(key, 0) + 1
        errs = [s.rel_error for s in heads if s.rel_error is not None]
        err = f"{max(errs):.4f}" if errs else "-"
        mix_text = ", ".join(f"{n}× {k}" for k, n in sorted(mix.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"{layer:>5}  {sum(dens) / len(dens):>7.3f}  {err:>7}  {mix_text}")
    s = profile.summary
    if s:
        lines.append("")
        lines.append(
            "summary: " + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, (dict, list)))
        )
    return "\n".join(lines)


def _save_rgb(pixels: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.to(torch.uint8).numpy(), mode="RGB").save(path, format="PNG")
    return path


def write_pngs(profile: Profile, out_dir: str | Path, scale: int = 16) -> list[Path]:
    """density.png, patterns.png and one example mask per distinct pattern; returns the files written."""
    from ..patterns.picture import save_mask_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_l, num_h = len(profile.layers), profile.fingerprint.num_heads
    dens = torch.tensor([[head_density(profile, li, h) for h in range(num_h)] for li in range(num_l)])
    gray = (255 * (1 - dens.nan_to_num(1.0).clamp(0, 1))).round()  # (L, H): black = dense
    rgb = gray[..., None].expand(num_l, num_h, 3)
    files = [_save_rgb(_upscale(rgb, scale), out / "density.png")]
    pat = torch.zeros(num_l, num_h, 3)
    for li, heads in enumerate(profile.layers):
        for h, spec in enumerate(heads):
            kind = "dense" if li in profile.schedule.dense_layers else spec.pattern
            pat[li, h] = torch.tensor(PALETTE.get(kind, _OTHER), dtype=torch.float32)
    files.append(_save_rgb(_upscale(pat, scale), out / "patterns.png"))
    layout = calibration_layout(profile)
    if layout is not None:
        seen: set[str] = set()
        for heads in profile.layers:
            for spec in heads:
                name = pattern_name(spec.pattern, spec.params)
                if name in seen:
                    continue
                seen.add(name)
                mask = build_layer_mask([(spec.pattern, spec.params)], layout, "cpu")[0, 0]
                fname = "mask_" + re.sub(r"[^A-Za-z0-9_=.-]+", "_", name).strip("_") + ".png"
                files.append(save_mask_png(mask, out / fname, scale=max(1, 256 // layout.num_blocks)))
    return files


def _upscale(img: torch.Tensor, scale: int) -> torch.Tensor:
    return img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (L·s, H·s, 3)


def legend() -> str:
    return "patterns.png colours: " + ", ".join(f"{k}={v}" for k, v in PALETTE.items()) + f", other={_OTHER}"


def run_inspect(path: str, png_dir: str | None) -> tuple[str, list[Path]]:
    profile = Profile.load(path)
    text = describe(profile)
    files: list[Path] = []
    if png_dir is not None:
        files = write_pngs(profile, png_dir)
        if calibration_layout(profile) is None:
            text += "\n(no calibration grid recorded in this profile: example masks skipped)"
        text += "\n" + legend()
    return text, files


__all__ = ["describe", "run_inspect", "write_pngs"]
