"""Pieces the baselines share: input checks, global-array wrappers, query blocks.

Nothing here communicates; the collectives live in the baseline modules themselves so that each
file shows its whole communication pattern.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lasp_jax.sequence_parallel import lasp2 as lasp2_lib
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
  g_spec = lasp2_lib.decay_spec(log_decay, batch_axis, seq_axis)
  per_shard = functools.partial(fn, axis_name=seq_axis, **kw)
  return sharding.shard_map(per_shard, mesh, (x_spec, x_spec, x_spec, g_spec), x_spec,
                            (q, k, v, log_decay), check_vma=check_vma)


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
