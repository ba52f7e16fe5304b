"""Per-device peak memory of each sequence-parallel method vs N, from the compiled program.

  python benchmarks/memory.py [--budget-gib 8] [--out benchmarks/results/memory.json] [--small]

For each method (``benchmarks/_methods.py``), forward+backward of one attention layer is compiled
on W simulated CPU devices with abstract sharded inputs (nothing runs) and XLA's buffer assignment
read with ``compiled.memory_analysis()`` (per device): peak = arguments + outputs + temporaries -
aliased. Then the longest N (doubling) whose peak fits ``--budget-gib`` per device.
The CPU compiler's buffer assignment stands in for a GPU/TPU one: same program, different fusion
and scheduling, so read these as relative, not as exact device numbers. float32 by default
(XLA:CPU upcasts bf16 in places).

Second table, the state exchange alone (design §10; ``benchmarks/_exchange.py``): per-device
temporaries and peak of fwd+bwd for the all-gather and the scan, diagonal and delta summaries,
both layouts, W = ``--exchange-ws`` (one subprocess per W; ``--exchange-ws`` with no values skips
it). The all-gather's grow with W (it holds all W S summaries and its fold's levels); the scan's
do not.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# The repository before benchmarks/ (which has a kernels.py of its own), then benchmarks/.
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
  ap.add_argument("--n", type=int, nargs="+", default=[16384, 131072, 1048576])
  ap.add_argument("--w", type=int, default=8)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv-heads", type=int, default=16)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--chunk", type=int, default=64)
  ap.add_argument("--budget-gib", type=float, default=4.0)
  ap.add_argument("--max-n", type=int, default=1 << 23, help="stop the doubling here")
  ap.add_argument("--exchange-ws", type=int, nargs="*", default=[2, 4, 8, 16, 32, 64, 128, 256],
                  help="W of the exchange table (none: skip it)")
  ap.add_argument("--exchange-kinds", nargs="+", default=["diagonal", "delta"],
                  choices=["diagonal", "delta"])
  ap.add_argument("--exchange-layouts", nargs="+", default=["contiguous", "zigzag"],
                  choices=["contiguous", "zigzag"])
  ap.add_argument("--small", action="store_true", help="toy sizes (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/memory.json")
  ap.add_argument("--plot", default=None)
  args = ap.parse_args(argv)
  if args.small:
    args.n, args.w, args.heads, args.kv_heads, args.dim, args.chunk = [256], 2, 2, 2, 16, 16
    args.budget_gib, args.max_n = 4 / 1024, 1024
    args.exchange_ws = [w for w in args.exchange_ws if w <= 4][-1:] if args.exchange_ws else []
    args.exchange_layouts = ["zigzag"]   # the two-slot schedule; contiguous is a subset of it
  return args


def peak_bytes(args, method, n, cache={}):
  import jax.numpy as jnp
  key = (method, n, args.w, args.heads, args.kv_heads, args.dim, args.dtype, args.batch)
  if key not in cache:
    print(f"  compiling {method} N={n} W={args.w}", file=sys.stderr, flush=True)
    c = M.compile_program(M.mesh_of(args.w), method, "fwd+bwd", jnp.dtype(args.dtype),
                          chunk_size=args.chunk, batch=args.batch, n=n, heads=args.heads,
                          kv_heads=args.kv_heads, dim=args.dim)
    ma = c.memory_analysis()
    cache[key] = dict(argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes,
                      temp=ma.temp_size_in_bytes, alias=ma.alias_size_in_bytes,
                      peak=ma.argument_size_in_bytes + ma.output_size_in_bytes
                      + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
  return cache[key]


def main(argv=None):
  args = parse(argv)
  M.set_devices(args.w)
  import jax
  methods = [m for m in args.methods if not (m.startswith("ulysses") and args.heads % args.w)]
  rows = [dict(method=m, n=n, w=args.w, **peak_bytes(args, m, n)) for m in methods for n in args.n]
  budget = args.budget_gib * 2 ** 30
  longest = {}
  for m in methods:
    fitting = [n for n in args.n if peak_bytes(args, m, n)["peak"] <= budget]
    n = max(fitting) if fitting else None
    if n is None:
      n_try = min(args.n)
      while n_try >= args.w * args.chunk * 2 and peak_bytes(args, m, n_try)["peak"] > budget:
        n_try //= 2
      n = n_try if peak_bytes(args, m, n_try)["peak"] <= budget else None
    else:
      while n * 2 <= args.max_n and peak_bytes(args, m, n * 2)["peak"] <= budget:
        n *= 2
    longest[m] = dict(n=n, capped=n is not None and n * 2 > args.max_n,
                      peak=None if n is None else peak_bytes(args, m, n)["peak"])

  print(f"per-device peak memory, fwd+bwd of one layer, W={args.w} (B={args.batch}, "
        f"H={args.heads}, Hkv={args.kv_heads} softmax, D={args.dim}, {args.dtype})")
  print(f"{'method':<16}" + "".join(f"{'N=' + str(n):>13}" for n in args.n)
        + f"{'longest N <= ' + str(args.budget_gib) + ' GiB':>26}")
  for m in methods:
    cells = "".join(f"{M.fmt_bytes(peak_bytes(args, m, n)['peak']):>13}" for n in args.n)
    lg = longest[m]
    txt = "none" if lg["n"] is None else f"{lg['n']}{'+ (cap)' if lg['capped'] else ''}"
    print(f"{m:<16}{cells}{txt:>26}")
  rows_x = []
  if args.exchange_ws:
    rows_x = X.sweep(args.exchange_ws, kinds=args.exchange_kinds, layouts=args.exchange_layouts,
                     passes=["fwd+bwd"], batch=args.batch, heads=args.heads, dk=args.dim,
                     dv=args.dim)
    print()
    print(f"== Exchange alone (design §10), fwd+bwd, B={args.batch} H={args.heads} "
          f"Dk=Dv={args.dim}: per-device temporaries and peak (compiled, XLA:CPU) ==")
    print(X.table(rows_x, ("temp", "peak")))
  M.write_json(args.out, dict(backend=jax.default_backend(), jax=jax.__version__, args=vars(args),
                              rows=rows, longest_within_budget=longest, exchange=rows_x))
  png = args.plot or os.path.splitext(args.out)[0] + ".png"
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for m in methods:
    pts = sorted((r["n"], r["peak"] / 2 ** 20) for r in rows if r["method"] == m)
    ax.plot(*zip(*pts), marker="o", ls="-" if m in M.LINEAR else "--", label=m)
  ax.axhline(budget / 2 ** 20, color="k", lw=0.8, ls=":", label=f"budget {args.budget_gib} GiB")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel(f"N (tokens), W={args.w}")
  ax.set_ylabel("peak MiB per device (compiled, fwd+bwd)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)
  if rows_x:
    X.plot(rows_x, os.path.splitext(png)[0] + "_exchange.png", key="temp",
           ylabel="temporaries per device, fwd+bwd (bytes)")
  print(f"wrote {args.out} and {png}" + (" (+ _exchange.png)" if rows_x else ""))
  return rows, longest


if __name__ == "__main__":
  main()
