"""Kernels for lasp-jax. Knows nothing about meshes; ``lasp_jax`` composes these across devices."""

from kernels.linear_attention import chunk_linear_attention, chunk_linear_attention_xla

__all__ = ["chunk_linear_attention", "chunk_linear_attention_xla"]
