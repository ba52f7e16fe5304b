"""Building blocks shared by the blocks: parameters with logical axes, RMSNorm, SwiGLU, RoPE."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lasp_jax.models.sharding_rules import Context


def param(rngs: nnx.Rngs, shape, logical_axes, dtype, *, std=None, value=None,
          init=None) -> nnx.Param:
  """A parameter: normal(0, std), a constant ``value``, or ``init(key, shape)`` (a float32 draw),
  tagged with its logical axis names."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical_axes {logical_axes} do not match shape {shape}")
  if value is not None:
    x = jnp.full(shape, value, dtype)
  elif init is not None:
    x = init(rngs.params(), shape).astype(dtype)
  else:
    x = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(x, logical_axes=tuple(logical_axes))


def rms_norm(x, weight, eps, zero_centered=False):
  """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, computed in float32;
  ``zero_centered``: ``* (1 + weight)`` (the weight stored as an offset from one)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  w = weight.astype(jnp.float32)
  return (y * (1.0 + w if zero_centered else w)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learnable gain: ones at init, or (``zero_centered``, as
  Qwen3.5's) an offset from one, zeros at init."""

  def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs, zero_centered=False):
    del rngs
    self.eps, self.zero_centered = eps, zero_centered
    self.weight = param(None, (dim,), ("norm",), dtype, value=0.0 if zero_centered else 1.0)

  def __call__(self, x, ctx: Context):
    return rms_norm(x, self.weight[...], self.eps, self.zero_centered)


class SwiGLU(nnx.Module):
  """Llama FFN: ``(swish(x W_gate) * (x W_up)) W_down``."""

  def __init__(self, d_model: int, ffn_dim: int, *, std: float, dtype, rngs: nnx.Rngs):
    self.w_gate = param(rngs, (d_model, ffn_dim), ("embed", "ffn"), dtype, std=std)
    self.w_up = param(rngs, (d_model, ffn_dim), ("embed", "ffn"), dtype, std=std)
    self.w_down = param(rngs, (ffn_dim, d_model), ("ffn", "embed"), dtype, std=std)

  def __call__(self, x_BxNxD, ctx: Context):
    with jax.named_scope("swiglu"):
      act = ("act_batch", "act_seq", "act_ffn")
      gate = ctx.einsum("bnd,df->bnf", x_BxNxD, ctx.weight(self.w_gate, ("embed", "ffn")), act)
      up = ctx.einsum("bnd,df->bnf", x_BxNxD, ctx.weight(self.w_up, ("embed", "ffn")), act)
      h_BxNxF = jax.nn.silu(gate) * up
      return ctx.einsum("bnf,fd->bnd", h_BxNxF, ctx.weight(self.w_down, ("ffn", "embed")),
                        ("act_batch", "act_seq", "act_embed"))


def rope_positions(n: int, ctx: Context, layout: str):
  """True global positions ``(N,)`` of the tokens of a global array in the model's layout.

  In zigzag order over ``W`` sequence shards these are ``zigzag(arange(N), W)``; with one shard
  the zigzag order is the natural one.
  """
  pos = jnp.arange(n, dtype=jnp.int32)
  if layout == "zigzag" and ctx.seq_shards > 1:
    from lasp_jax.sequence_parallel.layout import zigzag
    pos = zigzag(pos, ctx.seq_shards, axis=0)
  return pos


def document_positions(segment_ids_BxN, ctx: Context, cfg):
  """True positions ``(B, N)`` int32 of the tokens within their documents, in the model's layout.

  A document starts wherever the id differs from the previous token's in natural order (design
  §13), and its first token is at position 0 (so is the row's first token). The ids must
  already be sharded like the tokens.
  """
  if not ctx.sequence_parallel:
    return _positions_in_documents(segment_ids_BxN)  # storage order is the natural one
  from lasp_jax.sequence_parallel import sharding
  # Not unzigzag + cummax on the global array: the SPMD partitioner turns a cummax over the sharded
  # sequence into an all-gather of all of it plus all-to-alls. Per shard, only each segment's
  # edges need to travel (``_document_positions_shard``).
  spec = jax.sharding.PartitionSpec(ctx.batch_axis, cfg.runtime.seq_axis)
  fn = functools.partial(_document_positions_shard, axis_name=cfg.runtime.seq_axis, layout=cfg.runtime.layout)
  return sharding.shard_map(fn, ctx.mesh, (spec,), spec, (segment_ids_BxN,))


