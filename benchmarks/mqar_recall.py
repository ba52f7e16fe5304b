"""The hybrid's point, measured: pure linear attention vs the 1/4 hybrid (and Mixture-of-Memories)
on the same MQAR budget.

  python benchmarks/mqar_recall.py [--config configs/tiny.yaml] [--runs L mom LLLN]
      [--pairs N] [--steps S] [--out FILE] [override ...]

Trains the default run (``configs/tiny.yaml``: 8 simulated CPU devices, zigzag, short conv) once
per ``--runs`` entry (default ``L``, every layer linear, and ``LLLN``, the 1/4 hybrid), with the
same seed, data, steps and optimiser. An entry is a layer pattern, or ``mom``: every layer a
Mixture-of-Memories linear layer (``MOM``: 4 memories, top 2, the shared memory, load-balancing
loss 0.01; ``models/mom.py``). Every run starts in a fresh temporary run directory, so it is
reproducible (same seed, same curve). Prints the eval MQAR accuracy of every run at every eval
step, then its wall time, parameters, decode state (the cache after ``data.seq_len`` tokens, one
sequence) and training FLOPs per token, and writes ``--out`` (JSON) and the curves next to it
(PNG). ``--pairs`` sets ``data.mqar.num_kv_pairs`` (and a vocabulary that holds them),
``--steps`` the budget; extra arguments are config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# The ``mom`` run: Mixture-of-Memories linear layers (every layer, as the pure linear run).
MOM = ["model.layer_pattern=L", "model.linear.memories=4", "model.linear.memory_top_k=2",
       "model.linear.shared_memory=true", "model.linear.router_aux_coef=0.01"]
LABELS = {"L": "pure linear (LLLL)", "LLLN": "1/4 hybrid (LLLN)",
          "mom": "MoM (LLLL, 4 memories, top 2, + shared)"}


def run_overrides(name: str) -> list[str]:
  """The config overrides of one ``--runs`` entry: ``mom``, or a layer pattern."""
  return list(MOM) if name == "mom" else [f"model.layer_pattern={name}"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=None, help="a YAML config (default: configs/tiny.yaml)")
  ap.add_argument("--runs", "--patterns", nargs="+", default=["L", "LLLN"],
                  help="layer patterns, or mom (Mixture-of-Memories); --patterns: the old name")
  ap.add_argument("--pairs", type=int, default=None,
                  help="data.mqar.num_kv_pairs (and data.mqar.vocab_size 4 * pairs)")
  ap.add_argument("--steps", type=int, default=None, help="the training budget (config: 700)")
  ap.add_argument("--out", default="benchmarks/results/mqar_recall.json")
  args, overrides = ap.parse_known_args(argv)
  overrides = list(overrides)
  if args.pairs is not None:
    overrides += [f"data.mqar.num_kv_pairs={args.pairs}", f"data.mqar.vocab_size={4 * args.pairs}"]
  if args.steps is not None:
    overrides += [f"steps={args.steps}"]

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from lasp_jax.train import load_config, run  # pylint: disable=import-outside-toplevel

  results = {}
  for name in args.runs:
    with tempfile.TemporaryDirectory() as run_dir:
      cfg = load_config(args.config, overrides + run_overrides(name) + [
          f"run_dir={run_dir}", "checkpoint.every=0", "log.progress=false"])
      t0 = time.perf_counter()
      summary = run(cfg)
      wall = time.perf_counter() - t0
    evals = [{"step": e["step"], "accuracy": e["accuracy"], "loss": e["loss"]}
             for e in summary["evals"]]
    results[name] = {"evals": evals, "wall_s": wall, "final_accuracy": evals[-1]["accuracy"],
                     **model_costs(summary["model"], cfg.data.seq_len)}

  chance = 1.0 / cfg.data.mqar.num_kv_pairs
  steps = sorted({e["step"] for r in results.values() for e in r["evals"]})
  print(f"eval MQAR accuracy ({cfg.data.mqar.num_kv_pairs} pairs, length {cfg.data.seq_len}, "
        f"chance {chance:.3f}, {cfg.steps} steps), same budget for every run")
  print("step          " + "  ".join(f"{p:>9}" for p in results))
  for s in steps:
    row = [next((e["accuracy"] for e in r["evals"] if e["step"] == s), float("nan"))
           for r in results.values()]
    print(f"{s:>4}          " + "  ".join(f"{a:9.3f}" for a in row))
  for key, fmt in (("wall_s", "{:8.0f}s"), ("params", "{:9,d}"), ("state_kib", "{:6.1f}KiB"),
                   ("mflops_per_token", "{:9.2f}")):
    print(f"{key:<14}" + "  ".join(fmt.format(r[key]) for r in results.values()))

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  meta = {"config": args.config or "configs/tiny.yaml", "overrides": overrides,
          "runs": {n: run_overrides(n) for n in results},
          "steps": cfg.steps, "num_kv_pairs": cfg.data.mqar.num_kv_pairs,
          "seq_len": cfg.data.seq_len, "chance": chance, "patterns": results}
  with open(args.out, "w") as f:
    json.dump(meta, f, indent=1)
  png = os.path.splitext(args.out)[0] + ".png"
  _plot(results, chance, png, f"MQAR, {cfg.data.mqar.num_kv_pairs} pairs, "
        f"length {cfg.data.seq_len}, {cfg.steps} steps")
  print(f"wrote {args.out} and {png}")


def model_costs(model_dict, seq_len: int) -> dict:
  """A run's parameters, decode state (``Cache.nbytes`` after a ``seq_len`` prompt, one
  sequence: the linear layers' states and conv tails, the softmax layers' K/V of ``seq_len``
  tokens) and training FLOPs per token (``flops_per_token``, MoM in its masked form)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lasp_jax import models  # pylint: disable=import-outside-toplevel
  cfg = models.ModelConfig.from_dict(model_dict)
  model = nnx.eval_shape(lambda: models.LinearLlama(cfg, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda m, t: models.prefill(m, t, max_len=seq_len)[1], model,
                         jax.ShapeDtypeStruct((1, seq_len), jnp.int32))
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  return {"params": models.count_params(cfg), "state_kib": nbytes / 1024,
          "mflops_per_token": models.flops_per_token(cfg, seq_len) / 1e6}


def _plot(results, chance, path, title):
  plot_curves(results, chance, path, title, "eval MQAR accuracy", LABELS)


def plot_curves(results, chance, path, title, ylabel, labels=None):
  """Eval accuracy against step, one line per run of ``results`` ({name: {"evals": [...]}}), and
  chance; shared with ``state_tracking.py``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, r in results.items():
    ax.plot([e["step"] for e in r["evals"]], [e["accuracy"] for e in r["evals"]], "o-", ms=3,
            label=(labels or {}).get(name, name))
  ax.axhline(chance, color="gray", ls="--", lw=0.8, label="chance")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
