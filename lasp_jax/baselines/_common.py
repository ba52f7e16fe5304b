"""Pieces the baselines share: input checks, global-array wrappers, decays, local softmax.

Nothing here communicates; the collectives live in the baseline modules themselves so that each
file shows its whole communication pattern.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.linear_attention import reference as ref
from lasp_jax.sequence_parallel import sharding

# Softmax attention never materialises more than this many query rows of scores at once.
QUERY_BLOCK = 512
# Finite stand-in for -inf in running maxima: exp(NEG - finite) is 0 without inf - inf = NaN.
NEG = -1e30


def check_softmax_inputs(q, k, v):
  """SPEC section 6 shapes: ``q (B, N, H, D)``, ``k, v (B, N, Hkv, D)``, ``H % Hkv == 0``."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape (B, N, H, D), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must share (B, N, ., D), got q {q.shape} and k {k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads H={q.shape[2]} must be a multiple of key/value heads "
                     f"Hkv={k.shape[2]}")


def check_causal_linear(log_decay, causal, name):
  if not causal:
    raise ValueError(f"{name} is a causal baseline: causal=False is not supported "
                     f"(use lasp_jax.lasp2_attention for bidirectional linear attention)")


def mesh_sizes(mesh, seq_axis, batch_axis, n, bsz, multiple, what):
  """Resolves the mesh and checks that N and B split evenly; returns ``(mesh, W)``."""
  mesh = sharding.resolve_mesh(mesh)
  w = sharding.axis_size(mesh, seq_axis, "seq_axis")
  nb = sharding.axis_size(mesh, batch_axis, "batch_axis")
  if n % (w * multiple):
    times = f" * {what} ({multiple}) = {w * multiple}" if multiple > 1 else ""
    raise ValueError(f"sequence length N={n} must be a multiple of axis size ({seq_axis!r}: {w})"
                     + times)
  if bsz % nb:
    raise ValueError(f"batch size B={bsz} is not a multiple of the {batch_axis!r} axis size {nb}")
  return mesh, w


def run_sharded(fn, mesh, seq_axis, batch_axis, q, k, v, log_decay=None, check_vma=True, **kw):
  """Runs the per-shard ``fn(q, k, v, log_decay, axis_name=seq_axis, **kw)`` on global arrays."""
  x_spec = P(batch_axis, seq_axis, None, None)
  if log_decay is None:
    g_spec = None
  elif log_decay.ndim == 1:
    g_spec = P(None)
  else:
    g_spec = P(batch_axis, seq_axis, *([None] * (log_decay.ndim - 2)))
  per_shard = functools.partial(fn, axis_name=seq_axis, **kw)
  return sharding.shard_map(per_shard, mesh, (x_spec, x_spec, x_spec, g_spec), x_spec,
                            (q, k, v, log_decay), check_vma=check_vma)


def local_decays(log_decay, bsz, c_local, heads):
  """Decay sums of the local shard, restarted at its first token (SPEC section 4).

  Returns ``(b, to_end, gamma)``: the inclusive cumulative log-decay ``(B, C, H, Dg)``, the sum
  after each token to the end of the shard ``(B, C, H, Dg)``, the shard's total ``(B, H, Dg)``
  (``Dg`` is 1 or Dk), all float32 and <= 0; three Nones for no decay.
  """
  if log_decay is None:
    return None, None, None
  g = ref.per_token_log_decay(log_decay, bsz, c_local, heads)
  return (ref.cumsum_inclusive(g, axis=1), ref.cumsum_reverse_exclusive(g, axis=1),
          jnp.sum(g, axis=1))