def _positions_in_documents(ids_BxN):
  """Positions within documents of a whole sequence in natural order: ``t - start(t)``."""
  from lasp_jax.kernels.linear_attention.api import document_starts
  ar = jax.lax.broadcasted_iota(jnp.int32, ids_BxN.shape, 1)
  return ar - jax.lax.cummax(jnp.where(document_starts(ids_BxN), ar, 0), axis=1)


def _document_positions_shard(ids_BxC, *, axis_name, layout):
  """Per shard: the positions of its tokens within their documents, from ONE all-gather of three
  ints per segment and row (first id, last id, last start inside it): ``3 W S B`` ints, not the
  ``B N`` ids. A token's document starts at the latest start at or before it in natural order:
  inside its segment, at the segment's first token (when its id differs from the predecessor's
  last), or in an earlier segment."""
  from lasp_jax.kernels.linear_attention.api import document_starts
  from lasp_jax.sequence_parallel import layout as layout_lib
  w, c = jax.lax.axis_size(axis_name), ids_BxC.shape[1]
  nseg = layout_lib.segments_per_shard(layout)
  seg_len = c // nseg
  me = jax.lax.axis_index(axis_name)
  segs = [ids_BxC[:, s * seg_len:(s + 1) * seg_len] for s in range(nseg)]
  offsets = [layout_lib.segment_global_index(layout, me, w, s) * seg_len for s in range(nseg)]
  ar = jax.lax.broadcasted_iota(jnp.int32, segs[0].shape, 1)
  # Global position of the latest start inside each segment up to each token (-1: none yet).
  inner = [jax.lax.cummax(jnp.where(document_starts(x), ar + o, -1), axis=1)
           for x, o in zip(segs, offsets)]
  edges = jnp.stack([jnp.stack([x[:, 0], x[:, -1], i[:, -1]], -1) for x, i in zip(segs, inner)])
  gathered = jax.lax.all_gather(edges, axis_name).reshape(w * nseg, *edges.shape[1:])
  gathered = jnp.take(gathered, jnp.asarray(layout_lib.segment_order(layout, w)), axis=0)
  first, last, last_inner = gathered[..., 0], gathered[..., 1], gathered[..., 2]  # (P, B)
  seg_start = jnp.arange(w * nseg, dtype=jnp.int32)[:, None] * seg_len
  at_first = jnp.concatenate([jnp.ones_like(first[:1], bool), first[1:] != last[:-1]])
  latest = jnp.maximum(last_inner, jnp.where(at_first, seg_start, -1))       # (P, B)
  before = jnp.concatenate([jnp.full_like(latest[:1], -1),
                            jax.lax.cummax(latest, axis=0)[:-1]])           # starts before p
  out = []
  for s, (i, o) in enumerate(zip(inner, offsets)):
    p = layout_lib.segment_global_index(layout, me, w, s)
    own = jnp.maximum(jnp.take(before, p, axis=0), jnp.where(jnp.take(at_first, p, axis=0), o, -1))
    out.append(ar + o - jnp.maximum(i, own[:, None]))
  return jnp.concatenate(out, axis=1)


def apply_rope(x_BxNxHxD, positions, base: float, rotary_dim: int | None = None):
  """Rotary embedding (Llama-3 convention, half-split pairs): pair ``(x_i, x_{i+R/2})`` is
  rotated by angle ``p * base**(-2i/R)`` at true position ``p``: ``positions`` is ``(N,)``
  (global positions, shared by the batch) or ``(B, N)`` (positions within packed documents).
  ``rotary_dim`` ``R`` (None: all ``D``): only the first ``R`` dims rotate, the rest pass through
  (partial rotary, Qwen3.5). Computed in float32."""
  full = x_BxNxHxD.shape[-1]
  d = full if rotary_dim is None else rotary_dim
  if d % 2 or not 0 < d <= full:
    raise ValueError(f"RoPE needs an even rotary_dim in (0, head_dim={full}], got {d}")
  if d < full:
    rot = apply_rope(x_BxNxHxD[..., :d], positions, base)
    return jnp.concatenate([rot, x_BxNxHxD[..., d:]], axis=-1)
  inv_freq = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # (N, F) or (B, N, F)
  # -> (1, N, 1, F) or (B, N, 1, F), against x (B, N, H, F) halves
  lead = (None, slice(None)) if positions.ndim == 1 else (slice(None), slice(None))
  cos = jnp.cos(ang)[lead + (None, slice(None))]
  sin = jnp.sin(ang)[lead + (None, slice(None))]
  x = x_BxNxHxD.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxNxHxD.dtype)
