"""The state exchange alone (design §10): all-gather vs scan, compiled on W simulated CPU devices.

Shared by comm.py (collectives, bytes, sequential steps) and memory.py (per-device memory) and
scaling.py (the cost model). The whole LASP-2 op at W = 256 compiles slowly on CPU (the local pass
is the same for both strategies, so it adds nothing to the comparison): rows here are the
exchange ``exchange.prefix`` alone, in a ``shard_map`` over ``"sp"``, on abstract summaries of
the model's shape (``B, H, Dk, Dv``; diagonal: a per-channel log-decay, ``Dg = Dk``; delta: a
``Dk x Dk`` transition), with packed-document ids (the general case).

  fwd:     ``(summaries, ids) -> (s_in, final)``
  fwd+bwd: the gradient of ``|s_in|^2 + |final|^2`` w.r.t. the summaries (the backward needs the
           forward's outputs, as in training; ``grad`` only, so the loss's reduction is not run).

Each W needs ``JAX_NUM_CPU_DEVICES >= W`` before jax starts: ``sweep`` runs one subprocess per W
(``python benchmarks/_exchange.py '<json>'``) and collects its JSON rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
if _HERE not in sys.path:
  sys.path.append(_HERE)

KINDS = ("diagonal", "delta")
STRATEGIES = ("allgather", "scan")
LAYOUTS = ("contiguous", "zigzag")


def summary_bytes(kind, *, batch, heads, dk, dv):
  """One segment's summary ``(M, E)`` in float32 bytes (the ids' 8 bytes per row aside)."""
  m = dk * dk if kind == "delta" else dk
  return batch * heads * (m + dk * dv) * 4


def _program(strategy, kind, layout, w, passes, *, batch, heads, dk, dv):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lasp_jax.sequence_parallel import exchange
  from lasp_jax.sequence_parallel import layout as layout_lib

  mesh = jax.make_mesh((w,), ("sp",), devices=jax.devices()[:w])
  nseg = layout_lib.segments_per_shard(layout)
  sh = NamedSharding(mesh, P("sp"))
  def sds(*s, dt=jnp.float32):
    return jax.ShapeDtypeStruct((w, nseg, batch, *s), dt, sharding=sh)
  if kind == "delta":
    local = exchange.DeltaSummary(sds(heads, dk, dk), sds(heads, dk, dv))
  else:
    local = exchange.DiagonalSummary(sds(heads, dk), sds(heads, dk, dv))
  ids = (sds(dt=jnp.int32), sds(dt=jnp.int32))

  def per_shard(local, ids):
    local = jax.tree.map(lambda x: x[0], local)
    s_in, final = exchange.prefix(local, strategy=strategy, axis_name="sp", layout=layout,
                                  edge_ids=tuple(i[0] for i in ids))
    if strategy == "allgather":  # replicated as lasp2 makes it: a psum of device 0's copy
      final = jax.lax.psum(jnp.where(jax.lax.axis_index("sp") == 0, final, 0.0), "sp")
    return s_in[None], final

  f = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("sp"), (P("sp"), P("sp"))),
                    out_specs=(P("sp"), P()))

  def loss(local, ids):
    s_in, final = f(local, ids)
    return jnp.sum(jnp.square(s_in)) + jnp.sum(jnp.square(final))

  with jax.set_mesh(mesh):
    return jax.jit(f if passes == "fwd" else jax.grad(loss)).lower(local, ids).compile()


def measure(w, *, kinds=KINDS, strategies=STRATEGIES, layouts=LAYOUTS, passes=("fwd", "fwd+bwd"),
            batch=1, heads=16, dk=128, dv=128):
  """Rows for one W, in this process (needs W devices): HLO collectives, received bytes,
  sequential steps, XLA's per-device memory, and the schedule's own counts."""
  import _methods as M
  from lasp_jax.sequence_parallel import exchange
  from lasp_jax.sequence_parallel import layout as layout_lib
  rows = []
  dims = dict(batch=batch, heads=heads, dk=dk, dv=dv)
  for kind in kinds:
    for layout in layouts:
      for strategy in strategies:
        for p in passes:
          t0 = time.perf_counter()
          compiled = _program(strategy, kind, layout, w, p, **dims)
          ma = compiled.memory_analysis()
          row = dict(strategy=strategy, kind=kind, layout=layout, w=w, passes=p, **dims,
                     summary_bytes=summary_bytes(kind, **dims),
                     segments=layout_lib.segments_per_shard(layout),
                     **M.comm_summary(compiled.as_text(), w),
                     temp=ma.temp_size_in_bytes,
                     peak=(ma.argument_size_in_bytes + ma.output_size_in_bytes
                           + ma.temp_size_in_bytes - ma.alias_size_in_bytes),
                     compile_s=round(time.perf_counter() - t0, 2))
          if strategy == "scan":
            row["schedule"] = exchange.scan_counts(layout, w)
          rows.append(row)
          print(f"  exchange {strategy:<9} {kind:<8} {layout:<10} W={w:<4} {p:<8}"
                f" {row['compile_s']:.1f} s", file=sys.stderr, flush=True)
  return rows


def sweep(ws, **kwargs):
  """``measure`` for each W in a subprocess with ``JAX_NUM_CPU_DEVICES=W``; rows of all W."""
  rows = []
  for w in ws:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(w), JAX_PLATFORMS="cpu")
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env["XLA_FLAGS"] = flags + f" --xla_force_host_platform_device_count={w}"
    arg = json.dumps(dict(w=w, **{k: list(v) if isinstance(v, tuple) else v
                                  for k, v in kwargs.items()}))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), arg], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, text=True)
    if p.returncode:
      raise RuntimeError(f"exchange worker for W={w} exited {p.returncode}")
    rows += json.loads(p.stdout.strip().splitlines()[-1])
  return rows


def table(rows, what=("steps", "recv", "temp")):
  """One line per (kind, layout, strategy, passes), one column per W."""
  import _methods as M
  ws = sorted({r["w"] for r in rows})
  keys = sorted({(r["kind"], r["layout"], r["passes"], r["strategy"]) for r in rows})
  by = {(r["kind"], r["layout"], r["passes"], r["strategy"], r["w"]): r for r in rows}
  fmt = {"steps": lambda r: str(r["sequential_steps"]),
         "colls": lambda r: str(r["collectives"]),
         "recv": lambda r: M.fmt_bytes(r["received_bytes"]),
         "temp": lambda r: M.fmt_bytes(r["temp"]),
         "peak": lambda r: M.fmt_bytes(r["peak"])}
  lines = []
  for col in what:
    lines.append(f"-- {col} per device (one exchange of one layer) --")
    lines.append(f"{'kind':<9}{'layout':<11}{'pass':<9}{'strategy':<10}"
                 + "".join(f"{'W=' + str(w):>11}" for w in ws))
    for k in keys:
      cells = "".join(f"{fmt[col](by[k + (w,)]) if k + (w,) in by else '':>11}" for w in ws)
      lines.append(f"{k[0]:<9}{k[1]:<11}{k[2]:<9}{k[3]:<10}{cells}")
  return "\n".join(lines)


def plot(rows, path, key="received_bytes", ylabel="bytes received per device, fwd+bwd"):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kinds = sorted({r["kind"] for r in rows})
  fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    for layout in LAYOUTS:
      for strategy in STRATEGIES:
        pts = sorted((r["w"], r[key]) for r in rows if r["kind"] == kind and r["layout"] == layout
                     and r["strategy"] == strategy and r["passes"] == "fwd+bwd")
        if pts:
          ax.plot(*zip(*pts), marker="o", ls="-" if strategy == "scan" else "--",
                  label=f"{strategy} {layout}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("W (devices)")
    ax.set_ylabel(ylabel)
    r0 = next(r for r in rows if r["kind"] == kind)
    ax.set_title(f"exchange alone, {kind} (B={r0['batch']}, H={r0['heads']}, Dk={r0['dk']}, "
                 f"Dv={r0['dv']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


if __name__ == "__main__":
  spec = json.loads(sys.argv[1])
  w = spec.pop("w")
  print(json.dumps(measure(w, **{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in spec.items()})))