def softmax_block(q, k, v, q_pos, kv_pos, *, causal, scale):
  """Unnormalised attention of ``q`` to one key block, for an online softmax.

  ``q (B, Nq, Hkv, R, D)`` (R query heads per key/value head), ``k, v (B, Nk, Hkv, D)``, positions
  int32 ``(Nq,)``, ``(Nk,)``. Returns float32 ``(row max (B, Hkv, R, Nq), row sum of exp, sum of
  exp * v (B, Hkv, R, Nq, D))``; a row that sees no key has max ``NEG`` and sums 0.
  """
  s = jnp.einsum("bqhrd,bkhd->bhrqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  if causal:
    mask = q_pos[:, None] >= kv_pos[None, :]
    s = jnp.where(mask, s, NEG)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  if causal:
    p = jnp.where(mask, p, 0.0)
  return m, jnp.sum(p, axis=-1), jnp.einsum("bhrqk,bkhd->bhrqd", p, v.astype(jnp.float32))


def merge_softmax(acc, block):
  """Online-softmax merge of two partial results ``(m, l, o)`` (see ``softmax_block``)."""
  m0, l0, o0 = acc
  m1, l1, o1 = block
  m = jnp.maximum(m0, m1)
  a0, a1 = jnp.exp(m0 - m), jnp.exp(m1 - m)
  return m, a0 * l0 + a1 * l1, a0[..., None] * o0 + a1[..., None] * o1


def finish_softmax(acc, dtype):
  """``(m, l, o (B, Hkv, R, Nq, D)) -> (B, Nq, Hkv * R, D)``; rows with no visible key give 0."""
  _, l, o = acc
  o = o / jnp.where(l > 0, l, 1.0)[..., None]
  b, hkv, r, nq, d = o.shape
  return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, nq, hkv * r, d).astype(dtype)


def group_queries(q, hkv):
  """``(B, N, H, D) -> (B, N, Hkv, H / Hkv, D)``: query head h uses key/value head h // (H/Hkv)."""
  b, n, h, d = q.shape
  return q.reshape(b, n, hkv, h // hkv, d)


def split_queries(q_grouped, q_pos):
  """``(B, Nq, Hkv, R, D), (Nq,) -> (nblk, B, blk, Hkv, R, D), (nblk, blk)``, blk <= QUERY_BLOCK."""
  nq = q_grouped.shape[1]
  blk = min(QUERY_BLOCK, nq)
  while nq % blk:
    blk -= 1
  nblk = nq // blk
  q_b = q_grouped.reshape(q_grouped.shape[0], nblk, blk, *q_grouped.shape[2:])
  return jnp.moveaxis(q_b, 1, 0), q_pos.reshape(nblk, blk)


def attend_blocks(q_b, pos_b, k, v, kv_pos, acc=None, *, causal, scale):
  """Online-softmax step: merges attention of every query block to keys ``k, v`` into ``acc``.

  ``q_b, pos_b`` from ``split_queries``; ``acc`` None or the ``(m, l, o)`` this returns, each with
  a leading query-block axis. Each query block's scores are rematerialised in the backward pass.
  """
  @jax.checkpoint
  def one(args):
    q_blk, p_blk, acc_blk = args
    part = softmax_block(q_blk, k, v, p_blk, kv_pos, causal=causal, scale=scale)
    return part if acc_blk is None else merge_softmax(acc_blk, part)

  return jax.lax.map(one, (q_b, pos_b, acc))


def finish_blocks(acc, dtype):
  """``(m, l, o)`` with leading query-block axis -> ``(B, Nq, H, D)``."""
  o = jax.vmap(lambda a: finish_softmax(a, dtype))(acc)                  # (nblk, B, blk, H, D)
  nblk, b, blk, h, d = o.shape
  return jnp.moveaxis(o, 0, 1).reshape(b, nblk * blk, h, d)


def local_softmax_attention(q, k, v, q_pos, kv_pos, *, causal, scale):
  """Dense softmax attention on one device, ``QUERY_BLOCK`` query rows at a time.

  ``q (B, Nq, H, D)``, ``k, v (B, Nk, Hkv, D)``; positions int32. Every query block sees all keys
  (one dense block of scores), rematerialised in the backward pass, so memory is
  ``O(QUERY_BLOCK * Nk)`` per head rather than ``O(Nq * Nk)``. A baseline's local attention, not a
  flash kernel.
  """
  q_b, pos_b = split_queries(group_queries(q, k.shape[2]), q_pos)
  return finish_blocks(attend_blocks(q_b, pos_b, k, v, kv_pos, causal=causal, scale=scale),
                       q.dtype)
