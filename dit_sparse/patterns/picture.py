"""Pictures of a 2-D block mask: an ASCII view for the terminal and a PNG on request.

``ascii_mask`` downsamples a large mask by grouping blocks into cells (each cell shows the fraction of its blocks
that are allowed); ``save_mask_png`` writes one pixel (or ``scale × scale`` pixels) per block, atomically.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

# cell fill fraction -> character: empty, < 1/3, < 2/3, < 1, full
_SHADES = ("·", "░", "▒", "▓", "█")


def _as_2d_bool(mask: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(
            f"expected a 2-D block mask [nQ, nK], got shape {tuple(mask.shape)}; pick one head, e.g. mask[0, h]"
        )
    return mask.detach().to("cpu", torch.bool)


def _cell_fraction(mask: torch.Tensor, max_size: int) -> torch.Tensor:
    """Fraction of allowed blocks per cell, cells of ``ceil(n / max_size)`` blocks per axis: ``(rows, cols)``."""
    nq, nk = mask.shape
    cq, ck = -(-nq // max_size), -(-nk // max_size)  # blocks per cell
    rows, cols = -(-nq // cq), -(-nk // ck)
    padded = torch.zeros(rows * cq, cols * ck, dtype=torch.float64)
    counts = torch.zeros_like(padded)
    padded[:nq, :nk] = mask.to(torch.float64)
    counts[:nq, :nk] = 1.0  # padding cells do not count as blocks
    allowed = padded.view(rows, cq, cols, ck).sum(dim=(1, 3))  # (rows, cols)
    total = counts.view(rows, cq, cols, ck).sum(dim=(1, 3))
    return allowed / total


def ascii_mask(mask: torch.Tensor, max_size: int = 64) -> str:
    """A text picture of a ``[nQ, nK]`` block mask (query blocks down, key blocks across), at most ``max_size``
    characters per side: '█' all blocks of a cell allowed, '·' none, '░▒▓' partly. First line: shape and density."""
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    m = _as_2d_bool(mask)
    frac = _cell_fraction(m, max_size)
    cq, ck = -(-m.shape[0] // frac.shape[0]), -(-m.shape[1] // frac.shape[1])
    header = f"block mask {m.shape[0]}×{m.shape[1]}, {float(m.float().mean()):.3f} of blocks" + (
        f" ({cq}×{ck} blocks per character)" if cq > 1 or ck > 1 else ""
    )
    lines = [header]
    for row in frac.tolist():
        lines.append("".join(_shade(x) for x in row))
    return "\n".join(lines)


def _shade(x: float) -> str:
    if x <= 0.0:
        return _SHADES[0]
    if x >= 1.0:
        return _SHADES[-1]
    return _SHADES[1 + min(2, int(x * 3))]


def save_mask_png(mask: torch.Tensor, path: str | os.PathLike[str], scale: int = 1) -> Path:
    """Write a ``[nQ, nK]`` block mask as a grayscale PNG (allowed = black on white), ``scale`` pixels per block;
    the image is ``nQ·scale`` pixels high and ``nK·scale`` wide. Written to a temporary file and renamed."""
    from PIL import Image  # Pillow comes with imageio (a dependency)

    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1 pixels per block, got {scale}")
    m = _as_2d_bool(mask)
    pixels = torch.where(m, 0, 255).to(torch.uint8)  # (nQ, nK)
    pixels = pixels.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (nQ·scale, nK·scale)
    image = Image.fromarray(pixels.numpy(), mode="L")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


__all__ = ["ascii_mask", "save_mask_png"]
