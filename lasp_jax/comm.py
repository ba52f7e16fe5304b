"""Counting collectives and their bytes in compiled HLO: communication is measured, not assumed.

``collective_stats(fn, *abstract_args)`` compiles ``fn`` (give abstract inputs the sharding they have
in training, or resharding collectives pollute the count) and returns one ``Collective`` per
collective instruction, with the number of times it runs (collectives inside a ``while`` with a
known trip count run that many times).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+(" + "|".join(KINDS)
                    + r")(-start)?\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")  # a computation's header line
_WHILE = re.compile(r"while\(.*body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the compiled program.

  ``result_bytes`` is the size of what each device holds after it (for an all-gather the gathered
  buffer, for a reduce-scatter the scattered piece); ``count`` how many times it runs per call.
  """
  kind: str
  result_bytes: int
  count: int
  name: str

  @property
  def total_bytes(self) -> int:
    return self.result_bytes * self.count


def _shape_bytes(text: str) -> list[int]:
  return [_DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
          for dt, dims in _SHAPE.findall(text)]


def parse_collectives(hlo_text: str) -> list[Collective]:
  """Collectives of a compiled HLO module text (``compiled.as_text()``)."""
  comp_of_line, current = [], None
  lines = hlo_text.splitlines()
  for line in lines:
    m = _COMP.match(line)
    if m and " = " not in line:
      current = m.group(1)
    comp_of_line.append(current)
  trips: dict[str, int] = {}
  parent: dict[str, str] = {}
  for line, comp in zip(lines, comp_of_line):
    w = _WHILE.search(line)
    if w:
      t = _TRIP.search(line)
      trips[w.group(1)] = int(t.group(1)) if t else 1
      parent[w.group(1)] = comp

  def multiplicity(comp):
    n, seen = 1, set()
    while comp in trips and comp not in seen:
      seen.add(comp)
      n *= trips[comp]
      comp = parent.get(comp)
    return n

  out = []
  for line, comp in zip(lines, comp_of_line):
    m = _INSTR.match(line)
    if not m:
      continue
    sizes = _shape_bytes(m.group(2))
    if not sizes:
      continue
    # An async start returns (operand, result[, ...]); the gathered/scattered buffer is the last.
    out.append(Collective(m.group(3), sizes[-1] if m.group(4) else sum(sizes),
                          multiplicity(comp), m.group(1)))
  return out


def compiled_text(fn, *abstract_args, mesh=None) -> str:
  """``jax.jit(fn).lower(*abstract_args).compile().as_text()``, inside ``jax.set_mesh(mesh)``."""
  if mesh is None:
    return jax.jit(fn).lower(*abstract_args).compile().as_text()
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*abstract_args).compile().as_text()


def collective_stats(fn, *abstract_args, mesh=None) -> list[Collective]:
  """Compiles ``fn`` on abstract inputs and lists its collectives."""
  return parse_collectives(compiled_text(fn, *abstract_args, mesh=mesh))


def summarize(collectives: list[Collective]) -> dict[str, dict[str, int]]:
  """``{kind: {"count": runs per call, "bytes": result bytes per device per call}}``."""
  out: dict[str, dict[str, int]] = {}
  for c in collectives:
    entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
    entry["count"] += c.count
    entry["bytes"] += c.total_bytes
  return out
