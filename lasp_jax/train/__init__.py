"""Training: config -> mesh -> data -> model -> optimiser -> checkpoints and metrics."""

from lasp_jax.train.config import TrainConfig, from_dict, load_config, parse_overrides
from lasp_jax.train.loop import run
from lasp_jax.train.plot import plot_run

__all__ = ["TrainConfig", "from_dict", "load_config", "parse_overrides", "plot_run", "run"]
