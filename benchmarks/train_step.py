"""Time of one full training step of a config's model on one device, per kernel backend.

  PYTHONPATH=. python benchmarks/train_step.py --config configs/gated_deltanet_1b_hybrid.yaml \\
      --layers 4 --seq 8192 --batch 1 --backends auto,xla --out /tmp/train.json
  PYTHONPATH=. python benchmarks/train_step.py --small          # CPU dry run: a toy model, seconds

The step is train.py's (``lasp_jax.train.loop.make_train_step`` with one micro-batch): forward,
cross-entropy over the float32 logits, backward, the config's optax optimiser, one ``jax.jit`` with
the parameters and optimiser state donated, the model's own compute dtype (bf16 for the 1B
presets). The model is the config's preset and model overrides, cut to ``--layers`` layers, with
``ModelConfig.runtime.kernel_backend`` set to each of ``--backends``; tokens and targets are random ids
(no data loader), one sequence of ``--seq`` tokens per row, ``--batch`` rows, no mesh (so the
one-device ops, not LASP-2). The YAML's ``grad_accum`` is not used: one micro-batch per step.

Per (config, backend): compile seconds (lower + compile), the median step time over ``--steps``
steps after ``--warmup``, tokens/s and MFU = ``models.flops_per_token`` x tokens/s / peak
(``--peak-tflops``, default 790: an H200's measured bf16 matmul peak, the yardstick of
benchmarks/kernels.py; train.py's metrics use the 989 TFLOP/s data-sheet figure). The JSON is
rewritten after every run, with a placeholder row while one runs, so a run killed by a timeout
still says which one it was.

Imports neither grain nor tensorboardX (a bare accelerator image has neither).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository first: benchmarks/ has a kernels.py that would shadow the kernels package.
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from lasp_jax import models  # noqa: E402


def _train_modules():
  """``lasp_jax.train.config`` and ``.optim`` (the package loads its loop, and with it grain and
  TensorBoard logging, only on first use of ``run``)."""
  from lasp_jax.train import config, optim  # pylint: disable=import-outside-toplevel
  return config, optim


DEFAULT_CONFIGS = ["configs/gated_deltanet_1b_hybrid.yaml"]
# --small: the config's variant, pattern, conv and layout at toy widths (every code path, seconds).
SMALL_MODEL = {"vocab_size": 512, "d_model": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
               "ffn_dim": 128, "chunk_size": 16, "gate_rank": 4, "feature_dim": 4}


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", nargs="+", default=None,
                 help=f"config YAML(s) (default {DEFAULT_CONFIGS[0]})")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
  p.add_argument("--batch", type=int, default=1, help="sequences per step")
  p.add_argument("--backends", default="auto,xla",
                 help=f"comma-separated ModelConfig.kernel_backend values, of "
                      f"{','.join(models.KERNEL_BACKENDS)}")
  p.add_argument("--backend", default=None, help="one backend (instead of --backends)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
  p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak per device, for MFU")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--deadline", type=float, default=None,
                 help="seconds after which no new run starts (those left are listed as skipped)")
  p.add_argument("--out", default="benchmarks/results/train_step.json")
  p.add_argument("--append", action="store_true",
                 help="keep the rows already in --out (another config's run) and add to them")
  p.add_argument("--small", action="store_true", help="toy model and sequence (CPU dry run)")
  args = p.parse_args(argv)
  args.config = args.config or DEFAULT_CONFIGS
  args.backends = [b.strip() for b in (args.backend or args.backends).split(",") if b.strip()]
  for b in args.backends:
    if b not in models.KERNEL_BACKENDS:
      raise ValueError(f"--backends: unknown backend {b!r}; choose from {models.KERNEL_BACKENDS}")
  for name in ("layers", "seq", "batch", "steps"):
    if getattr(args, name) <= 0:
      raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
  if args.warmup < 0:
    raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
  if args.small:
    args.seq, args.batch, args.steps, args.warmup = min(args.seq, 128), 1, 2, 1
  return args


def load(path, args, backend):
  """``(TrainConfig, ModelConfig)``: the YAML with this benchmark's overrides, validated by the
  library's own config code; the model as train.py resolves it, without mesh axes."""
  config, _ = _train_modules()
  over = {"model.num_layers": args.layers, "model.runtime.kernel_backend": backend,
          "data.seq_len": args.seq, "data.batch_size": args.batch}
  if args.small:
    over.update({f"model.{k}": v for k, v in SMALL_MODEL.items()})
  cfg = config.load_config(path, over)
  base = models.get_config(cfg.model.preset)
  return cfg, models.ModelConfig.from_dict({**base.to_dict(), **cfg.model.overrides})


