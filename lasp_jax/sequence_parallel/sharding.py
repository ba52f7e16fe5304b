"""The one place that knows about meshes: axis checks, resharding, and the shard_map wrapper.

Users build meshes two ways: ``jax.make_mesh`` (Explicit axes) and ``jax.sharding.Mesh`` (Auto axes).
Every op here accepts both, eagerly, under ``jax.jit`` and inside ``with jax.set_mesh(mesh)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def resolve_mesh(mesh):
  """``mesh`` itself, or the mesh of the enclosing ``jax.set_mesh`` context when None."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not mesh.axis_names:
      raise ValueError("mesh=None needs an enclosing `with jax.set_mesh(mesh):`; pass mesh=...")
  return mesh


def axis_size(mesh, axis_name: str | None, role: str = "axis") -> int:
  """Size of a mesh axis (1 for None); ValueError naming the axis if the mesh lacks it."""
  if axis_name is None:
    return 1
  names = tuple(mesh.axis_names)
  if axis_name not in names:
    raise ValueError(f"{role} {axis_name!r} is not an axis of the mesh; its axes are {names}")
  return int(dict(zip(names, mesh.axis_sizes))[axis_name])


def _is_explicit(mesh, spec: P) -> bool:
  """Whether ``jax.reshard`` (Explicit axes) rather than a sharding constraint (Auto) applies.

  Decided by the axes ``spec`` names, or for a spec naming none (replicated) by the mesh itself:
  ``with_sharding_constraint`` to ``P()`` on an Explicit mesh is refused.
  """
  types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ())))
  used = [a for part in spec if part is not None
          for a in (part if isinstance(part, tuple) else (part,))]
  explicit = jax.sharding.AxisType.Explicit
  if not used:
    return any(t == explicit for t in types.values())
  return any(types.get(a) == explicit for a in used)


def reshard(x, mesh, spec: P):
  """Puts ``x`` on ``mesh`` with ``spec``: ``jax.reshard`` on Explicit axes, a constraint on Auto."""
  if x is None:
    return None
  if _is_explicit(mesh, spec):
    target = NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
    return jax.reshard(x, target)
  if isinstance(mesh, jax.sharding.Mesh):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.lax.with_sharding_constraint(x, spec)


def shard_map(fn: Callable, mesh, in_specs: Sequence, out_specs, args: Sequence,
              check_vma: bool = True):
  """Reshards ``args`` to ``in_specs`` and runs ``fn`` per shard. ``None`` args pass through."""
  present = [i for i, a in enumerate(args) if a is not None]

  def per_shard(*xs):
    full = [None] * len(args)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)

  specs = tuple(in_specs[i] for i in present)
  xs = tuple(reshard(args[i], mesh, in_specs[i]) for i in present)
  mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=out_specs,
                         check_vma=check_vma)
  # jit so that eager callers get one compiled program rather than op-by-op dispatch per shard.
  return jax.jit(mapped)(*xs)
