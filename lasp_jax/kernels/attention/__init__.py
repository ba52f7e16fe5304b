"""Flash-style softmax attention (blockwise, online softmax); no knowledge of meshes."""

from lasp_jax.kernels.attention.decode import decode_attention
from lasp_jax.kernels.attention.flash import block_classes, flash_attention, pick_block

__all__ = ["block_classes", "decode_attention", "flash_attention", "pick_block"]
