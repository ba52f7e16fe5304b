"""Training: config -> mesh -> data -> model -> optimiser -> checkpoints and metrics.

``run`` and ``plot_run`` load on first use: importing the package (or its ``config``/``optim``
modules, as ``benchmarks/train_step.py`` does on a bare accelerator image) does not pull in the
data loader (grain) or TensorBoard logging.
"""

import importlib

from lasp_jax.train.config import TrainConfig, from_dict, load_config, parse_overrides

_LAZY = {"run": "lasp_jax.train.loop", "plot_run": "lasp_jax.train.plot"}

__all__ = ["TrainConfig", "from_dict", "load_config", "parse_overrides", "plot_run", "run"]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'lasp_jax.train' has no attribute {name!r}")
