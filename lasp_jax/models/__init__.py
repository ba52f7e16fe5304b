"""Flax NNX models: Linear-Llama3, its hybrids, the seven linear-attention variants and the three
delta-rule ones; their decode cache, prefill and ``generate``."""

from lasp_jax.models.cache import AttentionCache, Cache, LinearCache
from lasp_jax.models.config import (DELTA_VARIANTS, KERNEL_BACKENDS, LINEAR_VARIANTS, PRESETS,
                                    ModelConfig, get_config)
from lasp_jax.models.layers import RMSNorm, SwiGLU, apply_rope
from lasp_jax.models.linear_attention import LinearAttention
from lasp_jax.models.llama import (DecoderLayer, LinearLlama, count_params, create_model,
                                   flops_per_token, param_shardings)
from lasp_jax.models.decoding import decode_step, generate, prefill
from lasp_jax.models.mom import MoMAttention, forward_with_router_aux_loss
from lasp_jax.models.sharding_rules import ShardingRules
from lasp_jax.models.softmax_attention import SoftmaxAttention

__all__ = [
    "DELTA_VARIANTS", "KERNEL_BACKENDS", "LINEAR_VARIANTS", "PRESETS", "AttentionCache", "Cache",
    "DecoderLayer", "LinearAttention", "LinearCache", "LinearLlama", "MoMAttention", "ModelConfig",
    "RMSNorm", "forward_with_router_aux_loss",
    "ShardingRules", "SoftmaxAttention", "SwiGLU", "apply_rope", "count_params", "create_model",
    "decode_step", "flops_per_token", "generate", "get_config", "param_shardings", "prefill",
]
