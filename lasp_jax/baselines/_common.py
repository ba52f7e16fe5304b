"""Pieces the baselines share: input checks, global-array wrappers, decays, query blocks.

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

# The left-product ring never materialises more than this many query rows of scores at once.
QUERY_BLOCK = 512


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


def split_queries(q, q_pos):
  """``(B, Nq, ...), (Nq,) -> (nblk, B, blk, ...), (nblk, blk)``, blk the largest divisor of Nq
  that is <= QUERY_BLOCK."""
  nq = q.shape[1]
  blk = min(QUERY_BLOCK, nq)
  while nq % blk:
    blk -= 1
  nblk = nq // blk
  q_b = q.reshape(q.shape[0], nblk, blk, *q.shape[2:])
  return jnp.moveaxis(q_b, 1, 0), q_pos.reshape(nblk, blk)
