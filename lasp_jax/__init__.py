"""lasp-jax: LASP-2 sequence-parallel linear attention and hybrid models in JAX."""

from lasp_jax.sequence_parallel.conv import (causal_conv1d, causal_conv1d_shard,
                                             causal_conv1d_step, conv_state)
from lasp_jax.sequence_parallel.lasp2 import lasp2, lasp2_attention, linear_attention
from lasp_jax.sequence_parallel.lasp2h import lasp2h, lasp2h_attention
from lasp_jax.sequence_parallel.layout import unzigzag, zigzag

__all__ = ["causal_conv1d", "causal_conv1d_shard", "causal_conv1d_step", "conv_state", "lasp2", "lasp2_attention", "lasp2h",
           "lasp2h_attention", "linear_attention", "unzigzag", "zigzag"]
