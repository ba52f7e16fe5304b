"""Shared by the sequence-parallel benchmarks (comm, sp_speed, memory, scaling): the methods under
comparison, abstract sharded inputs, and what the compiled HLO says about communication.

Methods (all ``(q, k, v) -> o`` on global ``(B, N, H, D)`` arrays over mesh axis ``"sp"``):

  linear attention (causal, no decay):   lasp2, lasp1, ring_linear (left product), ulysses_linear
  softmax attention (causal, GQA):       lasp2h (all-gather K/V), ring_softmax, ulysses_softmax

Call ``set_devices(n)`` before anything imports jax.
"""

from __future__ import annotations

import os
import re
import sys

LINEAR = ("lasp2", "lasp1", "ring_linear", "ulysses_linear")
SOFTMAX = ("lasp2h", "ring_softmax", "ulysses_softmax")
METHODS = LINEAR + SOFTMAX
# What each method is compared with in ratios: its own family's LASP-2 op.
BASE = {m: ("lasp2" if m in LINEAR else "lasp2h") for m in METHODS}


def set_devices(n: int) -> None:
  """Simulated CPU devices; must run before jax initialises (else silently ignored)."""
  if "jax" in sys.modules:
    import jax
    if jax.device_count() < n and jax.default_backend() == "cpu":
      raise RuntimeError(f"jax already started with {jax.device_count()} devices; need {n}")
    return
  os.environ["JAX_NUM_CPU_DEVICES"] = str(n)
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  os.environ["XLA_FLAGS"] = flags + f" --xla_force_host_platform_device_count={n}"


def op(method, *, chunk_size=64):
  """The global-array op of ``method``: ``(q, k, v) -> o`` (mesh from ``jax.set_mesh``)."""
  import lasp_jax
  from lasp_jax import baselines as bl
  return {
      "lasp2": lambda q, k, v: lasp_jax.lasp2_attention(q, k, v, chunk_size=chunk_size),
      "lasp1": lambda q, k, v: bl.lasp1_attention(q, k, v, chunk_size=chunk_size),
      "ring_linear": lambda q, k, v: bl.ring_linear_attention(q, k, v),
      "ulysses_linear": lambda q, k, v: bl.ulysses_linear_attention(q, k, v, chunk_size=chunk_size),
      "lasp2h": lambda q, k, v: lasp_jax.lasp2h_attention(q, k, v),
      "ring_softmax": lambda q, k, v: bl.ring_softmax_attention(q, k, v),
      "ulysses_softmax": lambda q, k, v: bl.ulysses_softmax_attention(q, k, v),
  }[method]


def program(method, passes, *, chunk_size=64):
  """``"fwd"``: the op; ``"fwd+bwd"``: gradients of ``sum(o ** 2)`` w.r.t. q, k, v.

  The loss is not linear in ``o`` so that, as in training, the backward pass needs the forward
  output (with ``sum(o)`` the backward collectives would not depend on the forward ones and the
  two rings could overlap, which no real loss allows).
  """
  import jax
  import jax.numpy as jnp
  fn = op(method, chunk_size=chunk_size)
  if passes == "fwd":
    return fn
  # grad, not value_and_grad: the loss value's own all-reduce is not the layer's communication.
  return jax.grad(lambda q, k, v: jnp.sum(jnp.square(fn(q, k, v).astype(jnp.float32))),
                  argnums=(0, 1, 2))


def mesh_of(w):
  import jax
  return jax.make_mesh((w,), ("sp",), devices=jax.devices()[:w])


def shapes(method, *, batch, n, heads, kv_heads, dim):
  """``(q, k, v)`` shapes: linear methods use H heads for k/v, softmax methods ``kv_heads``."""
  hk = heads if method in LINEAR else kv_heads
  return (batch, n, heads, dim), (batch, n, hk, dim), (batch, n, hk, dim)


