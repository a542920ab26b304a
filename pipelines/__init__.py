"""Per-model adapters: how each diffusers family lays out its tokens, keyed by transformer class.

from dit_sparse.pipelines import family_for
family = family_for(pipe.transformer)      # UnsupportedModelError lists the supported classes otherwise
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .base import ModelFamily

# one small file per family; each defines FAMILY. Order is only the order of the error message.
_FAMILY_MODULES = (
    "wan",
    "hunyuan_video",
    "cogvideox",
    "flux",
    "qwen_image",
    "ltx",
    "mochi",
    "sd3",
    "pixart",
)

_CACHE: list[ModelFamily] | None = None


class UnsupportedModelError(TypeError):
    """The transformer's class has no dit-sparse adapter."""


def families() -> list[ModelFamily]:
    """All registered families (modules that fail to import, e.g. an adapter not written yet, are skipped)."""
    global _CACHE
    if _CACHE is None:
        found = []
        for mod in _FAMILY_MODULES:
            try:
                module = importlib.import_module(f"{__name__}.{mod}")
            except ModuleNotFoundError as exc:
                if exc.name == f"{__name__}.{mod}":
                    continue
                raise
            found.append(module.FAMILY)
        _CACHE = found
    return _CACHE


def supported_classes() -> list[str]:
    return [c for fam in families() for c in fam.class_names]


def family_for(transformer: Any) -> ModelFamily:
    for fam in families():
        if fam.matches(transformer):
            return fam
    raise UnsupportedModelError(
        f"dit-sparse has no adapter for {type(transformer).__name__}; supported transformers: "
        f"{', '.join(supported_classes())}"
    )


def family_by_name(name: str) -> ModelFamily:
    for fam in families():
        if fam.name == name:
            return fam
    raise KeyError(f"unknown model family {name!r}; known: {[f.name for f in families()]}")


__all__ = ["UnsupportedModelError", "families", "family_by_name", "family_for", "supported_classes"]
