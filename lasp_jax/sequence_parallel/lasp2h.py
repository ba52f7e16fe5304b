"""LASP-2H: sequence-parallel softmax attention by one all-gather of K and V (design §6).

Per device, forward:
1. ONE all-gather over the sequence axis of K and V stacked into one buffer (only the ``Hkv``
   key/value heads: grouped-query attention keeps it small), and one of the segment ids when
   given. The gathered keys stay in storage order; their true global positions are known statically
   from the layout, so nothing is permuted.
2. Flash attention of the local queries against the gathered keys (``lasp_jax.kernels.attention``), masked by
   true global positions (``layout.local_positions``) and segment ids. Tiles that causality masks
   out entirely are skipped, so in the zigzag layout every device does the same work.

Backward (a ``custom_vjp`` around both steps): the kernel's flash backward gives float32 ``dK, dV``
for the whole gathered sequence; ONE reduce-scatter of them (stacked, float32 so that W partial sums
of bfloat16 gradients do not lose precision) hands each device the gradient of its own keys.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lasp_jax.kernels.attention import flash
from lasp_jax.sequence_parallel import layout as layout_lib
from lasp_jax.sequence_parallel import sharding


class _Plan(NamedTuple):
  axis_name: str
  layout: str
  kernel: tuple  # the kernel's static config, from flash.make_config


def _validate(q, k, v, segment_ids, layout, num_shards=None):
  """Shapes, dtypes, layout; ``num_shards`` given for global arrays (checks N's divisibility)."""
  layout_lib.check_layout(layout)
  flash.validate_inputs(q, k, v)
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"q and k must have the same sequence length, got q {tuple(q.shape)} "
                     f"and k {tuple(k.shape)}")
  if k.dtype != v.dtype:
    raise TypeError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
  bsz, n = q.shape[:2]
  if segment_ids is not None:
    if not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != (bsz, n):
      raise ValueError(f"segment_ids must have shape (B, N)={(bsz, n)}, got "
                       f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")
  nseg = layout_lib.segments_per_shard(layout)
  if num_shards is not None and n % (nseg * num_shards):
    what = f"2 * axis size = {2 * num_shards}" if nseg == 2 else f"the axis size {num_shards}"
    raise ValueError(f"sequence length N={n} is not divisible by {what} (layout={layout!r})")
  if num_shards is None and n % nseg:
    raise ValueError(f"local sequence length {n} must be even in the zigzag layout")




def _kernel_config(q, k, *, causal, scale, layout, has_segments):
  # Tiles inside one layout segment, so that causal skipping follows the segments exactly.
  seg_len = q.shape[1] // layout_lib.segments_per_shard(layout)
  block = flash.pick_block(seg_len)
  return flash.make_config(q, k, causal=causal, scale=scale, block_q=block, block_k=block,
                           has_segments=has_segments)


def _attend(plan, q, k, v, seg, *, kv_to="varying"):
  """The one gather and the local attention: ``o, lse, kv (2, B, N, Hkv, D), q_pos, kv_pos,
  seg_all``. ``kv_to="invarying"`` types the gathered K/V as the same on every device, so that
  a prefill can hand it out replicated as its decode cache (no second gather); autodiff through
  that would be plain JAX's (a psum of the full ``dK, dV``, then a slice), not ``_lasp2h_bwd``."""
  w = jax.lax.axis_size(plan.axis_name)
  c = q.shape[1]
  q_pos = layout_lib.local_positions(plan.layout, jax.lax.axis_index(plan.axis_name), w, c)
  kv_pos = jnp.asarray(layout_lib.storage_positions(plan.layout, w, c))
  with jax.named_scope("lasp2h_gather_kv"):
    kv = jax.lax.all_gather(jnp.stack([k, v]), plan.axis_name, axis=2, tiled=True, to=kv_to)
    seg_all = None if seg is None else jax.lax.all_gather(seg, plan.axis_name, axis=1, tiled=True)
  with jax.named_scope("lasp2h_local_attention"):
    o, lse = flash.forward(plan.kernel, q, kv[0], kv[1], q_pos, kv_pos, seg, seg_all)
  return o, lse, kv, q_pos, kv_pos, seg_all


def _forward(plan, q, k, v, seg):
  o, lse, kv, q_pos, kv_pos, seg_all = _attend(plan, q, k, v, seg)
  return o, (q, kv, q_pos, kv_pos, seg, seg_all, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lasp2h_core(plan, q, k, v, seg):
  return _forward(plan, q, k, v, seg)[0]


def _lasp2h_bwd(plan, res, do):
  q, kv, q_pos, kv_pos, seg, seg_all, o, lse = res
  with jax.named_scope("lasp2h_local_attention_bwd"):
    dq, dk, dv = flash.backward(plan.kernel, q, kv[0], kv[1], q_pos, kv_pos, seg, seg_all, o,
                                lse, do)
  with jax.named_scope("lasp2h_scatter_dkv"):
    # The transpose of the forward all-gather: one reduce-scatter, in float32.
    dkv = jax.lax.psum_scatter(jnp.stack([dk, dv]), plan.axis_name, scatter_dimension=2,
                               tiled=True)
  return dq.astype(q.dtype), dkv[0].astype(kv.dtype), dkv[1].astype(kv.dtype), None


_lasp2h_core.defvjp(_forward, _lasp2h_bwd)


def lasp2h(q, k, v, *, axis_name, causal=True, scale=None, segment_ids=None, layout="contiguous",
           return_kv=False):
  """LASP-2H on local shards, inside the caller's ``jax.shard_map`` over ``axis_name``.

  Args:
    q: ``(B, C, H, D)``; k, v: ``(B, C, Hkv, D)`` with ``H % Hkv == 0``: this device's shard.
    axis_name: the mesh axis the sequence is split over.
    causal: a token sees the tokens at true global positions <= its own.
    scale: multiplies the scores; None means ``D ** -0.5``.
    segment_ids: ``(B, C)`` int, sharded like q: tokens see only tokens of their own segment.
      Compared at their own width (int64 needs ``jax_enable_x64``); numpy ids JAX cannot hold
      are checked to fit int32 (``flash.segment_ids_for_kernel``). Traced ids are already of a
      dtype JAX holds, so nothing narrows them here.
    layout: ``"contiguous"`` or ``"zigzag"`` (design §5).
    return_kv: for inference (prefill): also the gathered K/V, ``(2, B, N, Hkv, D)`` in storage
      order, invariant over ``axis_name`` (the same on every device), from the one all-gather.

  Returns:
    ``o (B, C, H, D)`` in q's dtype: exactly the matching rows of the unsplit attention; with
    ``return_kv``, ``(o, kv)``.
  """
  _validate(q, k, v, segment_ids, layout)
  cfg = _kernel_config(q, k, causal=causal, scale=scale, layout=layout,
                       has_segments=segment_ids is not None)
  (seg,) = flash.segment_ids_for_kernel(("segment_ids", segment_ids))
  plan = _Plan(axis_name, layout, cfg)
  if return_kv:
    o, _, kv, *_ = _attend(plan, q, k, v, seg, kv_to="invarying")
    return o, kv
  return _lasp2h_core(plan, q, k, v, seg)


def lasp2h_attention(q, k, v, *, mesh=None, seq_axis="sp", batch_axis=None, causal=True,
                     scale=None, segment_ids=None, layout="contiguous", return_kv=False):
  """LASP-2H on global arrays: splits the sequence over ``mesh`` axis ``seq_axis``.

  Args:
    q: ``(B, N, H, D)``; k, v: ``(B, N, Hkv, D)``; sharded or not (they are resharded).
    mesh: a ``jax.sharding.Mesh`` (Explicit or Auto axes); None uses the ``jax.set_mesh`` context.
    seq_axis: mesh axis that splits N; batch_axis: optional mesh axis that splits B.
    segment_ids: ``(B, N)`` int or None; widths as ``lasp2h``.
    layout: the sequence axis of the inputs (and output) is in ``"contiguous"`` or ``"zigzag"``
      order (``lasp_jax.zigzag``).
    return_kv: for inference (prefill): also K/V of the whole sequence, ``(2, B, N, Hkv, D)`` in
      the layout's order, replicated over ``seq_axis``: the one all-gather's result, so a decode
      cache costs no second gather.
    Others as ``lasp2h``.

  Returns:
    ``o (B, N, H, D)`` in q's dtype, sharded like q; with ``return_kv``, ``(o, kv)``.
  """
  layout_lib.check_layout(layout)
  mesh = sharding.resolve_mesh(mesh)
  w = sharding.axis_size(mesh, seq_axis, "seq_axis")
  nb = sharding.axis_size(mesh, batch_axis, "batch_axis")
  _validate(q, k, v, segment_ids, layout, num_shards=w)
  # Before the shard_map: resharding numpy int64 ids with x64 off would narrow them silently.
  (segment_ids,) = flash.segment_ids_for_kernel(("segment_ids", segment_ids))
  if q.shape[0] % nb:
    raise ValueError(f"batch size B={q.shape[0]} is not a multiple of the {batch_axis!r} axis "
                     f"size {nb}")
  x_spec = P(batch_axis, seq_axis, None, None)
  fn = functools.partial(lasp2h, axis_name=seq_axis, causal=causal, scale=scale, layout=layout,
                         return_kv=return_kv)
  out_specs = (x_spec, P(None, batch_axis, None, None, None)) if return_kv else x_spec
  return sharding.shard_map(
      lambda q, k, v, seg: fn(q, k, v, segment_ids=seg), mesh,
      (x_spec, x_spec, x_spec, P(batch_axis, seq_axis)), out_specs, (q, k, v, segment_ids))


def computed_blocks_per_device(seq_len, num_shards, *, layout="contiguous", causal=True):
  """Score tiles the kernel computes on each device (skipped tiles excluded), ``(W,)`` int.

  The work measure of the load balance: with causal attention it grows with the device index in the
  contiguous layout and is the same on every device in the zigzag layout. Uses the tile sizes and
  the skip rule of the real kernel.
  """
  layout_lib.check_layout(layout)
  flash.check_positive_int("seq_len", seq_len)
  flash.check_positive_int("num_shards", num_shards)
  nseg = layout_lib.segments_per_shard(layout)
  if seq_len % (nseg * num_shards):
    raise ValueError(f"sequence length {seq_len} is not divisible by {nseg * num_shards}")
  c = seq_len // num_shards
  block = flash.pick_block(c // nseg)
  kv_pos = layout_lib.storage_positions(layout, num_shards, c)
  counts = []
  for r in range(num_shards):
    q_pos = kv_pos[r * c:(r + 1) * c]
    classes = flash.block_classes(q_pos, kv_pos, block, block, causal=causal, xp=np)
    counts.append(int(np.count_nonzero(classes)))
  return np.asarray(counts)
