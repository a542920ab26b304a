"""dit-sparse: training-free sparse attention for diffusion transformers in diffusers.

    import dit_sparse
    handle = dit_sparse.apply(pipe, dit_sparse.Profile.load("profile.json"))

Importing this package is cheap: it imports torch only. diffusers, triton and gradio are imported on first use,
and no CUDA context is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .integration import SparseHandle, SparseProcessor, apply
    from .kernels import sparse_attention
    from .profile import Profile

_LAZY = {
    "sparse_attention": ("dit_sparse.kernels", "sparse_attention"),
    "Profile": ("dit_sparse.profile", "Profile"),
    "ProfileError": ("dit_sparse.profile", "ProfileError"),
    "SparseProcessor": ("dit_sparse.integration", "SparseProcessor"),
    "SparseHandle": ("dit_sparse.integration", "SparseHandle"),
    "apply": ("dit_sparse.integration", "apply"),
}

__all__ = ["Profile", "SparseHandle", "SparseProcessor", "__version__", "apply", "sparse_attention"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")
