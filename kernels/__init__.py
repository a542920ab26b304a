"""Block-sparse attention kernels: Triton (CUDA), block-gather (CPU), and the fp64 reference.

Knows nothing of diffusers, profiles or patterns. Importing this package imports torch only; Triton is
imported on first use of the Triton implementation.
"""

from .api import IMPLS, sparse_attention, triton_interpreting
from .indices import (
    SUPPORTED_BLOCK_SIZES,
    BlockSparseIndex,
    block_mask_to_indices,
    build_block_index,
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
    "expand_block_mask",
    "indices_to_block_mask",
    "reference_attention",
    "sparse_attention",
    "token_density",
    "triton_interpreting",
]
