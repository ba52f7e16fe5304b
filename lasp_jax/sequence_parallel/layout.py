"""Sequence layouts over the devices of a mesh axis (design §5).

``contiguous``: device ``r`` holds tokens ``[r*C, (r+1)*C)``.
``zigzag``: the sequence is cut into ``2W`` equal chunks ``z_0 .. z_{2W-1}``; device ``r`` holds
``[z_r, z_{2W-1-r}]``, which balances causal attention work across devices. A *global array in
zigzag order* is the concatenation over ``r`` of ``(z_r, z_{2W-1-r})``. ``zigzag`` / ``unzigzag``
convert global arrays; on a sequence-sharded array they move half-shards between devices.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lasp_jax.sequence_parallel import sharding

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


def to_segments(x, nseg: int):
  """A shard's ``S`` segments stacked on the batch axis: ``(B, C, ...) -> (S * B, C / S, ...)``,
  segment-major (None stays None)."""
  if x is None or nseg == 1:
    return x
  b, c = x.shape[:2]
  x = x.reshape(b, nseg, c // nseg, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape(nseg * b, c // nseg, *x.shape[3:])


def from_segments(x, nseg: int):
  """The inverse of :func:`to_segments`: ``(S * B, L, ...) -> (B, S * L, ...)``."""
  if nseg == 1:
    return x
  sb, length = x.shape[:2]
  x = x.reshape(nseg, sb // nseg, length, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape(sb // nseg, nseg * length, *x.shape[3:])


def storage_positions(layout: str, num_shards: int, local_len: int) -> np.ndarray:
  """True global positions ``(W * C,)`` int32 of a sequence in storage order (a global array in
  ``layout`` order, or the all-gather of its shards), computed on the host."""
  nseg = segments_per_shard(layout)
  seg_len = local_len // nseg
  ar = np.arange(seg_len, dtype=np.int32)
  return np.concatenate([ar + seg_len * segment_global_index(layout, r, num_shards, s)
                         for r in range(num_shards) for s in range(nseg)])


def _check_divisible(x, num_shards, axis, what):
  n = x.shape[axis]
  if not isinstance(num_shards, int) or num_shards <= 0:
    raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
  if n % (2 * num_shards):
    raise ValueError(f"{what}: sequence length {n} (axis {axis}) is not divisible by "
                     f"2 * num_shards = {2 * num_shards}")


def _chunk_holder(chunk: int, num_shards: int) -> int:
  """The device that holds natural chunk ``chunk`` in the zigzag layout."""
  return chunk if chunk < num_shards else 2 * num_shards - 1 - chunk


def _zigzag_perms(num_shards: int) -> tuple[list, list]:
  """``(source, dest)`` pairs moving each device's even / odd natural chunk, contiguous -> zigzag.

  In the contiguous layout device ``s`` holds chunks ``2s, 2s+1``; in the zigzag one device ``r``
  holds ``r`` and ``2W-1-r``, of which exactly one is even. So sending every device's first half
  (its even chunk) is a full permutation, and so is sending every second half: two ppermutes.
  """
  return tuple([(s, _chunk_holder(2 * s + h, num_shards)) for s in range(num_shards)]
               for h in (0, 1))


def _swap_halves(x, *, axis_name, axis, num_shards, inverse):
  """Per shard ``(..., C, ...)``: contiguous -> zigzag (``inverse=False``) or back, by ppermutes."""
  first, second = jnp.split(x, 2, axis=axis)
  # Device r's zigzag chunks are (r, 2W-1-r): the even one comes first exactly when r is even.
  odd = jax.lax.axis_index(axis_name) % 2 == 1
  perms = _zigzag_perms(num_shards)
  if not inverse:
    even = jax.lax.ppermute(first, axis_name, perms[0])
    odd_chunk = jax.lax.ppermute(second, axis_name, perms[1])
    first, second = jnp.where(odd, odd_chunk, even), jnp.where(odd, even, odd_chunk)
  else:
    even, odd_chunk = jnp.where(odd, second, first), jnp.where(odd, first, second)
    first = jax.lax.ppermute(even, axis_name, [(d, s) for s, d in perms[0]])
    second = jax.lax.ppermute(odd_chunk, axis_name, [(d, s) for s, d in perms[1]])
  return jnp.concatenate([first, second], axis=axis)


def _named_sharding(x):
  """The ``NamedSharding`` ``x`` carries, or None (numpy, single-device, other shardings).

  A concrete array knows its sharding on Auto and Explicit axes alike; a tracer only on Explicit
  axes (``jax.typeof``), Auto axes being decided later by the partitioner.
  """
  if isinstance(x, jax.core.Tracer):
    s = getattr(jax.typeof(x), "sharding", None)
  else:
    s = getattr(x, "sharding", None)
  return s if isinstance(s, NamedSharding) else None


def _names(entry) -> tuple:
  """Mesh axis names of one ``PartitionSpec`` entry (None, a name or a tuple of names)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec_along(current, mesh, ndim, axis, names) -> P:
  """The input's spec (when on ``mesh``) with ``axis`` split over ``names`` and nowhere else."""
  entries = [None] * ndim
  if current is not None and tuple(current.mesh.axis_names) == tuple(mesh.axis_names):
    entries = list(current.spec) + [None] * (ndim - len(current.spec))
  entries = [tuple(n for n in _names(e) if n not in names) or None for e in entries]
  entries = [e[0] if e is not None and len(e) == 1 else e for e in entries]
  entries[axis] = None if not names else names[0] if len(names) == 1 else names
  return P(*entries)


