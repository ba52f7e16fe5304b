"""``python train.py plot <run_dir>``: the loss curve (and eval metrics) of a run, as a PNG."""

from __future__ import annotations

import os

from lasp_jax.train.metrics import read_jsonl


def plot_run(run_dir: str, out: str | None = None) -> str:
  """Draws train loss (and eval loss / MQAR accuracy when logged) to ``out``; returns its path."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"{run_dir!r} has no metrics.jsonl: is it a run directory?")
  records = read_jsonl(path)
  train = {r["step"]: r for r in records if r.get("kind") == "train"}
  evals = {r["step"]: r for r in records if r.get("kind") == "eval"}
  if not train:
    raise ValueError(f"{path!r} has no training records yet")
  has_acc = any(r.get("accuracy") is not None for r in evals.values())
  fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
  ax = axes[0, 0]
  steps = sorted(train)
  ax.plot(steps, [train[s]["loss"] for s in steps], lw=0.8, alpha=0.6, label="train loss")
  if evals:
    es = sorted(evals)
    ax.plot(es, [evals[s]["loss"] for s in es], "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats)")
  ax.set_title(os.path.basename(os.path.abspath(run_dir)))
  ax.grid(alpha=0.3)
  ax.legend()
  if has_acc:
    ax = axes[0, 1]
    es = sorted(s for s in evals if evals[s].get("accuracy") is not None)
    ax.plot(es, [evals[s]["accuracy"] for s in es], "o-", color="C2", label="eval accuracy")
    chance = evals[es[-1]].get("chance")
    if chance:
      ax.axhline(chance, color="gray", ls="--", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("MQAR accuracy (query positions)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  out = out or os.path.join(run_dir, "loss.png")
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
