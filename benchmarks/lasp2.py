"""LASP-2 on W simulated devices vs one-device linear attention: time and collective bytes.

  python benchmarks/lasp2.py [--devices 8] [--n 16384 65536] [--out benchmarks/results/lasp2.json]

Forward+backward of ``lasp2_attention`` over a W-device sequence axis and of ``linear_attention`` on
one device, same (B, N, H, D), timed side by side (interleaved repeats, median), plus the collective
count and bytes of the LASP-2 program read from its compiled HLO. On one CPU the W simulated devices
share the same cores, so the time ratio measures the overhead of the split, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--decay", choices=["none", "head", "token", "channel"], default="token")
  ap.add_argument("--chunk", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default="benchmarks/results/lasp2.json")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import lasp_jax
  from lasp_jax import comm

  w = args.devices
  mesh = jax.make_mesh((w,), ("sp",), devices=jax.devices()[:w])
  rows = []
  for n in args.n:
    b, h, d = args.batch, args.heads, args.dim
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.float32) for kk in ks[:3])
    g = {"none": None, "head": -jnp.linspace(0.01, 0.2, h),
         "token": jax.nn.log_sigmoid(3 + jax.random.normal(ks[3], (b, n, h))),
         "channel": jax.nn.log_sigmoid(3 + jax.random.normal(ks[3], (b, n, h, d)))}[args.decay]

    def make(op):
      def loss(q, k, v, g):
        return jnp.sum(op(q, k, v, g).astype(jnp.float32) ** 2)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    sp = make(lambda *a: lasp_jax.lasp2_attention(*a, mesh=mesh, chunk_size=args.chunk))
    one = make(lambda *a: lasp_jax.linear_attention(*a, chunk_size=args.chunk))
    xs = NamedSharding(mesh, P(None, "sp", None, None))
    gs = None if g is None or g.ndim == 1 else NamedSharding(mesh, P(None, "sp", *[None] * (g.ndim - 2)))
    with jax.set_mesh(mesh):
      sp_args = [jax.device_put(x, xs) for x in (q, k, v)] + [
          g if gs is None else jax.device_put(g, gs)]
      abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if x is not None
                  else None for x in sp_args]
      stats = comm.summarize(comm.collective_stats(sp, *abstract, mesh=mesh))

    def timed(fn, fn_args, in_mesh):
      t0 = time.perf_counter()
      if in_mesh:
        with jax.set_mesh(mesh):
          jax.block_until_ready(fn(*fn_args))
      else:
        jax.block_until_ready(fn(*fn_args))
      return time.perf_counter() - t0

    one_args = [jax.device_put(x, jax.devices()[0]) if x is not None else None
                for x in (q, k, v, g)]
    timed(sp, sp_args, True), timed(one, one_args, False)  # compile
    t_sp, t_one = [], []
    for _ in range(args.repeats):  # interleaved: both see the same machine load
      t_sp.append(timed(sp, sp_args, True))
      t_one.append(timed(one, one_args, False))
    row = dict(n=n, b=b, h=h, d=d, w=w, decay=args.decay, chunk=args.chunk,
               lasp2_ms=1e3 * float(np.median(t_sp)), one_device_ms=1e3 * float(np.median(t_one)),
               collectives=stats, state_floats_formula=w * b * h * d * d)
    row["ratio_lasp2_over_one"] = row["lasp2_ms"] / row["one_device_ms"]
    rows.append(row)

  print(f"{'N':>8} {'W':>3} {'lasp2 ms':>10} {'1-dev ms':>10} {'ratio':>6}  collectives (fwd+bwd)")
  for r in rows:
    coll = ", ".join(f"{k}: {v['count']}x {v['bytes']} B" for k, v in r["collectives"].items())
    print(f"{r['n']:>8} {r['w']:>3} {r['lasp2_ms']:>10.1f} {r['one_device_ms']:>10.1f} "
          f"{r['ratio_lasp2_over_one']:>6.2f}  {coll}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(backend=jax.default_backend(), rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
