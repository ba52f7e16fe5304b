"""Logical axis names -> mesh axes, in one place, and the per-call sharding context.

Weights carry logical axis names in their ``logical_axes`` metadata (``nnx.Param(...,
logical_axes=(...))``); activations are constrained by logical name too. ``ShardingRules`` is the
only table that turns those names into mesh axes. A mesh axis the mesh lacks, or one that does
not divide the dimension, is dropped (replicated), so one model runs on any mesh shape.

The linear and softmax ops want the heads of q, k, v replicated and the sequence split over
``seq_axis``; weights stored on ``fsdp`` are gathered at use (FSDP), ``tensor`` stays split on
the FFN and vocabulary dimensions. The gates' parameters (GLA's, KDA's low rank ``(embed, rank)``,
``(rank, q_heads, head_dim)``; the per-head ``(embed, q_heads)`` projections of simple GLA's and
Gated DeltaNet's decay and of the delta rule's ``beta``; the biases, ``dt_bias`` and ``A_log`` on
``q_heads``) follow the projections, split over ``tensor`` by head; the small per-head vectors are
gathered whole where they meet the activations (whose heads are not split). Mixture-of-Memories
layers (``models/mom.py``) keep each memory's projections, gates and convs on the ``q_heads`` axis,
memory-major (memory ``m``'s head ``h`` is head ``m * H + h``), so they split over ``tensor`` like
any head; the router ``(embed, memories)`` is small and whole on every device.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lasp_jax.sequence_parallel import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis -> mesh axis (or tuple of axes, or None)."""

  # Activations.
  act_batch: tuple[str, ...] | str | None = ("data",)
  act_seq: str | None = "sp"
  act_embed: str | None = None
  act_heads: str | None = None  # the attention ops want all heads of a token on its device
  act_ffn: str | None = "tensor"
  act_vocab: str | None = "tensor"
  # Weights.
  vocab: str | None = "tensor"
  embed: str | None = "fsdp"
  q_heads: str | None = "tensor"
  kv_heads: str | None = "tensor"
  head_dim: str | None = None
  ffn: str | None = "tensor"
  feature: str | None = None
  rank: str | None = None
  norm: str | None = None
  conv: str | None = None  # the taps of the short conv (a handful: never split)
  memories: str | None = None  # MoM's router columns, one per memory (a handful: never split)

  @classmethod
  def from_config(cls, cfg) -> "ShardingRules":
    t, f = cfg.runtime.tensor_axis, cfg.runtime.fsdp_axis
    return cls(act_batch=tuple(cfg.runtime.batch_axes), act_seq=cfg.runtime.seq_axis, act_ffn=t, act_vocab=t,
               vocab=t, embed=f, q_heads=t, kv_heads=t, ffn=t)

  def spec(self, logical: Sequence[str | None], mesh, shape=None, drop=()) -> P:
    """PartitionSpec for ``logical`` names on ``mesh``; ``drop``: mesh axes to leave out."""
    names = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else {}
    used: set[str] = set()
    parts = []
    for i, name in enumerate(logical):
      target = None if name is None else getattr(self, name)
      axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
      keep = []
      size = 1
      for a in axes:
        if a not in names or a in drop or a in used:
          continue
        if shape is not None and shape[i] % (size * names[a]):
          continue
        keep.append(a)
        size *= names[a]
      used.update(keep)
      parts.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*parts)


@dataclasses.dataclass(frozen=True)
class Context:
  """What one forward call knows about its mesh, resolved once at the top of the model."""

  rules: ShardingRules
  mesh: object = None            # the abstract mesh of the ``jax.set_mesh`` context, or None
  seq_shards: int = 1            # devices on the sequence axis (1: the one-device ops)
  batch_axis: str | None = None  # the batch mesh axis the ops split B over
  compute_dtype: jnp.dtype = jnp.float32

  @property
  def sequence_parallel(self) -> bool:
    return self.mesh is not None and self.rules.act_seq in self.mesh.axis_names

  @property
  def explicit(self) -> bool:
    types = getattr(self.mesh, "axis_types", ()) if self.mesh is not None else ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)

  def constrain(self, x, logical):
    if self.mesh is None:
      return x
    return self._reshard(x, self.rules.spec(logical, self.mesh, x.shape))

  def _reshard(self, x, spec):
    return sharding_lib.reshard(x, self.mesh, spec)

  def weight(self, param, logical):
    """A weight in the compute dtype, gathered over the FSDP axis (the all-gather of FSDP)."""
    w = param[...].astype(self.compute_dtype)
    if self.mesh is None:
      return w
    spec = self.rules.spec(logical, self.mesh, w.shape, drop=_as_tuple(self.rules.embed))
    return self._reshard(w, spec)

  def einsum(self, eq, x, w, out_logical):
    """``jnp.einsum`` whose output is sharded as ``out_logical`` (explicit meshes need it said)."""
    if self.mesh is None:
      return jnp.einsum(eq, x, w)
    out_shape = _einsum_out_shape(eq, x.shape, w.shape)
    spec = self.rules.spec(out_logical, self.mesh, out_shape)
    if self.explicit:
      return jnp.einsum(eq, x, w, out_sharding=spec)
    return self._reshard(jnp.einsum(eq, x, w), spec)

  def take_rows(self, table, idx, out_logical):
    """``table[idx]`` (an embedding lookup) with its output sharded as ``out_logical``."""
    if self.mesh is None:
      return jnp.take(table, idx, axis=0)
    spec = self.rules.spec(out_logical, self.mesh, idx.shape + table.shape[1:])
    if self.explicit:
      return table.at[idx].get(out_sharding=spec)
    return self._reshard(jnp.take(table, idx, axis=0), spec)


def _einsum_out_shape(eq, x_shape, w_shape):
  ins, out = eq.replace(" ", "").split("->")
  sizes = {}
  for letters, shape in zip(ins.split(","), (x_shape, w_shape)):
    sizes.update(zip(letters, shape))
  return tuple(sizes[c] for c in out)


def _as_tuple(a):
  return () if a is None else ((a,) if isinstance(a, str) else tuple(a))


def make_context(cfg, mesh=None) -> Context:
  """The context of one forward call: ``mesh`` or the ``jax.set_mesh`` one (None: one device)."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or not mesh.axis_names:
      mesh = None
  rules = ShardingRules.from_config(cfg)
  dtype = jnp.dtype(cfg.runtime.compute_dtype)
  if mesh is None:
    return Context(rules=rules, compute_dtype=dtype)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  present = [a for a in cfg.runtime.batch_axes if a in sizes]
  # The ops split B over one mesh axis; with several batch axes the others are gathered there.
  batch_axis = present[0] if present else None
  return Context(rules=rules, mesh=mesh, seq_shards=sizes.get(cfg.runtime.seq_axis, 1),
                 batch_axis=batch_axis, compute_dtype=dtype)
