"""Forward+backward time of each linear-attention variant and of the 1/4 hybrid, relative to basic.

  python benchmarks/models.py [--devices 8] [--n 2048] [--out benchmarks/results/models.json]

The tiny test model (d_model 32, 4 heads of 8, SwiGLU 64, vocab 256) with ``--layers`` layers,
sequence split over a ``--devices``-device ``sp`` axis (LASP-2 in linear layers, LASP-2H in the
softmax ones), ``--layout`` order. Every model is compiled first, then all are timed side by side:
``--repeats`` rounds, each round runs every model once (interleaved, so they share the machine's
load), median per model. On simulated CPU devices the numbers compare the variants' work and
overheads on this machine, not accelerator speed.
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
  ap.add_argument("--n", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", default="benchmarks/results/models.json")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import lasp_jax
  from lasp_jax import models

  w = args.devices
  mesh = jax.make_mesh((w,), ("sp",), devices=jax.devices()[:w])
  base = models.get_config("tiny", num_layers=args.layers, chunk_size=args.chunk,
                           layout=args.layout, num_kv_heads=2)
  cases = [(v, base.replace(linear_variant=v)) for v in models.LINEAR_VARIANTS]
  cases.append(("hybrid_LLLN_basic", base.replace(layer_pattern="LLLN")))

  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.n + 1), 0, base.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if args.layout == "zigzag":
    inputs, targets = lasp_jax.zigzag(inputs, w), lasp_jax.zigzag(targets, w)

  runs = {}
  with jax.set_mesh(mesh):
    inputs = jax.device_put(inputs, jax.sharding.PartitionSpec(None, "sp"))
    targets = jax.device_put(targets, jax.sharding.PartitionSpec(None, "sp"))
    for name, cfg in cases:
      graphdef, state = nnx.split(models.create_model(cfg))

      def loss(state, graphdef=graphdef):
        logits = nnx.merge(graphdef, state)(inputs)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

      fn = jax.jit(jax.value_and_grad(loss))
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state))
      runs[name] = dict(fn=fn, state=state, compile_s=time.perf_counter() - t0, times=[],
                        params=models.count_params(cfg),
                        gflops_per_step=models.flops_per_token(cfg, args.n) * args.batch
                        * args.n / 1e9)
    for _ in range(args.repeats):
      for r in runs.values():
        t0 = time.perf_counter()
        jax.block_until_ready(r["fn"](r["state"]))
        r["times"].append(time.perf_counter() - t0)

  ref = float(np.median(runs["basic"]["times"]))
  rows = []
  for name, r in runs.items():
    med = float(np.median(r["times"]))
    rows.append(dict(model=name, fwd_bwd_ms=1e3 * med, relative_to_basic=med / ref,
                     compile_s=r["compile_s"], params=r["params"],
                     model_gflops_per_step=r["gflops_per_step"],
                     times_ms=[1e3 * t for t in r["times"]]))
  print(f"tiny model, {args.layers} layers, B={args.batch}, N={args.n}, chunk {args.chunk}, "
        f"{w} devices on 'sp', {args.layout}, median of {args.repeats} interleaved rounds")
  print(f"{'model':<20} {'fwd+bwd ms':>11} {'x basic':>8} {'compile s':>10} {'params':>8}")
  for r in rows:
    print(f"{r['model']:<20} {r['fwd_bwd_ms']:>11.1f} {r['relative_to_basic']:>8.2f} "
          f"{r['compile_s']:>10.1f} {r['params']:>8}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(backend=jax.default_backend(), devices=w, layout=args.layout, n=args.n,
                   batch=args.batch, layers=args.layers, chunk=args.chunk,
                   config=base.to_dict(), rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