def _permute_chunks(x, num_shards, axis, inverse):
  """The ``2W`` chunks of ``x`` along ``axis`` statically reordered: for unsharded sequences.

  Written as reshape, reverse and stack rather than ``2W`` slices and a concatenate: fed into a
  resharding (``lasp2_attention`` splits its inputs over the mesh), the slices and concatenate of
  an unsharded input took 30 s to compile forward and minutes under ``jit(grad(...))`` on 8
  simulated devices (issue 23), the XLA partitioner handling each of the ``2W`` pieces apart.
  Natural order is ``(2, W)`` chunks ``[[z_0 .. z_{W-1}], [z_W .. z_{2W-1}]]``; zigzag order is
  ``(W, 2)`` chunks ``[[z_r, z_{2W-1-r}] for r]``: the first row, and the second row reversed.
  """
  w, chunk = num_shards, x.shape[axis] // (2 * num_shards)
  before, after = x.shape[:axis], x.shape[axis + 1:]
  if not inverse:
    y = x.reshape(*before, 2, w, chunk, *after)
    first = jax.lax.index_in_dim(y, 0, axis, keepdims=False)
    second = jax.lax.rev(jax.lax.index_in_dim(y, 1, axis, keepdims=False), (axis,))
    return jnp.stack([first, second], axis=axis + 1).reshape(x.shape)
  y = x.reshape(*before, w, 2, chunk, *after)
  first = jax.lax.index_in_dim(y, 0, axis + 1, keepdims=False)
  second = jax.lax.rev(jax.lax.index_in_dim(y, 1, axis + 1, keepdims=False), (axis,))
  return jnp.stack([first, second], axis=axis).reshape(x.shape)


def _convert(x, num_shards, axis, mesh, seq_axis, *, inverse):
  what = "unzigzag" if inverse else "zigzag"
  _check_divisible(x, num_shards, axis, what)
  axis = axis % x.ndim
  current = _named_sharding(x)
  context = jax.sharding.get_abstract_mesh()
  if seq_axis is None:
    if mesh is not None:
      raise ValueError(f"{what}: mesh= needs seq_axis=, the mesh axis that splits axis {axis}")
    spec = () if current is None else tuple(current.spec)
    names = _names(spec[axis] if axis < len(spec) else None)
    mesh = None if current is None else current.mesh
  else:
    names = _names(seq_axis)
    if mesh is None:
      # The input's mesh or the context's, whichever has the axis (else the error names one).
      meshes = [m for m in (None if current is None else current.mesh, context)
                if m is not None and m.axis_names]
      mesh = sharding.resolve_mesh(next((m for m in meshes if set(names) <= set(m.axis_names)),
                                        meshes[0] if meshes else None))
  size = int(np.prod([sharding.axis_size(mesh, n, "seq_axis") for n in names]))
  if seq_axis is not None and size != num_shards:
    raise ValueError(f"{what}: num_shards={num_shards} but seq_axis {seq_axis!r} has size {size}")
  if num_shards == 1:  # two chunks, both on the one shard, in the same order in both layouts
    return jnp.asarray(x)
  if not names:
    return _permute_chunks(x, num_shards, axis, inverse)
  # A tracer's mesh is abstract: resharding to a bare spec needs it as the context mesh.
  scope = (jax.sharding.use_abstract_mesh(mesh)
           if isinstance(mesh, jax.sharding.AbstractMesh) and not context.axis_names
           else contextlib.nullcontext())
  with scope:
    if size == num_shards:
      spec = _spec_along(current, mesh, x.ndim, axis, names)
      fn = functools.partial(_swap_halves, axis_name=names if len(names) > 1 else names[0],
                             axis=axis, num_shards=num_shards, inverse=inverse)
      return sharding.shard_map(fn, mesh, (spec,), spec, (x,))
    # Split into a number of pieces other than num_shards: chunks do not fall on shard
    # boundaries, so gather the sequence axis first (Explicit axes refuse to split a sharded
    # axis unevenly), then permute locally.
    x = sharding.reshard(x, mesh, _spec_along(current, mesh, x.ndim, axis, ()))
    return _permute_chunks(x, num_shards, axis, inverse)


