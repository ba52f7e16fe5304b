"""Sequence layouts over the devices of a mesh axis (SPEC section 5).

``contiguous``: device ``r`` holds tokens ``[r*C, (r+1)*C)``.
``zigzag``: the sequence is cut into ``2W`` equal chunks ``z_0 .. z_{2W-1}``; device ``r`` holds
``[z_r, z_{2W-1-r}]``, which balances causal attention work across devices. A *global array in zigzag
order* is the concatenation over ``r`` of ``(z_r, z_{2W-1-r})``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def segments_per_shard(layout: str) -> int:
  """How many contiguous runs of the natural sequence one device holds."""
  check_layout(layout)
  return 2 if layout == "zigzag" else 1


def segment_order(layout: str, num_shards: int) -> np.ndarray:
  """``order[p]`` = flat index ``r * S + s`` of the local segment that sits at global position p."""
  check_layout(layout)
  if layout == "contiguous":
    return np.arange(num_shards)
  order = np.empty(2 * num_shards, dtype=np.int64)
  for r in range(num_shards):
    order[r] = 2 * r
    order[2 * num_shards - 1 - r] = 2 * r + 1
  return order


def segment_global_index(layout: str, shard_index, num_shards: int, segment: int):
  """Global position (in units of segments) of local segment ``segment`` of shard ``shard_index``.

  Works on Python ints and on traced ``jax.lax.axis_index`` values alike.
  """
  check_layout(layout)
  if layout == "contiguous":
    return shard_index
  return shard_index if segment == 0 else 2 * num_shards - 1 - shard_index


def local_positions(layout: str, shard_index, num_shards: int, local_len: int):
  """True global token positions ``(local_len,)`` int32 of the tokens a shard holds."""
  nseg = segments_per_shard(layout)
  seg_len = local_len // nseg
  offsets = [segment_global_index(layout, shard_index, num_shards, s) * seg_len
             for s in range(nseg)]
  ar = jnp.arange(seg_len, dtype=jnp.int32)
  return jnp.concatenate([ar + jnp.asarray(o, jnp.int32) for o in offsets])


def _check_divisible(x, num_shards, axis, what):
  n = x.shape[axis]
  if not isinstance(num_shards, int) or num_shards <= 0:
    raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
  if n % (2 * num_shards):
    raise ValueError(f"{what}: sequence length {n} (axis {axis}) is not divisible by "
                     f"2 * num_shards = {2 * num_shards}")


def zigzag(x, num_shards: int, axis: int = 1):
  """Natural order -> zigzag order along ``axis``."""
  _check_divisible(x, num_shards, axis, "zigzag")
  chunks = jnp.split(x, 2 * num_shards, axis=axis)
  order = segment_order("zigzag", num_shards)
  # order[p] is where natural chunk p goes; invert it to list chunks in storage order.
  inv = np.argsort(order)
  return jnp.concatenate([chunks[i] for i in inv], axis=axis)


def unzigzag(x, num_shards: int, axis: int = 1):
  """Zigzag order -> natural order along ``axis``."""
  _check_divisible(x, num_shards, axis, "unzigzag")
  chunks = jnp.split(x, 2 * num_shards, axis=axis)
  order = segment_order("zigzag", num_shards)
  return jnp.concatenate([chunks[i] for i in order], axis=axis)
