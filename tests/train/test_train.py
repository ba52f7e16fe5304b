"""End-to-end training, in process on the 8 simulated CPU devices: exact resume after SIGTERM,
loss falling on Shakespeare, MQAR recall above chance on the tiny hybrid, NaN stop, plot."""

import os
import signal

import numpy as np
import pytest

from lasp_jax.train import load_config, loop, plot_run
from lasp_jax.train.metrics import read_jsonl

SHAKESPEARE = "../shared/data/tinyshakespeare.txt"   # relative to the repository root
QUIET = ["log.progress=false", "log.tensorboard=false"]


@pytest.fixture(autouse=True)
def _model_impl(monkeypatch):
  if os.environ.get("LASP_TRAIN_STANDIN"):     # development only: the stand-in model
    from tests.train import standin
    monkeypatch.setattr(loop, "_models", lambda: standin)


def _cfg(run_dir, *args):
  return load_config(None, [f"run_dir={run_dir}", *QUIET, *args])


def _train_records(run_dir):
  return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def test_exact_resume_after_sigterm(tmp_path):
  """2K steps straight == K steps, SIGTERM, restart, K more: bit-identical losses (with
  gradient accumulation, a data x sp mesh and the zigzag layout)."""
  args = ["steps=6", "checkpoint.every=100", "log.eval_every=0", "model.preset=tiny",
          "mesh.data=2", "mesh.sp=4", "model.chunk_size=8", "data.seq_len=64", "data.batch_size=2",
          "data.mqar.num_kv_pairs=4", "optim.grad_accum=2", "optim.warmup_steps=2"]
  straight = loop.run(_cfg(tmp_path / "a", *args))
  assert straight["steps"] == 6 and straight["stopped_by"] is None

  def kill_at_3(step, rec):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  first = loop.run(_cfg(tmp_path / "b", *args), on_step=kill_at_3)
  assert first["stopped_by"] == "SIGTERM" and first["steps"] == 3
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
  second = loop.run(_cfg(tmp_path / "b", *args))
  assert second["start_step"] == 3 and second["steps"] == 6
  assert first["losses"] + second["losses"] == straight["losses"]
  a, b = _train_records(tmp_path / "a"), _train_records(tmp_path / "b")
  assert [r["step"] for r in b] == list(range(1, 7))
  for ra, rb in zip(a, b):
    assert (ra["loss"], ra["grad_norm"], ra["lr"]) == (rb["loss"], rb["grad_norm"], rb["lr"])
  # The loss curve plot, from the library and from the command line.
  png = plot_run(str(tmp_path / "b"))
  assert os.path.getsize(png) > 1000
  import train  # the top-level script
  assert train.main(["plot", str(tmp_path / "a")]) == 0
  assert os.path.exists(tmp_path / "a" / "loss.png")


def test_loss_falls_on_shakespeare(tmp_path):
  s = loop.run(_cfg(tmp_path, "steps=40", "model.preset=tiny", "model.chunk_size=8", "data.source=text",
                    f"data.path={SHAKESPEARE}", "data.seq_len=128", "data.batch_size=8",
                    "optim.warmup_steps=5", "log.eval_every=40", "log.eval_batches=2"))
  first, last = s["losses"][0], np.mean(s["losses"][-5:])
  assert first > 5.0 and last < first - 1.5, (first, last)
  assert s["evals"][-1]["loss"] < first - 1.5


def test_mqar_recall_above_chance_on_tiny_hybrid(tmp_path):
  s = loop.run(_cfg(tmp_path, "steps=150", "model.preset=tiny_hybrid", "model.chunk_size=4", "data.seq_len=64",
                    "data.batch_size=16", "data.mqar.num_kv_pairs=4", "optim.lr=3e-3",
                    "optim.warmup_steps=10", "log.eval_every=150", "log.eval_batches=2"))
  ev = s["evals"][-1]
  assert ev["accuracy"] > 2 * ev["chance"], ev


def test_nan_loss_stops_with_a_message(tmp_path):
  with pytest.raises(FloatingPointError, match=r"loss is nan at step \d.*optim.lr"):
    loop.run(_cfg(tmp_path, "steps=5", "model.preset=tiny", "model.chunk_size=4", "data.seq_len=64",
                  "data.batch_size=2", "data.mqar.num_kv_pairs=4", "optim.lr=1e30",
                  "optim.warmup_steps=0", "optim.clip_norm=0", "log.eval_every=0"))
