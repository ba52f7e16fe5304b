"""Chunked causal linear attention in pure jnp: the XLA path and the kernels' yardstick.

Shapes follow SPEC section 1 (batch-major, sequence second); internally everything runs per
(batch, head) in the layout ``x_BxHxNCxCxD`` (``NC`` chunks of ``C`` tokens).

Numerics: every decay weight is ``exp`` of a *direct* sum of log-decays (all <= 0), never a
difference of two long cumulative sums and never a division by a cumulative product, so that
weights stay finite and accurate over arbitrarily long sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A per-channel (GLA) decay makes the intra-chunk weights a (C, C, Dk) tensor; keep C small there.
PER_CHANNEL_SUBCHUNK = 16


def cumsum_inclusive(g, axis):
  """b_i = g_1 + ... + g_i along ``axis``."""
  return jnp.cumsum(g, axis=axis)


def cumsum_reverse_exclusive(g, axis):
  """r_j = sum_{u > j} g_u along ``axis``, summed from the end (no cancellation)."""
  rev = jnp.flip(g, axis)
  csum = jnp.cumsum(rev, axis=axis)
  csum = jnp.concatenate(
      [jnp.zeros_like(jax.lax.slice_in_dim(csum, 0, 1, axis=axis)),
       jax.lax.slice_in_dim(csum, 0, csum.shape[axis] - 1, axis=axis)], axis=axis)
  return jnp.flip(csum, axis)


def masked_exp(x, mask):
  """exp(x) where mask, else 0; gradient-safe (no inf * 0 in either direction)."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def match_vma(x, like):
  """Marks ``x`` as varying over the same manual mesh axes as ``like`` (a no-op outside shard_map).

  Scan carries must agree in this type; kernels stay mesh-agnostic by copying it from the data.
  """
  missing = tuple(sorted(_varying_axes(like) - _varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; older releases call it `vma`
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def per_token_log_decay(log_decay, batch, seq_len, heads):
  """Brings a decay of any SPEC shape to float32 ``(B, N, H, Dg)``, ``Dg`` in {1, Dk}; None stays None."""
  if log_decay is None:
    return None
  g = log_decay.astype(jnp.float32)
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, None, :, None], (batch, seq_len, heads, 1))
  if g.ndim == 3:
    return g[..., None]
  return g


def _to_chunks(x_BxNxHxD, chunk):
  b, n, h, d = x_BxNxHxD.shape
  return x_BxNxHxD.reshape(b, n // chunk, chunk, h, d).transpose(0, 3, 1, 2, 4)


def _from_chunks(x_BxHxNCxCxD):
  b, h, nc, c, d = x_BxHxNCxCxD.shape
  return x_BxHxNCxCxD.transpose(0, 2, 3, 1, 4).reshape(b, nc * c, h, d)


def chunk_linear_attention_xla(q, k, v, log_decay=None, *, scale=1.0, initial_state=None,
                               chunk_size=64):
  """Causal linear attention, chunked, differentiable by autodiff.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; any float dtype.
    log_decay: None, ``(H,)``, ``(B, N, H)`` or ``(B, N, H, Dk)``, all entries <= 0.
    initial_state: None or ``(B, H, Dk, Dv)``.
    chunk_size: tokens per chunk; must divide N (checked by the public entry points).

  Returns:
    ``o: (B, N, H, Dv)`` in q's dtype and the final state ``(B, H, Dk, Dv)`` in float32.
  """
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  g = per_token_log_decay(log_decay, bsz, n, h)
  c = chunk_size
  if g is not None and g.shape[-1] > 1:
    c = max(d for d in range(1, min(chunk_size, PER_CHANNEL_SUBCHUNK) + 1) if chunk_size % d == 0)
  f32 = jnp.float32
  q_c = _to_chunks(q.astype(f32) * scale, c)
  k_c = _to_chunks(k.astype(f32), c)
  v_c = _to_chunks(v.astype(f32), c)
  causal = jnp.tril(jnp.ones((c, c), dtype=bool))

  if g is None:
    scores = jnp.einsum("bhnid,bhnjd->bhnij", q_c, k_c)
    o_intra = jnp.einsum("bhnij,bhnjd->bhnid", jnp.where(causal, scores, 0.0), v_c)
    q_in, k_in = q_c, k_c
    chunk_decay = None
  else:
    g_c = _to_chunks(g, c)                               # (B, H, NC, C, Dg)
    b_in = cumsum_inclusive(g_c, axis=3)                 # sum_{u <= i} g_u within the chunk
    to_end = cumsum_reverse_exclusive(g_c, axis=3)       # sum_{u > j} g_u within the chunk
    chunk_decay = jnp.exp(b_in[:, :, :, -1, :])          # (B, H, NC, Dg)
    if g.shape[-1] == 1:
      diff = b_in[..., :, None, 0] - b_in[..., None, :, 0]   # (B, H, NC, C, C)
      scores = jnp.einsum("bhnid,bhnjd->bhnij", q_c, k_c) * masked_exp(diff, causal)
    else:
      diff = b_in[..., :, None, :] - b_in[..., None, :, :]   # (B, H, NC, C, C, Dk)
      scores = jnp.einsum("bhnid,bhnjd,bhnijd->bhnij", q_c, k_c,
                          masked_exp(diff, causal[..., None]))
    o_intra = jnp.einsum("bhnij,bhnjd->bhnid", scores, v_c)
    q_in = q_c * jnp.exp(b_in)
    k_in = k_c * jnp.exp(to_end)

  # Each chunk's own contribution to the state at its end, then a scan carries states across chunks.
  chunk_states = jnp.einsum("bhnjk,bhnjv->nbhkv", k_in, v_c)
  s0 = (jnp.zeros((bsz, h, dk, dv), f32) if initial_state is None
        else initial_state.astype(f32))
  s0 = match_vma(s0, chunk_states)

  if chunk_decay is None:
    def step(s, st):
      return s + st, s
    s_final, s_starts = jax.lax.scan(step, s0, chunk_states)
  else:
    decay_n = jnp.moveaxis(chunk_decay, 2, 0)[..., None]   # (NC, B, H, Dg, 1)

    def step(s, inputs):
      st, a = inputs
      return a * s + st, s
    s_final, s_starts = jax.lax.scan(step, s0, (chunk_states, decay_n))

  o_inter = jnp.einsum("bhnik,nbhkv->bhniv", q_in, s_starts)
  o = _from_chunks(o_intra + o_inter).astype(q.dtype)
  return o, s_final
