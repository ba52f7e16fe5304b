"""The hybrid's point, measured: pure linear attention vs the 1/4 hybrid on the same MQAR budget.

  python benchmarks/mqar_recall.py [--config configs/tiny.yaml] [override ...]

Trains the default run (``configs/tiny.yaml``: 8 simulated CPU devices, zigzag, short conv) once
per ``--patterns`` entry (default ``L``, every layer linear, and ``LLLN``, the 1/4 hybrid), with the
same seed, data, steps and optimiser; only ``model.layer_pattern`` differs. Every run starts in a
fresh temporary run directory, so it is reproducible (same seed, same curve). Prints the eval MQAR
accuracy of both at every eval step and writes ``--out`` (JSON) and the curves next to it (PNG).
Extra arguments are config overrides applied to both runs (e.g. ``steps=300``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=None, help="a YAML config (default: configs/tiny.yaml)")
  ap.add_argument("--patterns", nargs="+", default=["L", "LLLN"])
  ap.add_argument("--out", default="benchmarks/results/mqar_recall.json")
  args, overrides = ap.parse_known_args(argv)

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from lasp_jax.train import load_config, run  # pylint: disable=import-outside-toplevel

  results = {}
  for pattern in args.patterns:
    with tempfile.TemporaryDirectory() as run_dir:
      cfg = load_config(args.config, list(overrides) + [
          f"model.layer_pattern={pattern}", f"run_dir={run_dir}", "checkpoint.every=0"])
      t0 = time.perf_counter()
      summary = run(cfg)
      wall = time.perf_counter() - t0
    evals = [{"step": e["step"], "accuracy": e["accuracy"], "loss": e["loss"]}
             for e in summary["evals"]]
    results[pattern] = {"evals": evals, "wall_s": wall, "final_accuracy": evals[-1]["accuracy"]}

  chance = 1.0 / cfg.data.mqar.num_kv_pairs
  steps = sorted({e["step"] for r in results.values() for e in r["evals"]})
  print(f"eval MQAR accuracy ({cfg.data.mqar.num_kv_pairs} pairs, length {cfg.data.seq_len}, "
        f"chance {chance:.3f}), same budget for every layer pattern")
  print("step  " + "  ".join(f"{p:>8}" for p in results))
  for s in steps:
    row = [next((e["accuracy"] for e in r["evals"] if e["step"] == s), float("nan"))
           for r in results.values()]
    print(f"{s:>4}  " + "  ".join(f"{a:8.3f}" for a in row))
  print("wall  " + "  ".join(f"{r['wall_s']:7.0f}s" for r in results.values()))

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  meta = {"config": args.config or "configs/tiny.yaml", "overrides": list(overrides),
          "steps": cfg.steps, "num_kv_pairs": cfg.data.mqar.num_kv_pairs,
          "seq_len": cfg.data.seq_len, "chance": chance, "patterns": results}
  with open(args.out, "w") as f:
    json.dump(meta, f, indent=1)
  png = os.path.splitext(args.out)[0] + ".png"
  _plot(results, chance, png, f"MQAR, {cfg.data.mqar.num_kv_pairs} pairs, "
        f"length {cfg.data.seq_len}, {cfg.steps} steps")
  print(f"wrote {args.out} and {png}")


def _plot(results, chance, path, title):
  plot_curves(results, chance, path, title, "eval MQAR accuracy",
              {"L": "pure linear (LLLL)", "LLLN": "1/4 hybrid (LLLN)"})


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
