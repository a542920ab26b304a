"""Block-sparse attention kernels: Triton (CUDA), block-gather (CPU), and the fp64 reference.

Knows nothing of diffusers, profiles or patterns. Importing this package imports torch only; Triton is
imported on first use of the Triton implementation.

This folder is the package ``dit_sparse.kernels``. Where the repository root is on ``sys.path`` (``python -m ...`` or
``python -m pytest`` run from it), ``import kernels`` finds this folder before the Hugging Face ``kernels`` package
that transformers (5.25 and later) imports. Imported under that top-level name, this file hands the import on to the
installed package, found with the repository root left out of the path (``ModuleNotFoundError`` when there is none).
"""

if __name__ == "kernels":
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    sys.path[:] = [p for p in _path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules[__name__]
    try:
        sys.modules[__name__] = importlib.import_module(__name__)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"No module named 'kernels' is installed ({os.path.dirname(__file__)} is dit-sparse's "
            "`dit_sparse.kernels`, not a top-level package)",
            name=__name__,
        ) from e
    finally:
        sys.path[:] = _path
else:
    from .api import IMPLS, prepare_block_mask, resolve_impl, sparse_attention, triton_interpreting
    from .indices import (
        SUPPORTED_BLOCK_SIZES,
        BlockSparseIndex,
        block_mask_to_indices,
        build_block_index,
        compact_index,
        index_granularity,
        indices_to_block_mask,
        token_density,
    )
    from .reference import expand_block_mask, reference_attention

__all__ = [
    "IMPLS",
    "SUPPORTED_BLOCK_SIZES",
    "BlockSparseIndex",
    "block_mask_to_indices",
    "build_block_index",
    "compact_index",
    "expand_block_mask",
    "index_granularity",
    "indices_to_block_mask",
    "prepare_block_mask",
    "reference_attention",
    "resolve_impl",
    "sparse_attention",
    "token_density",
    "triton_interpreting",
]
