"""Run-directory logging: a JSONL record per step and eval, TensorBoard scalars, a progress bar.

Only process 0 writes; other processes keep the same interface and do nothing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
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
  """The records of a JSONL file. A torn last line (the writer died mid-record) is dropped with a
  warning; a bad line before it is a ValueError naming the file and the line: records are written
  one ``write`` + ``flush`` each, so only the last can be torn."""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  out = []
  for n, (i, line) in enumerate(lines):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n < len(lines) - 1:
        raise ValueError(f"{path}, line {i}: not a JSON record ({e}); only a torn last line is "
                         f"dropped") from None
      warnings.warn(f"{path}, line {i}: dropped a torn last record {line.strip()[:80]!r} (the "
                    f"writing process probably died mid-write)")
  return out


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
    tmp = self.path + ".tmp"         # a crash while rewriting must not lose the kept records
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, self.path)

  def write(self, record: dict[str, Any], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"kind": kind, **record}
    self.file.write(json.dumps(record) + "\n")   # one write + flush: a crash tears only this line
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
        self.message(f"{kind}: " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items()
                                            if k != "kind"))

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
