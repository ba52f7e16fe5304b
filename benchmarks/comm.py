"""Communication per layer of each sequence-parallel method, read from compiled HLO.

  python benchmarks/comm.py [--out benchmarks/results/comm.json] [--small]

For every method (``benchmarks/_methods.py``: LASP-2, LASP-1, ring attention in its left-product
form and Ulysses for linear attention; LASP-2H, ring attention and Ulysses for softmax attention)
and for the forward pass and forward+backward, the program is compiled on simulated CPU devices
with abstract inputs (``jax.ShapeDtypeStruct`` sharded over the sequence as in training; nothing
runs) and its HLO read:
- collectives: how many run per call (one attention layer),
- received bytes per device: each collective's result size turned into what one device receives
  (``_methods.bytes_moved``),
- sequential steps: collectives on the longest dependency chain (rounds that cannot overlap),
beside design §9's forward formulas. Two sweeps: N grows at fixed W, and W grows at fixed N.
Simulated devices: up to 64 (``JAX_NUM_CPU_DEVICES`` is set before jax starts).

Third sweep, the state exchange alone (design §10; ``benchmarks/_exchange.py``): the all-gather
(LASP-2) against the log-depth scan, diagonal and delta summaries (``B, H, Dk = Dv = --dim``),
contiguous and zigzag, with packed-document ids, for ``--exchange-ws`` (2 .. 256: one subprocess
per W with that many simulated devices; compile only; ``--exchange-ws`` with no values skips it).
The whole LASP-2 op is not compiled at W = 256 (slow on CPU, and its local pass is the same for
both strategies).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
# The repository first (lasp_jax without an install), then benchmarks/ itself.
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:
  sys.path.append(_HERE)
import _exchange as X  # noqa: E402
import _methods as M  # noqa: E402


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--methods", nargs="*", default=list(M.METHODS), choices=M.METHODS,
                  help="none: only the exchange sweep")
  ap.add_argument("--n", type=int, nargs="+",
                  default=[2048, 16384, 131072, 1048576], help="N sweep")
  ap.add_argument("--w", type=int, default=8, help="W of the N sweep")
  ap.add_argument("--ws", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="W sweep")
  ap.add_argument("--n-for-ws", type=int, default=16384, help="N of the W sweep")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv-heads", type=int, default=16, help="softmax methods' K/V heads")
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--dtype", default="float32",
                  help="input dtype; XLA:CPU upcasts bf16 collectives to f32, so bf16 reads as f32 here")
  ap.add_argument("--chunk", type=int, default=64)
  ap.add_argument("--exchange-ws", type=int, nargs="*", default=[2, 4, 8, 16, 32, 64, 128, 256],
                  help="W of the exchange sweep (none: skip it)")
  ap.add_argument("--exchange-kinds", nargs="+", default=["diagonal", "delta"],
                  choices=["diagonal", "delta"])
  ap.add_argument("--exchange-layouts", nargs="+", default=["contiguous", "zigzag"],
                  choices=["contiguous", "zigzag"])
  ap.add_argument("--small", action="store_true", help="toy sizes (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/comm.json")
  ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
  args = ap.parse_args(argv)
  if args.small:
    args.n, args.w, args.ws, args.n_for_ws = [512], 4, [4], 512
    args.heads, args.kv_heads, args.dim, args.chunk = 4, 2, 16, 16
    args.exchange_ws = [w for w in args.exchange_ws if w <= 4][-1:] if args.exchange_ws else []
    args.exchange_layouts = ["zigzag"]   # the two-slot schedule; contiguous is a subset of it
  return args


def measure(args, method, n, w, passes, cache={}):
  import jax.numpy as jnp
  key = (method, n, w, passes, args.heads, args.kv_heads, args.dim, args.dtype, args.batch)
  if key in cache:
    return cache[key]
  dims = dict(batch=args.batch, n=n, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim)
  row = dict(method=method, n=n, w=w, passes=passes, **{k: v for k, v in dims.items() if k != "n"},
             dtype=args.dtype)
  dtype_bytes = jnp.dtype(args.dtype).itemsize
  f_bytes, f_steps = M.spec9_forward(method, w=w, dtype_bytes=dtype_bytes, **dims)
  row.update(spec9_fwd_bytes=int(f_bytes), spec9_fwd_steps=f_steps)
  hk = args.heads if method in M.LINEAR else args.kv_heads
  if method.startswith("ulysses") and (args.heads % w or n % w):
    row["skipped"] = f"H={args.heads} % W={w} != 0"
  elif n % (w * args.chunk):
    row["skipped"] = f"N={n} % (W * chunk) != 0"
  else:
    print(f"  compiling {method} N={n} W={w} {passes}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    compiled = M.compile_program(M.mesh_of(w), method, passes, jnp.dtype(args.dtype),
                                 chunk_size=args.chunk, **dims)
    row.update(M.comm_summary(compiled.as_text(), w))
    row["compile_s"] = round(time.perf_counter() - t0, 2)
  del hk
  cache[key] = row
  return row


def table(rows, title):
  lines = [title, f"{'method':<16}{'N':>9}{'W':>4}  {'pass':<8}{'colls':>6}{'steps':>6}"
           f"{'recv/dev':>12}{'design §9 fwd':>12}{'§9 steps':>12}"]
  for r in rows:
    if "skipped" in r:
      lines.append(f"{r['method']:<16}{r['n']:>9}{r['w']:>4}  {r['passes']:<8}  n/a: {r['skipped']}")
      continue
    lines.append(f"{r['method']:<16}{r['n']:>9}{r['w']:>4}  {r['passes']:<8}{r['collectives']:>6}"
                 f"{r['sequential_steps']:>6}{M.fmt_bytes(r['received_bytes']):>12}"
                 + (f"{M.fmt_bytes(r['spec9_fwd_bytes']):>12}{r['spec9_fwd_steps']:>12}"
                    if r["passes"] == "fwd" else ""))
  return "\n".join(lines)


def plot(rows_n, rows_w, args, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, rows, xkey, xlabel in ((axes[0], rows_n, "n", f"N (tokens), W={args.w}"),
                                 (axes[1], rows_w, "w", f"W (devices), N={args.n_for_ws}")):
    for m in args.methods:
      pts = [(r[xkey], r["received_bytes"]) for r in rows
             if r["method"] == m and r["passes"] == "fwd+bwd" and "skipped" not in r]
      if pts:
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, [max(y, 1) for y in ys], marker="o", ls="-" if m in M.LINEAR else "--",
                label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("bytes received per device, fwd+bwd, one layer")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Communication from compiled HLO (B={args.batch}, H={args.heads}, "
               f"Hkv={args.kv_heads} softmax, D={args.dim}, {args.dtype})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  args = parse(argv)
  M.set_devices(max([args.w] + args.ws))
  import jax
  avail = jax.device_count()
  ws = [w for w in args.ws if w <= avail]
  notes = [] if ws == args.ws else [f"W in {sorted(set(args.ws) - set(ws))} skipped: only "
                                    f"{avail} devices"]
  rows_n = [measure(args, m, n, args.w, p) for m in args.methods for n in args.n
            for p in ("fwd", "fwd+bwd")]
  rows_w = [measure(args, m, args.n_for_ws, w, p) for m in args.methods for w in ws
            for p in ("fwd", "fwd+bwd")]
  print(table(rows_n, f"== N sweep at W={args.w} (per layer, per device) =="))
  print()
  print(table(rows_w, f"== W sweep at N={args.n_for_ws} =="))
  for n in notes:
    print("note:", n)
  rows_x = exchange_sweep(args)
  M.write_json(args.out, dict(backend=jax.default_backend(), jax=jax.__version__,
                              args=vars(args), notes=notes, n_sweep=rows_n, w_sweep=rows_w,
                              exchange_sweep=rows_x))
  png = args.plot or os.path.splitext(args.out)[0] + ".png"
  plot(rows_n, rows_w, args, png)
  written = [args.out, png]
  if rows_x:
    written.append(os.path.splitext(png)[0] + "_exchange.png")
    X.plot(rows_x, written[-1])
  print("wrote " + ", ".join(written))
  return rows_n, rows_w


def exchange_sweep(args):
  """The exchange alone, allgather vs scan, per W (a subprocess each): counts, bytes, steps."""
  if not args.exchange_ws:
    return []
  rows = X.sweep(args.exchange_ws, kinds=args.exchange_kinds, layouts=args.exchange_layouts,
                 batch=args.batch, heads=args.heads, dk=args.dim, dv=args.dim)
  print()
  print(f"== Exchange alone (design §10), B={args.batch} H={args.heads} Dk=Dv={args.dim}, with "
        "document ids: collectives, steps in sequence, bytes received ==")
  print(X.table(rows, ("colls", "steps", "recv")))
  return rows


if __name__ == "__main__":
  main()
