"""Baselines: ring attention, K/V blocks passed around the ring of devices.

Two flavours, both ``W - 1`` sequential ``ppermute`` steps of one fused ``[K | V]`` block
``(B, C, Hkv, Dk + Dv)`` per direction (SPEC section 9), the next block's send issued before the
current block's compute so that XLA can overlap them:

- ``ring_softmax``: softmax attention with an online softmax across blocks (causal or not, GQA,
  contiguous or zigzag layout: masks use true global positions). Every block is computed in full
  and masked (no skipping of blocks that are entirely in the future), the same work as gathering
  all K/V at once (``lasp_jax.lasp2h_attention``): the two differ only in communication.
- ``ring_linear``: the paper's "ring attention" baseline for *linear* attention, in its
  left-product form ``[(Q K^T) * M] V`` block by block, ``M`` the causal mask (weighted by
  ``exp((i - j) g)`` for a constant per-head decay). Its compute grows with ``N^2 / W`` per
  device, where LASP-1/2's right-product form grows with ``N / W``.

The backward passes are autodiff: each ``ppermute`` transposes to one the other way. Block scores
are rematerialised in the backward pass (``jax.checkpoint``), ``QUERY_BLOCK`` query rows at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.linear_attention import reference as ref
from kernels.linear_attention.api import validate_inputs
from lasp_jax.baselines import _common
from lasp_jax.sequence_parallel import layout as layout_lib


def _ring(kv, axis_name, w_size, me, step_fn, carry):
  """Runs ``carry = step_fn(carry, kv_block, source_shard)`` for the W blocks around the ring."""
  shift = [(i, (i + 1) % w_size) for i in range(w_size)]
  for s in range(w_size):
    nxt = jax.lax.ppermute(kv, axis_name, shift) if s < w_size - 1 else None
    carry = step_fn(carry, kv, (me - s) % w_size)
    kv = nxt
  return carry


def ring_softmax(q, k, v, *, axis_name, causal=True, scale=None, layout="contiguous"):
  """Ring attention (softmax) on local shards, inside a ``jax.shard_map`` over ``axis_name``.

  Args:
    q: ``(B, C, H, D)``; k, v: ``(B, C, Hkv, D)`` with ``H % Hkv == 0``.
    causal: mask by true global positions. scale: defaults to ``D ** -0.5``.
    layout: ``"contiguous"`` or ``"zigzag"``: how the sequence is laid out over the devices.

  Returns:
    ``o (B, C, H, D)`` in q's dtype.
  """
  _common.check_softmax_inputs(q, k, v)
  layout_lib.check_layout(layout)
  bsz, c_local, _, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  w_size = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  q_pos = layout_lib.local_positions(layout, me, w_size, c_local)
  q_b, pos_b = _common.split_queries(_common.group_queries(q, k.shape[2]), q_pos)

  def step(acc, kv, src):
    kv_pos = layout_lib.local_positions(layout, src, w_size, c_local)
    k_blk, v_blk = kv[..., :d], kv[..., d:]
    return _common.attend_blocks(q_b, pos_b, k_blk, v_blk, kv_pos, acc, causal=causal,
                                 scale=scale)

  with jax.named_scope("ring_softmax"):
    acc = _ring(jnp.concatenate([k, v], axis=-1), axis_name, w_size, me, step, None)
  return _common.finish_blocks(acc, q.dtype)


def ring_softmax_attention(q, k, v, *, mesh=None, seq_axis="sp", batch_axis=None, causal=True,
                           scale=None, layout="contiguous"):
  """Ring attention (softmax) on global arrays ``q (B, N, H, D)``, ``k, v (B, N, Hkv, D)``.

  ``layout`` is the order of the sequence axis of the inputs and output (``lasp_jax.zigzag``);
  mesh arguments as ``lasp_jax.lasp2_attention``.
  """
  _common.check_softmax_inputs(q, k, v)
  layout_lib.check_layout(layout)
  mesh, _ = _common.mesh_sizes(mesh, seq_axis, batch_axis, q.shape[1], q.shape[0],
                               layout_lib.segments_per_shard(layout), "segments per shard")

  def fn(q, k, v, _g, **kw):
    return ring_softmax(q, k, v, **kw)

  return _common.run_sharded(fn, mesh, seq_axis, batch_axis, q, k, v, None, causal=causal,
                             scale=scale, layout=layout)


def _check_ring_linear_decay(log_decay):
  if log_decay is not None and log_decay.ndim != 1:
    raise ValueError("ring_linear supports log_decay None or constant per head (H,), got shape "
                     f"{tuple(log_decay.shape)}: a data-dependent decay needs cumulative decays "
                     "across devices, which the left-product ring does not carry")


def ring_linear(q, k, v, log_decay=None, *, axis_name, causal=True, scale=1.0):
  """Ring attention for linear attention, left-product form, inside a ``jax.shard_map``.

  Args:
    q, k: ``(B, C, H, Dk)``; v: ``(B, C, H, Dv)``: this device's contiguous shard.
    log_decay: None or ``(H,)`` (replicated), entries <= 0.
    causal: must be True. scale: multiplies q.

  Returns:
    ``o (B, C, H, Dv)`` in q's dtype, equal to ``lasp_jax.lasp2`` on the same shard.
  """
  validate_inputs(q, k, v, log_decay)
  _common.check_causal_linear(log_decay, causal, "ring_linear")
  _check_ring_linear_decay(log_decay)
  f32 = jnp.float32
  bsz, c_local, heads, dk = q.shape
  w_size = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  q_pos = layout_lib.local_positions("contiguous", me, w_size, c_local)
  q_b, pos_b = _common.split_queries(q.astype(f32)[:, :, :, None, :] * scale, q_pos)
  g = None if log_decay is None else log_decay.astype(f32)

  def step(acc, kv, src):
    kv_pos = layout_lib.local_positions("contiguous", src, w_size, c_local)
    k_blk, v_blk = kv[..., :dk].astype(f32), kv[..., dk:].astype(f32)

    @jax.checkpoint
    def one(args):
      q_blk, p_blk, o_blk = args                                    # (B, blk, H, 1, Dk)
      s = jnp.einsum("bqhk,bjhk->bhqj", q_blk[:, :, :, 0], k_blk)
      mask = p_blk[:, None] >= kv_pos[None, :]
      if g is None:
        s = jnp.where(mask, s, 0.0)
      else:
        dist = (p_blk[:, None] - kv_pos[None, :]).astype(f32)      # >= 0 where it counts
        s = s * ref.masked_exp(dist[None, None] * g[None, :, None, None], mask[None, None])
      return o_blk + jnp.einsum("bhqj,bjhv->bqhv", s, v_blk)

    return jax.lax.map(one, (q_b, pos_b, acc))

  with jax.named_scope("ring_linear"):
    kv = jnp.concatenate([k, v], axis=-1)
    nblk, _, blk = q_b.shape[:3]
    acc = jnp.zeros((nblk, bsz, blk, heads, v.shape[-1]), f32)
    acc = ref.match_vma(acc, q_b)
    acc = _ring(kv, axis_name, w_size, me, step, acc)
  return jnp.moveaxis(acc, 0, 1).reshape(bsz, c_local, heads, -1).astype(q.dtype)


def ring_linear_attention(q, k, v, log_decay=None, *, mesh=None, seq_axis="sp", batch_axis=None,
                          causal=True, scale=1.0):
  """``ring_linear`` on global arrays ``(B, N, H, D)`` (contiguous layout); mesh arguments as
  ``lasp_jax.lasp2_attention``."""
  validate_inputs(q, k, v, log_decay)
  _common.check_causal_linear(log_decay, causal, "ring_linear_attention")
  _check_ring_linear_decay(log_decay)
  mesh, _ = _common.mesh_sizes(mesh, seq_axis, batch_axis, q.shape[1], q.shape[0], 1, "")
  return _common.run_sharded(ring_linear, mesh, seq_axis, batch_axis, q, k, v, log_decay,
                             causal=causal, scale=scale)
