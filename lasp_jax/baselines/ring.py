"""Baselines: ring attention, K/V blocks passed around the ring of devices.

Two flavours, both ``W - 1`` sequential ``ppermute`` steps of one fused ``[K | V]`` block
``(B, C, Hkv, Dk + Dv)`` per direction (design §9), the next block's send issued before the
current block's compute so that XLA can overlap them:

- ``ring_softmax``: softmax attention, each block by the flash kernel (``lasp_jax.kernels.attention``, the
  one LASP-2H uses, with its causal tile skipping), blocks merged by their log-sum-exps (causal or
  not, GQA, contiguous or zigzag layout: masks use true global positions). Its backward is a
  ``custom_vjp`` running the ring again: K/V travel with their float32 gradient accumulators
  (``W - 1`` K/V steps and ``W`` dK/dV steps). Same local work as gathering all K/V at once
  (``lasp_jax.lasp2h_attention``): the two differ only in communication.
- ``ring_linear``: the paper's "ring attention" baseline for *linear* attention, in its
  left-product form ``[(Q K^T) * M] V`` block by block, ``M`` the causal mask (weighted by
  ``exp((i - j) g)`` for a constant per-head decay). Its compute grows with ``N^2 / W`` per
  device, where LASP-1/2's right-product form grows with ``N / W``.

``ring_linear``'s backward is autodiff (each ``ppermute`` transposes to one the other way), its
block scores rematerialised (``jax.checkpoint``), ``QUERY_BLOCK`` query rows at a time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lasp_jax.kernels.attention import flash
from lasp_jax.kernels.linear_attention import reference as ref
from lasp_jax.kernels.linear_attention.api import validate_inputs
from lasp_jax.baselines import _common
from lasp_jax.sequence_parallel import layout as layout_lib


def _shift(w_size):
  return [(i, (i + 1) % w_size) for i in range(w_size)]


def _ring(kv, axis_name, w_size, me, step_fn, carry):
  """Runs ``carry = step_fn(carry, kv_block, source_shard)`` for the W blocks around the ring."""
  for s in range(w_size):
    nxt = jax.lax.ppermute(kv, axis_name, _shift(w_size)) if s < w_size - 1 else None
    carry = step_fn(carry, kv, (me - s) % w_size)
    kv = nxt
  return carry


class _Plan(NamedTuple):
  axis_name: str
  layout: str
  kernel: tuple  # flash config


def _lse_like_o(lse):
  """``(B, Hkv, R, Nq) -> (B, Nq, Hkv * R, 1)``."""
  b, hkv, r, nq = lse.shape
  return jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, nq, hkv * r, 1)


def _merge(o, lse, o_blk, lse_blk):
  """Merges two normalised partial attentions by their log-sum-exps (-inf: saw no key)."""
  new = jnp.logaddexp(lse, lse_blk)
  ok = jnp.isfinite(new)
  safe = jnp.where(ok, new, 0.0)
  w0 = jnp.where(ok, jnp.exp(lse - safe), 0.0)
  w1 = jnp.where(ok, jnp.exp(lse_blk - safe), 0.0)
  return w0 * o + w1 * o_blk.astype(jnp.float32), new


def _ring_softmax_fwd(plan, q, k, v):
  w_size = jax.lax.axis_size(plan.axis_name)
  me = jax.lax.axis_index(plan.axis_name)
  c_local = q.shape[1]
  q_pos = layout_lib.local_positions(plan.layout, me, w_size, c_local)

  def step(acc, kv, src):
    kv_pos = layout_lib.local_positions(plan.layout, src, w_size, c_local)
    o_blk, lse_blk = flash.forward(plan.kernel, q, kv[0], kv[1], q_pos, kv_pos)
    lse_blk = _lse_like_o(lse_blk)
    if acc is None:
      return o_blk.astype(jnp.float32), lse_blk
    return _merge(*acc, o_blk, lse_blk)

  with jax.named_scope("ring_softmax"):
    o, lse = _ring(jnp.stack([k, v]), plan.axis_name, w_size, me, step, None)
  o = o.astype(q.dtype)
  # flash's backward wants lse as (B, Hkv, R, Nq).
  b, nq, h, _ = o.shape
  hkv = k.shape[2]
  lse_k = jnp.transpose(lse[..., 0].reshape(b, nq, hkv, h // hkv), (0, 2, 3, 1))
  return o, (q, k, v, o, lse_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_softmax_core(plan, q, k, v):
  return _ring_softmax_fwd(plan, q, k, v)[0]


def _ring_softmax_bwd(plan, res, do):
  """The second ring: K/V travel again with their float32 gradient accumulators ``dK, dV``."""
  q, k, v, o, lse = res
  axis_name = plan.axis_name
  w_size = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  c_local = q.shape[1]
  q_pos = layout_lib.local_positions(plan.layout, me, w_size, c_local)
  kv = jnp.stack([k, v])
  dq = ref.match_vma(jnp.zeros(q.shape, jnp.float32), q)
  dkv = ref.match_vma(jnp.zeros(kv.shape, jnp.float32), kv)
  with jax.named_scope("ring_softmax_bwd"):
    for s in range(w_size):
      kv_pos = layout_lib.local_positions(plan.layout, (me - s) % w_size, w_size, c_local)
      dq_blk, dk_blk, dv_blk = flash.backward(plan.kernel, q, kv[0], kv[1], q_pos, kv_pos, None,
                                              None, o, lse, do)
      dq = dq + dq_blk
      dkv = dkv + jnp.stack([dk_blk, dv_blk])
      if s < w_size - 1:
        kv = jax.lax.ppermute(kv, axis_name, _shift(w_size))
      # After the last step this device holds the gradient of block me + 1: one more step home.
      dkv = jax.lax.ppermute(dkv, axis_name, _shift(w_size))
  return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


_ring_softmax_core.defvjp(_ring_softmax_fwd, _ring_softmax_bwd)


def ring_softmax(q, k, v, *, axis_name, causal=True, scale=None, layout="contiguous"):
  """Ring attention (softmax) on local shards, inside a ``jax.shard_map`` over ``axis_name``.

  Args:
    q: ``(B, C, H, D)``; k, v: ``(B, C, Hkv, D)`` with ``H % Hkv == 0``.
    causal: mask by true global positions. scale: defaults to ``D ** -0.5``.
    layout: ``"contiguous"`` or ``"zigzag"``: how the sequence is laid out over the devices.

  Returns:
    ``o (B, C, H, D)`` in q's dtype.
  """
  layout_lib.check_layout(layout)
  flash.validate_inputs(q, k, v)
  if k.shape[1] != q.shape[1] or k.dtype != v.dtype:
    raise ValueError(f"k and v must have q's sequence length and one dtype, got q {q.shape}, "
                     f"k {k.shape} {k.dtype}, v {v.dtype}")
  nseg = layout_lib.segments_per_shard(layout)
  if q.shape[1] % nseg:
    raise ValueError(f"local sequence length {q.shape[1]} must be even in the zigzag layout")
  # Tiles inside one layout segment, so that causal tile skipping follows the segments.
  block = flash.pick_block(q.shape[1] // nseg)
  cfg = flash.make_config(q, k, causal=causal, scale=scale, block_q=block, block_k=block,
                          has_segments=False)
  return _ring_softmax_core(_Plan(axis_name, layout, cfg), q, k, v)


def ring_softmax_attention(q, k, v, *, mesh=None, seq_axis="sp", batch_axis=None, causal=True,
                           scale=None, layout="contiguous"):
  """Ring attention (softmax) on global arrays ``q (B, N, H, D)``, ``k, v (B, N, Hkv, D)``.

  ``layout`` is the order of the sequence axis of the inputs and output (``lasp_jax.zigzag``);
  mesh arguments as ``lasp_jax.lasp2_attention``.
  """
  flash.validate_inputs(q, k, v)
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
  q_b, pos_b = _common.split_queries(q.astype(f32) * scale, q_pos)
  # Clamped (``ref.clamp_log_decay``): a -inf head is an exact reset; unclamped, the diagonal's
  # distance 0 would give 0 * -inf = NaN.
  g = None if log_decay is None else ref.clamp_log_decay(log_decay)

  def step(acc, kv, src):
    kv_pos = layout_lib.local_positions("contiguous", src, w_size, c_local)
    k_blk, v_blk = kv[..., :dk].astype(f32), kv[..., dk:].astype(f32)

    @jax.checkpoint
    def one(args):
      q_blk, p_blk, o_blk = args                                    # (B, blk, H, Dk)
      s = jnp.einsum("bqhk,bjhk->bhqj", q_blk, k_blk)
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
