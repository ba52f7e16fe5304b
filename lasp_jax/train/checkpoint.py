"""Checkpoints with Orbax: the train state (params, optimiser, step) and the data position.

Saves are asynchronous; ``close`` waits for them. Restoring takes an abstract state (shapes, dtypes
and shardings) so that every array comes back sharded on the current mesh.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a run under ``directory``."""

  def __init__(self, directory: str, keep: int):
    # Orbax also takes gs:// and other remote paths; only local ones are made absolute.
    self.directory = directory if "://" in str(directory) else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save of ``state`` (a pytree of arrays) and ``meta`` (JSON)."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of ``step``; ``like`` gives the tree, shapes, dtypes and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
