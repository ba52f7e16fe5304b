"""The decode cache (design §14): what each layer keeps between generated tokens.

Linear layers keep O(1) in the context length: the recurrent state (float32) and, with a short
conv, the last ``K - 1`` inputs of each of q, k and v. Softmax layers keep K (after RoPE) and V
for every position up to ``max_len``. The cache is a pytree, so it travels through ``jit`` and
``lax.scan``; ``max_len`` is static.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class LinearCache:
  """``state (B, H, Dk, Dv)`` float32 (Based/ReBased: ``Dv + 1``, the normaliser's column);
  ``conv``: ``()`` or the q, k, v conv inputs, each ``(B, K - 1, H * D)``."""

  state: jax.Array
  conv: tuple = ()


@dataclasses.dataclass(frozen=True)
class AttentionCache:
  """``k``, ``v``: ``(B, max_len, Hkv, D)``; slots from the cache's ``length`` on are unused."""

  k: jax.Array
  v: jax.Array


@dataclasses.dataclass(frozen=True)
class Cache:
  """Every layer's cache, in layer order, and ``length``: the tokens seen so far (int32 scalar,
  also the position of the next one). ``max_len``: the softmax layers' capacity."""

  layers: tuple
  length: jax.Array
  max_len: int = dataclasses.field(metadata=dict(static=True))

  @property
  def nbytes(self) -> int:
    """Bytes held by the cache's arrays (its memory footprint)."""
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(self)))


jax.tree_util.register_dataclass(LinearCache, data_fields=["state", "conv"], meta_fields=[])
jax.tree_util.register_dataclass(AttentionCache, data_fields=["k", "v"], meta_fields=[])
jax.tree_util.register_dataclass(Cache, data_fields=["layers", "length"], meta_fields=["max_len"])