def make_step(graphdef, tx):
  """train.py's step on one micro-batch: ``(params, opt_state, rest, inputs, targets) ->
  (params, opt_state, metrics)``, parameters and optimiser state donated."""
  def loss_fn(params, rest, inputs, targets):
    logits = nnx.merge(graphdef, params, rest)(inputs).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return jnp.mean(nll), correct

  def step(params, opt_state, rest, inputs, targets):
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, inputs, targets)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": acc,
                                                             "grad_norm": grad_norm}

  return jax.jit(step, donate_argnums=(0, 1))


def bench(path, backend, args):
  cfg, mcfg = load(path, args, backend)
  _, optim = _train_modules()
  b, n = args.batch, args.seq
  row = {"config": cfg.name, "config_path": path, "preset": cfg.model.preset, "backend": backend,
         "layers": mcfg.num_layers, "layer_pattern": mcfg.layer_pattern,
         "linear_variant": mcfg.linear.variant, "compute_dtype": mcfg.runtime.compute_dtype,
         "seq": n, "batch": b, "params": models.count_params(mcfg),
         "flops_per_token": float(models.flops_per_token(mcfg, n))}
  model = models.create_model(mcfg, seed=args.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  del model
  tx, _ = optim.build(cfg.optim, args.warmup + args.steps)
  opt_state = jax.jit(tx.init)(params)
  keys = jax.random.split(jax.random.PRNGKey(args.seed + 1))
  inputs = jax.random.randint(keys[0], (b, n), 0, mcfg.vocab_size, jnp.int32)
  targets = jax.random.randint(keys[1], (b, n), 0, mcfg.vocab_size, jnp.int32)

  t0 = time.perf_counter()
  step = make_step(graphdef, tx).lower(params, opt_state, rest, inputs, targets).compile()
  row["compile_s"] = time.perf_counter() - t0
  times, losses = [], []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, rest, inputs, targets)
    jax.block_until_ready((params, opt_state, metrics))
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  step_s = float(np.median(times))
  tok_s = b * n / step_s
  row.update(step_s=step_s, step_s_all=times, tok_s=tok_s,
             tflops_s=row["flops_per_token"] * tok_s / 1e12,
             mfu=row["flops_per_token"] * tok_s / (args.peak_tflops * 1e12),
             loss_first=losses[0], loss_last=losses[-1],
             finite=bool(np.all(np.isfinite(losses))))
  return row


def _save(result, path):
  """Atomic: a timeout's kill between two writes leaves the previous complete file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def _fmt(r):
  head = f"{r['config']:28s} {r['backend']:5s}"
  if "error" in r:
    return f"{head} ERROR {r['error'][:150]}"
  return (f"{head} {r['compile_s']:9.1f} {1e3 * r['step_s']:10.1f} {r['tok_s']:10.0f} "
          f"{r['tflops_s']:8.1f} {100 * r['mfu']:6.2f}%  loss {r['loss_first']:.3f}->"
          f"{r['loss_last']:.3f}")


def main(argv=None):
  args = parse(argv)
  t_start = time.perf_counter()
  result = {"device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "jax_version": jax.__version__, "peak_tflops": args.peak_tflops,
            "layers": args.layers, "seq": args.seq, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "small": args.small,
            # compile_s of a rerun with a persistent cache is a cache load, not a compile
            "compile_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
            "rows": [], "skipped": []}
  if args.append and os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      old = json.load(f)
    result["rows"], result["skipped"] = old.get("rows", []), old.get("skipped", [])
  print(f"{result['device_kind']} ({result['platform']}), jax {jax.__version__}: "
        f"{args.batch} x {args.seq} tokens, {args.layers} layers, median of {args.steps} steps")
  for path in args.config:
    for backend in args.backends:
      if args.deadline is not None and time.perf_counter() - t_start > args.deadline:
        result["skipped"].append(f"{path} {backend}")
        print(f"deadline: skipping {path} {backend}", flush=True)
        continue
      # Replaced when the run ends; left as is if a timeout kills the process first.
      placeholder = {"config": os.path.splitext(os.path.basename(path))[0],
                     "config_path": path, "backend": backend,
                     "error": "did not finish: killed or timed out (compile or steps)"}
      result["rows"].append(placeholder)
      _save(result, args.out)
      try:
        row = bench(path, backend, args)
      except Exception as e:  # noqa: BLE001  (one failing backend must not lose the others)
        traceback.print_exc()
        row = dict(placeholder, error=f"{type(e).__name__}: {str(e)[:500]}")
      result["rows"][-1] = row
      _save(result, args.out)
      print(_fmt(row), flush=True)
  print(f"\n{'config':28s} {'kern':5s} {'compile s':>9s} {'step ms':>10s} {'tokens/s':>10s} "
        f"{'TFLOP/s':>8s} {'MFU':>7s}  (peak {args.peak_tflops:g} TFLOP/s)")
  for r in result["rows"]:
    print(_fmt(r))
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
