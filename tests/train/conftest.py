"""Shared runs for the training tests: one straight run that several tests compare against."""

import pytest

from lasp_jax.train import loop
from tests.train.runs import config


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
  """6 steps in one go, one process, 8 devices: ``(summary, run_dir)``."""
  run_dir = tmp_path_factory.mktemp("straight")
  return loop.run(config(run_dir)), run_dir
