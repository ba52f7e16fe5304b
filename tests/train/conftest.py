"""Shared runs for the training tests: one straight run that several tests compare against."""

import pytest

from lasp_jax.train import load_config, loop

# The comparison config: a data x sp mesh, zigzag layout, gradient accumulation; tiny everywhere.
COMMON = ["steps=6", "checkpoint.every=100", "log.eval_every=0", "model.preset=tiny_hybrid",
          "model.num_layers=2", "model.layer_pattern=LN", "model.layout=zigzag", "mesh.data=2",
          "mesh.sp=4", "model.chunk_size=8", "data.seq_len=64", "data.batch_size=2",
          "data.mqar.num_kv_pairs=4", "optim.grad_accum=2", "optim.warmup_steps=2"]
QUIET = ["log.progress=false", "log.tensorboard=false"]


def config(run_dir, *args):
  return load_config(None, [f"run_dir={run_dir}", *QUIET, *COMMON, *args])


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
  """6 steps in one go, one process, 8 devices: ``(summary, run_dir)``."""
  run_dir = tmp_path_factory.mktemp("straight")
  return loop.run(config(run_dir)), run_dir