def abstract_inputs(mesh, method, dtype, **dims):
  """``jax.ShapeDtypeStruct``s with the training sharding (sequence split over ``"sp"``)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  sh = NamedSharding(mesh, P(None, "sp", None, None))
  return [jax.ShapeDtypeStruct(s, dtype, sharding=sh) for s in shapes(method, **dims)]


def compile_program(mesh, method, passes, dtype, *, chunk_size=64, **dims):
  import jax
  args = abstract_inputs(mesh, method, dtype, **dims)
  with jax.set_mesh(mesh):
    return jax.jit(program(method, passes, chunk_size=chunk_size)).lower(*args).compile()


# --- what the HLO says ----------------------------------------------------------------------------

_COLL = r"(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_REF = re.compile(r"%([\w.\-]+)")


def sequential_steps(hlo_text: str) -> int:
  """Collectives on the longest dependency chain of the entry computation.

  A collective (or its ``-start``) adds one step; everything else passes the count along its data
  edges. This is the number of communication rounds that cannot overlap one another (LASP-1's
  ring is ``W - 1`` deep; LASP-2's all-gather is 1). Collectives inside loops are not in the entry
  computation; none of the benchmarked programs has one (``lasp_jax.comm`` counts them anyway).
  """
  depth: dict[str, int] = {}
  in_entry = False
  best = 0
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if not in_entry:
      continue
    if line.startswith("}"):
      break
    m = _LINE.match(line)
    if not m:
      continue
    name, opcode, rest = m.group(1), m.group(3), m.group(4)
    rest = rest.split("metadata=")[0]
    d = max((depth.get(r, 0) for r in _REF.findall(rest)), default=0)
    if re.fullmatch(_COLL + r"(-start)?", opcode):
      d += 1
    depth[name] = d
    best = max(best, d)
  return best


def bytes_moved(kind: str, result_bytes: int, w: int) -> float:
  """Bytes each device receives for one collective, by the usual ring/pairwise algorithms.

  all-gather: ``(W-1)/W`` of the gathered result; reduce-scatter: ``W-1`` pieces of its result;
  all-to-all: ``(W-1)/W`` of its result; collective-permute: its result; all-reduce: ``2 (W-1)/W``
  of it (reduce-scatter + all-gather).
  """
  return {"all-gather": (w - 1) / w * result_bytes, "reduce-scatter": (w - 1) * result_bytes,
          "all-to-all": (w - 1) / w * result_bytes, "collective-permute": result_bytes,
          "all-reduce": 2 * (w - 1) / w * result_bytes}[kind]


def comm_summary(hlo_text: str, w: int) -> dict:
  """Counts, result bytes and received bytes per device, by kind, plus the sequential steps."""
  from lasp_jax import comm
  colls = comm.parse_collectives(hlo_text)
  kinds = comm.summarize(colls)
  moved = sum(bytes_moved(c.kind, c.result_bytes, w) * c.count for c in colls)
  return {"collectives": int(sum(c.count for c in colls)), "by_kind": kinds,
          "received_bytes": int(round(moved)), "sequential_steps": sequential_steps(hlo_text)}


def spec9_forward(method, *, w, batch, n, heads, kv_heads, dim, dtype_bytes):
  """design §9's forward yardstick: ``(received bytes per device, sequential steps)``."""
  c = n // w
  state = batch * heads * dim * dim * 4                        # float32 (B, H, Dk, Dv)
  marks = batch * heads * (dim + 1) * 4                        # design §13b, beside each state
  kv = 2 * batch * c * (heads if method in LINEAR else kv_heads) * dim * dtype_bytes
  return {
      "lasp2": ((w - 1) * (state + marks), 1),
      "lasp1": ((w - 1) * state, w - 1),
      "ring_linear": ((w - 1) * kv, w - 1),
      "ring_softmax": ((w - 1) * kv, w - 1),
      "lasp2h": ((w - 1) * kv, 1),
      # 4 all-to-alls of B C H D (W-1)/W elements (q, k, v in; o back).
      "ulysses_linear": (4 * batch * c * heads * dim * dtype_bytes * (w - 1) / w, 4),
      "ulysses_softmax": ((2 * batch * c * heads * dim + 2 * batch * c * kv_heads * dim)
                          * dtype_bytes * (w - 1) / w, 4),
  }[method]


def fmt_bytes(x: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(x) < 1024 or unit == "TiB":
      return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
    x /= 1024
  return str(x)


def write_json(path, payload):
  import json
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)
