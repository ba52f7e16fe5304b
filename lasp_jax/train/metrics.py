"""Run-directory logging: a JSONL record per step and eval, TensorBoard scalars, a progress bar.

Only process 0 writes; other processes keep the same interface and do nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

# Dense bf16 peak FLOP/s per device, by ``device_kind`` prefix (vendor data sheets).
PEAK_TFLOPS = {
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0,
    "TPU v4": 275.0, "NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA GH200": 989.0,
    "NVIDIA B200": 2250.0, "NVIDIA A100": 312.0,
}


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
  """Peak FLOP/s of one device: the override, else looked up from the device kind, else None."""
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for prefix, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return tflops * 1e12
  return None


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class RunLog:
  """JSONL (``metrics.jsonl``), TensorBoard (``tb/``) and a tqdm bar for one run directory."""

  def __init__(self, run_dir: str, *, total_steps: int, start_step: int, tensorboard: bool,
               progress: bool, every: int):
    self.enabled = jax.process_index() == 0
    self.every = every
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self.tb = self.bar = None
    if not self.enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    self._truncate_after(start_step)
    self.file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1)
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def _truncate_after(self, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they will be run again."""
    if not os.path.exists(self.path):
      return
    keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
    with open(self.path, "w", encoding="utf-8") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")

  def write(self, record: dict[str, Any], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"kind": kind, **record}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    step = record["step"]
    if self.tb is not None and (kind != "train" or step % self.every == 0):
      for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
          if math.isfinite(v):
            self.tb.add_scalar(f"{kind}/{k}", v, step)
    if self.bar is not None:
      if kind == "train":
        self.bar.update(step - self.bar.n)
        if step % self.every == 0 or step == self.bar.total:
          self.bar.set_postfix(self._postfix(record), refresh=False)
      else:
        self.message(" ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "kind"))

  def _postfix(self, r: dict) -> dict:
    keys = ("loss", "accuracy", "lr", "tok_s", "mfu")
    return {k: _fmt(r[k]) for k in keys if r.get(k) is not None}

  def message(self, text: str, all_processes: bool = False) -> None:
    if not self.enabled:
      if all_processes:
        print(f"[process {jax.process_index()}] {text}", flush=True)
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    self.file.close()
    if self.tb is not None:
      self.tb.close()
    if self.bar is not None:
      self.bar.close()


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return v
