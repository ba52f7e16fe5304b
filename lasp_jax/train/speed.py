"""``python train.py speed``: tokens/s of a config with the sequence over all devices vs one device.

Both runs happen in one process, on the same model and data, one after the other; step 1
(compilation) and the first few steps are left out of the median.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import jax
import numpy as np

from lasp_jax.train.config import TrainConfig
from lasp_jax.train.loop import run
from lasp_jax.train.mesh import setup_devices


DEFAULT_STEPS = 30


def compare(cfg: TrainConfig, steps: int = DEFAULT_STEPS, warmup: int = 5) -> dict:
  """Median tokens/s and step time of ``cfg`` over ``sp`` = every device vs on one device, each
  over ``steps`` steps of which the first ``min(warmup, steps - 1)`` (compilation) are left out."""
  if steps < 2:
    raise ValueError(f"speed: steps={steps} must be >= 2 (step 1 compiles and is left out)")
  warmup = min(warmup, steps - 1)
  setup_devices(cfg.mesh)
  n = jax.device_count()
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, mesh in ((f"sp={n}", dataclasses.replace(cfg.mesh, data=1, fsdp=1, sp=n)),
                       ("1 device", dataclasses.replace(cfg.mesh, data=1, fsdp=1, sp=1,
                                                        num_devices=1))):
      c = dataclasses.replace(
          cfg, mesh=mesh, steps=steps, run_dir=os.path.join(tmp, name.replace(" ", "_")),
          checkpoint=dataclasses.replace(cfg.checkpoint, every=0, resume=False, overwrite=False,
                                         step=None, dir=None),
          log=dataclasses.replace(cfg.log, eval_every=0, progress=False, tensorboard=False))
      with warnings.catch_warnings():
        # A speed run is shorter than a training warmup on purpose; its schedule does not matter.
        warnings.filterwarnings("ignore", message=r"optim\.warmup_steps=")
        run(c)
      from lasp_jax.train.metrics import read_jsonl  # pylint: disable=import-outside-toplevel
      recs = [r for r in read_jsonl(os.path.join(c.run_dir, "metrics.jsonl"))
              if r["kind"] == "train"][warmup:]
      results[name] = {"tok_s": float(np.median([r["tok_s"] for r in recs])),
                       "step_time": float(np.median([r["step_time"] for r in recs])),
                       "final_loss": recs[-1]["loss"]}
  return results


def report(cfg: TrainConfig, results: dict) -> str:
  lines = [f"{cfg.name}: {cfg.data.batch_size} x {cfg.data.seq_len} tokens per step, "
           f"{jax.devices()[0].device_kind} devices",
           f"{'mesh':>10} {'tokens/s':>10} {'step (ms)':>10} {'loss':>8}"]
  for name, r in results.items():
    lines.append(f"{name:>10} {r['tok_s']:>10.0f} {1e3 * r['step_time']:>10.1f} "
                 f"{r['final_loss']:>8.4f}")
  return "\n".join(lines)
