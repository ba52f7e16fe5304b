"""One query per row against a key/value cache: the decode step of a softmax layer (design §14).

The cache holds ``L`` slots of which the first ``length`` are filled (the prompt and the tokens
generated so far, the new one included); the rest are masked out. Grouped-query: query head ``h``
reads key head ``h // (H / Hkv)``. Scores, softmax and the weighted sum are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.kernels._checks import check_float_array

_HIGHEST = jax.lax.Precision.HIGHEST


def decode_attention(q_BxHxD, k_cache_BxLxGxD, v_cache_BxLxGxD, length, *, scale=None):
  """``softmax(q K[:length]^T * scale) V[:length]`` for one query per row.

  Args:
    q_BxHxD: ``(B, H, D)``.
    k_cache_BxLxGxD, v_cache_BxLxGxD: ``(B, L, Hkv, D)``; ``Hkv`` divides ``H``.
    length: int or int32 scalar in ``[1, L]``: the filled slots (traced values are not checked).
    scale: None means ``D ** -0.5``.

  Returns:
    ``o (B, H, D)`` in q's dtype.
  """
  check_float_array("q", q_BxHxD, "(B, H, D)")
  check_float_array("k_cache", k_cache_BxLxGxD, "(B, L, Hkv, D)")
  check_float_array("v_cache", v_cache_BxLxGxD, "(B, L, Hkv, D)")
  bsz, h, d = q_BxHxD.shape
  _, cap, hkv, _ = k_cache_BxLxGxD.shape
  if k_cache_BxLxGxD.shape != v_cache_BxLxGxD.shape:
    raise ValueError(f"k_cache and v_cache must have the same shape, got "
                     f"{k_cache_BxLxGxD.shape} and {v_cache_BxLxGxD.shape}")
  if k_cache_BxLxGxD.shape[0] != bsz or k_cache_BxLxGxD.shape[3] != d:
    raise ValueError(f"the cache {k_cache_BxLxGxD.shape} must share B={bsz} and D={d} with q "
                     f"{q_BxHxD.shape}")
  if h % hkv:
    raise ValueError(f"Hkv={hkv} key heads do not divide H={h} query heads")
  if not isinstance(length, jax.core.Tracer) and not 1 <= int(length) <= cap:
    raise ValueError(f"length must be in [1, {cap}] (the cache size), got {length!r}")
  scale = d ** -0.5 if scale is None else scale
  q = q_BxHxD.astype(jnp.float32).reshape(bsz, hkv, h // hkv, d)
  s = jnp.einsum("bgrd,blgd->bgrl", q, k_cache_BxLxGxD.astype(jnp.float32),
                 precision=_HIGHEST) * scale
  filled = jnp.arange(cap) < length
  s = jnp.where(filled, s, -jnp.inf)            # slot 0 is always filled: no row is all -inf
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bgrl,blgd->bgrd", p, v_cache_BxLxGxD.astype(jnp.float32), precision=_HIGHEST)
  return o.reshape(bsz, h, d).astype(q_BxHxD.dtype)