def zigzag(x, num_shards: int, axis: int = 1, *, mesh=None, seq_axis=None):
  """Natural order -> zigzag order along ``axis``.

  Where the data lives picks the method. When ``x`` is split along ``axis`` over mesh axes of total
  size ``num_shards`` (``seq_axis`` given, or read from the input's sharding: ``x.sharding`` for a
  concrete array, ``jax.typeof(x).sharding`` for a tracer, which only Explicit axes fill in), it is
  a ``shard_map`` of two ``ppermute``s of half-shards (each device holds two of the ``2W`` chunks in
  either layout): no all-gather, and cheap to compile inside ``jit(grad(...))``, where splitting a
  sharded axis into ``2W`` pieces is a storm of collectives. The result is split like the input.
  Otherwise (numpy, single-device or replicated arrays, tracers on Auto axes without ``seq_axis``)
  it is a static permutation of the ``2W`` chunks in ``jnp``; a sequence split into a number of
  pieces other than ``num_shards`` is gathered first.

  Args:
    x: array with the sequence on ``axis``; its length must be a multiple of ``2 * num_shards``.
    num_shards: W, the number of sequence shards the layout is for.
    axis: the sequence axis (1 for ``(B, N, ...)``).
    mesh: with ``seq_axis`` only: its mesh; None takes the input's or the ``jax.set_mesh`` one.
    seq_axis: mesh axis name (or tuple of names) of size ``num_shards`` to split ``axis`` over;
      ``x`` is resharded onto it when it is not already. Pass it for tracers on Auto meshes.

  Returns:
    ``x`` permuted along ``axis``: same shape and dtype.
  """
  return _convert(x, num_shards, axis, mesh, seq_axis, inverse=False)


def unzigzag(x, num_shards: int, axis: int = 1, *, mesh=None, seq_axis=None):
  """Zigzag order -> natural order along ``axis``; the inverse of ``zigzag``, same arguments."""
  return _convert(x, num_shards, axis, mesh, seq_axis, inverse=True)


def natural_rows(x, start: int, stop: int, layout: str, num_shards: int, axis: int = 1):
  """Rows ``[start, stop)`` in natural order of a global array stored in ``layout`` order over
  ``num_shards`` shards (a decode cache wants the last tokens of a prompt).

  The rows must lie in storage order in one run (any range, contiguous; one inside one of the
  ``2W`` chunks, zigzag; else a static gather). When ``x`` is split along ``axis`` over
  ``num_shards`` devices on Explicit axes (which refuse to slice a split axis unevenly) and the
  run is on one device, that device sends them: a ``shard_map`` and a ``psum`` of just those rows.
  The result is replicated along ``axis``.
  """
  n = x.shape[axis]
  axis = axis % x.ndim
  if not 0 <= start < stop <= n:
    raise ValueError(f"rows [{start}, {stop}) are not a non-empty range inside the sequence of "
                     f"length {n}")
  if layout == "contiguous" or num_shards == 1:
    where = np.arange(start, stop)
  else:
    _check_divisible(x, num_shards, axis, "natural_rows")
    where = np.argsort(storage_positions(layout, num_shards, n // num_shards))[start:stop]
  first, count = int(where[0]), stop - start
  current = _named_sharding(x)
  names = _names(current.spec[axis]) if current is not None and axis < len(current.spec) else ()
  mesh = None if current is None else current.mesh
  size = int(np.prod([sharding.axis_size(mesh, a) for a in names])) if names else 1
  local = n // size
  one_run = not np.any(np.diff(where) != 1)
  if size == 1 or not one_run or first // local != (first + count - 1) // local:
    if size > 1:  # rows on several devices: gather the axis first
      x = sharding.reshard(x, mesh, _spec_along(current, mesh, x.ndim, axis, ()))
    if not one_run:
      return jnp.take(x, jnp.asarray(where), axis=axis)
    return jax.lax.slice_in_dim(x, first, first + count, axis=axis)
  owner, offset = first // local, first % local
  axis_name = names if len(names) > 1 else names[0]
  spec = _spec_along(current, mesh, x.ndim, axis, names)
  out_spec = _spec_along(current, mesh, x.ndim, axis, ())

  def pick(x_local):
    rows = jax.lax.slice_in_dim(x_local, offset, offset + count, axis=axis)
    mine = jax.lax.axis_index(axis_name) == owner
    return jax.lax.psum(jnp.where(mine, rows, jnp.zeros_like(rows)), axis_name)

  return sharding.shard_map(pick, mesh, (spec,), out_spec, (x,))
