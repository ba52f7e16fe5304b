"""Chunked linear attention: Pallas kernels (TPU, GPU) and the pure-jnp XLA path."""

from lasp_jax.kernels.linear_attention.api import (check_log_decay, chunk_linear_attention, default_backend,
                                          document_starts, reset_log_decay, resolve_backend,
                                          validate_inputs)
from lasp_jax.kernels.linear_attention.reference import chunk_linear_attention_xla, square_features
from lasp_jax.kernels.linear_attention.step import recurrent_step

__all__ = ["check_log_decay", "chunk_linear_attention", "chunk_linear_attention_xla",
           "default_backend", "document_starts", "recurrent_step", "reset_log_decay",
           "resolve_backend", "square_features", "validate_inputs"]
