"""Forward+backward time of each sequence-parallel method, side by side, and ratios to LASP-2.

  python benchmarks/sp_speed.py [--n 2048 8192] [--out benchmarks/results/sp_speed.json] [--small]

Every method of ``benchmarks/_methods.py`` runs value-and-grad of ``sum(o)`` on the same inputs
over a W-device sequence axis; repeats are interleaved across methods (every method sees the same
machine load) and the median is reported, with its ratio to its family's LASP op (linear methods
to LASP-2, softmax methods to LASP-2H). On CPU the W devices are simulated and share the host's
cores, so a time is the total work of all devices plus memcpy "communication": it shows compute
overheads (e.g. the left-product ring's N^2 / W work), not network costs (see comm.py, scaling.py).
On a GPU/TPU host, W is the number of accelerators (``--w`` caps it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
# The repository before benchmarks/ (which has a kernels.py of its own), then benchmarks/.
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:
  sys.path.append(_HERE)
import _methods as M  # noqa: E402


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--methods", nargs="+", default=list(M.METHODS), choices=M.METHODS)
  ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
  ap.add_argument("--w", type=int, default=8, help="devices on the sequence axis (CPU: simulated)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--chunk", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--small", action="store_true", help="toy sizes (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/sp_speed.json")
  ap.add_argument("--plot", default=None)
  args = ap.parse_args(argv)
  if args.small:
    args.n, args.w, args.heads, args.kv_heads, args.dim, args.chunk, args.repeats = (
        [256], 2, 2, 2, 16, 16, 1)
  return args


def main(argv=None):
  args = parse(argv)
  M.set_devices(args.w)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  w = min(args.w, jax.device_count())
  mesh = M.mesh_of(w)
  sh = NamedSharding(mesh, P(None, "sp", None, None))
  dtype = jnp.dtype(args.dtype)
  rows = []
  for n in args.n:
    key = jax.random.split(jax.random.PRNGKey(n), 3)
    fns, inputs, compile_s = {}, {}, {}
    for m in args.methods:
      if m.startswith("ulysses") and args.heads % w:
        continue
      shp = M.shapes(m, batch=args.batch, n=n, heads=args.heads, kv_heads=args.kv_heads,
                     dim=args.dim)
      xs = [jax.device_put(jax.random.normal(k, s, dtype) * 0.5, sh) for k, s in zip(key, shp)]
      fn = jax.jit(M.program(m, "fwd+bwd", chunk_size=args.chunk))
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        jax.block_until_ready(fn(*xs))
      compile_s[m] = time.perf_counter() - t0
      fns[m], inputs[m] = fn, xs
    times = {m: [] for m in fns}
    for _ in range(args.repeats):
      for m, fn in fns.items():
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
          jax.block_until_ready(fn(*inputs[m]))
        times[m].append(time.perf_counter() - t0)
    for m in fns:
      rows.append(dict(method=m, n=n, w=w, batch=args.batch, heads=args.heads,
                       kv_heads=args.kv_heads if m in M.SOFTMAX else args.heads, dim=args.dim,
                       dtype=args.dtype, ms=1e3 * float(np.median(times[m])),
                       first_call_s=round(compile_s[m], 2)))
  by = {(r["method"], r["n"]): r for r in rows}
  for r in rows:
    base = by.get((M.BASE[r["method"]], r["n"]))
    r["ratio_to_lasp"] = None if base is None else r["ms"] / base["ms"]

  print(f"fwd+bwd time, {jax.default_backend()} x {w} devices "
        f"(B={args.batch}, H={args.heads}, D={args.dim}, {args.dtype}, median of {args.repeats})")
  print(f"{'method':<16}{'N':>8}{'ms':>11}{'ratio':>8}   (ratio: to lasp2 for linear, "
        f"to lasp2h for softmax)")
  for r in rows:
    ratio = "" if r["ratio_to_lasp"] is None else f"{r['ratio_to_lasp']:.2f}"
    print(f"{r['method']:<16}{r['n']:>8}{r['ms']:>11.1f}{ratio:>8}")
  M.write_json(args.out, dict(backend=jax.default_backend(), jax=jax.__version__,
                              devices=[str(d) for d in jax.devices()[:w]], args=vars(args),
                              rows=rows))
  png = args.plot or os.path.splitext(args.out)[0] + ".png"
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for m in args.methods:
    pts = sorted((r["n"], r["ms"]) for r in rows if r["method"] == m)
    if pts:
      ax.plot(*zip(*pts), marker="o", ls="-" if m in M.LINEAR else "--", label=m)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("N (tokens)")
  ax.set_ylabel("fwd+bwd ms (median)")
  ax.set_title(f"{jax.default_backend()} x {w}: B={args.batch} H={args.heads} D={args.dim} "
               f"{args.dtype}", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)
  print(f"wrote {args.out} and {png}")
  return rows


if __name__ == "__main__":
  main()
