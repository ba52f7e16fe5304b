"""LASP-2 on W simulated devices vs one-device linear attention: time and collective bytes.

  python benchmarks/lasp2.py [--devices 8] [--n 16384 65536] [--doc-len 2048] [--no-delta]
                             [--out benchmarks/results/lasp2.json]

Forward+backward of ``lasp2_attention`` over a W-device sequence axis, of the same with packed
documents (``segment_ids``: documents of ``--doc-len`` tokens on average, random lengths, so their
starts fall anywhere, device edges included; 0 skips it) and of ``linear_attention`` on one device,
same (B, N, H, D), timed side by side (interleaved repeats, median), plus the collective count and
bytes of the LASP-2 programs read from their compiled HLO. The delta rule (design §11: the same decay,
``beta = sigmoid``, unit-norm keys) is timed in the same loop, under LASP-2 and on one device, so
its cost relative to the diagonal family is a ratio of one run. On one CPU the W simulated devices share
the same cores, so the time ratio measures the overhead of the split, not a speed-up.
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
  ap.add_argument("--doc-len", type=int, default=2048)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--no-delta", action="store_true", help="skip the delta-rule rows")
  ap.add_argument("--scan", action="store_true",
                  help="also time exchange='scan' (diagonal and delta) beside the all-gather")
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
      def loss(q, k, v, g, *ids):
        return jnp.sum(op(q, k, v, g, *ids).astype(jnp.float32) ** 2)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    sp = make(lambda *a: lasp_jax.lasp2_attention(*a, mesh=mesh, chunk_size=args.chunk))
    packed = make(lambda q, k, v, g, ids: lasp_jax.lasp2_attention(
        q, k, v, g, mesh=mesh, segment_ids=ids, chunk_size=args.chunk))
    one = make(lambda *a: lasp_jax.linear_attention(*a, chunk_size=args.chunk))
    # The delta rule at the same shape: unit-norm keys (as its models give it), beta in (0, 1).
    k_unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(5), (b, n, h)))
    delta_sp = make(lambda q, k, v, g, beta: lasp_jax.lasp2_attention(
        q, k, v, g, beta=beta, mesh=mesh, chunk_size=args.chunk))
    delta_one = make(lambda q, k, v, g, beta: lasp_jax.linear_attention(
        q, k, v, g, beta=beta, chunk_size=args.chunk))
    xs = NamedSharding(mesh, P(None, "sp", None, None))
    gs = None if g is None or g.ndim == 1 else NamedSharding(mesh, P(None, "sp", *[None] * (g.ndim - 2)))
    # Documents of random lengths (mean --doc-len): a start wherever a uniform draw says so.
    starts = np.random.default_rng(0).random((b, n)) < 1.0 / max(args.doc_len, 1)
    ids = jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)
    with jax.set_mesh(mesh):
      sp_args = [jax.device_put(x, xs) for x in (q, k, v)] + [
          g if gs is None else jax.device_put(g, gs)]
      packed_args = sp_args + [jax.device_put(ids, NamedSharding(mesh, P(None, "sp")))]
      abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if x is not None
                  else None for x in packed_args]
      stats = comm.summarize(comm.collective_stats(sp, *abstract[:4], mesh=mesh))
      packed_stats = comm.summarize(comm.collective_stats(packed, *abstract, mesh=mesh))
      delta_args = sp_args[:1] + [jax.device_put(k_unit, xs)] + sp_args[2:] + [
          jax.device_put(beta, NamedSharding(mesh, P(None, "sp", None)))]
      delta_stats = comm.summarize(comm.collective_stats(
          delta_sp, *[jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if x is not None else None for x in delta_args], mesh=mesh))

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
    delta_one_args = [jax.device_put(x, jax.devices()[0]) if x is not None else None
                      for x in (q, k_unit, v, g, beta)]
    programs = {"lasp2": (sp, sp_args, True), "packed": (packed, packed_args, True),
                "one": (one, one_args, False)}
    if not args.no_delta:
      programs.update(delta_lasp2=(delta_sp, delta_args, True),
                      delta_one=(delta_one, delta_one_args, False))
    if args.scan:
      programs["scan"] = (make(lambda *a: lasp_jax.lasp2_attention(
          *a, mesh=mesh, chunk_size=args.chunk, exchange="scan")), sp_args, True)
      if not args.no_delta:
        programs["delta_scan"] = (make(lambda q, k, v, g, beta: lasp_jax.lasp2_attention(
            q, k, v, g, beta=beta, mesh=mesh, chunk_size=args.chunk, exchange="scan")),
            delta_args, True)
    times = {name: [] for name in programs}
    for fn, fn_args, in_mesh in programs.values():
      timed(fn, fn_args, in_mesh)
    for _ in range(args.repeats):  # interleaved: all see the same machine load
      for name, (fn, fn_args, in_mesh) in programs.items():
        times[name].append(timed(fn, fn_args, in_mesh))
    t_sp, t_packed, t_one = times["lasp2"], times["packed"], times["one"]
    med = lambda t: 1e3 * float(np.median(t))  # noqa: E731
    row = dict(n=n, b=b, h=h, d=d, w=w, decay=args.decay, chunk=args.chunk,
               documents=int(np.sum(starts)) + b, lasp2_ms=med(t_sp), packed_ms=med(t_packed),
               one_device_ms=med(t_one), collectives=stats, packed_collectives=packed_stats,
               state_floats_formula=w * b * h * d * d)
    row["ratio_lasp2_over_one"] = row["lasp2_ms"] / row["one_device_ms"]
    row["ratio_packed_over_lasp2"] = row["packed_ms"] / row["lasp2_ms"]
    if not args.no_delta:
      row.update(delta_lasp2_ms=med(times["delta_lasp2"]), delta_one_device_ms=med(times["delta_one"]),
                 delta_collectives=delta_stats, delta_summary_floats_formula=w * b * h * d * 2 * d)
      row["ratio_delta_over_diagonal_lasp2"] = row["delta_lasp2_ms"] / row["lasp2_ms"]
      row["ratio_delta_over_diagonal_one"] = row["delta_one_device_ms"] / row["one_device_ms"]
      row["ratio_delta_lasp2_over_one"] = row["delta_lasp2_ms"] / row["delta_one_device_ms"]
    if args.scan:
      row["scan_ms"] = med(times["scan"])
      row["ratio_scan_over_allgather"] = row["scan_ms"] / row["lasp2_ms"]
      if not args.no_delta:
        row["delta_scan_ms"] = med(times["delta_scan"])
        row["ratio_delta_scan_over_allgather"] = row["delta_scan_ms"] / row["delta_lasp2_ms"]
    rows.append(row)

  print(f"{'N':>8} {'W':>3} {'lasp2 ms':>10} {'packed ms':>10} {'1-dev ms':>10} {'sp/1':>5} "
        f"{'pk/sp':>5}  collectives fwd+bwd (lasp2 | packed)")
  for r in rows:
    coll = lambda c: ", ".join(f"{k}: {v['count']}x {v['bytes']} B" for k, v in c.items())  # noqa
    print(f"{r['n']:>8} {r['w']:>3} {r['lasp2_ms']:>10.1f} {r['packed_ms']:>10.1f} "
          f"{r['one_device_ms']:>10.1f} {r['ratio_lasp2_over_one']:>5.2f} "
          f"{r['ratio_packed_over_lasp2']:>5.2f}  {coll(r['collectives'])} | "
          f"{coll(r['packed_collectives'])}")
  if not args.no_delta:
    print(f"\n{'N':>8} {'W':>3} {'delta sp ms':>12} {'delta 1-dev':>12} {'sp/1':>5} "
          f"{'delta/diag sp':>13} {'delta/diag 1':>12}  delta collectives fwd+bwd")
    for r in rows:
      print(f"{r['n']:>8} {r['w']:>3} {r['delta_lasp2_ms']:>12.1f} {r['delta_one_device_ms']:>12.1f} "
            f"{r['ratio_delta_lasp2_over_one']:>5.2f} {r['ratio_delta_over_diagonal_lasp2']:>13.2f} "
            f"{r['ratio_delta_over_diagonal_one']:>12.2f}  {coll(r['delta_collectives'])}")
  if args.scan:
    print(f"\n{'N':>8} {'W':>3} {'allgather ms':>12} {'scan ms':>9} {'scan/ag':>7}"
          + ("" if args.no_delta else f" {'delta ag ms':>11} {'delta scan':>10} {'scan/ag':>7}"))
    for r in rows:
      line = (f"{r['n']:>8} {r['w']:>3} {r['lasp2_ms']:>12.1f} {r['scan_ms']:>9.1f} "
              f"{r['ratio_scan_over_allgather']:>7.2f}")
      if not args.no_delta:
        line += (f" {r['delta_lasp2_ms']:>11.1f} {r['delta_scan_ms']:>10.1f} "
                 f"{r['ratio_delta_scan_over_allgather']:>7.2f}")
      print(line)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(backend=jax.default_backend(), rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
