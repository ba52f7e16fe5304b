"""Checkpoints with Orbax: the train state (params, optimiser, step) and the data position.

Saves are asynchronous; ``close`` waits for them. Restoring takes an abstract state (shapes, dtypes
and shardings) so that every array comes back sharded on the current mesh. A checkpoint that fails
to restore (a truncated file, missing metadata) is skipped with a warning for the newest one that
does restore.

``resume_conflicts`` decides, before anything is written, whether a run directory's saved
``config.yaml`` can be resumed under a new config: the fields that change the shapes or the tree
of the saved state must be equal; everything else may change on resume.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from lasp_jax.train.mesh import any_process



def resumable_model_key(key: str) -> bool:
  """Whether a model field (dotted key) may differ on resume: the ``runtime`` group changes how
  the model runs, ``init_std`` only step 0, ``linear.router_aux_coef`` only the training
  objective. Every other field (d_model, vocab_size, layer_pattern, param_dtype,
  softmax.rope_base, ...) must match: it changes the parameter shapes or tree, or what the saved
  weights mean."""
  return key.startswith("runtime.") or key in ("init_std", "linear.router_aux_coef")


def resume_conflicts(saved: dict, new: dict) -> list[str]:
  """``"key: saved -> new"`` for each field that makes ``saved``'s checkpoints unusable by ``new``.

  Both are ``config.yaml`` mappings (``TrainConfig.to_dict()`` plus ``resolved_model``). The model
  is compared field by field on the resolved config (so a preset renamed with the same fields is
  fine; a run saved with the flat keys of earlier versions compares by their new names), except
  ``resumable_model_key`` ones; fields only one side knows (a newer ModelConfig) are not compared. The optimiser's state tree depends only on whether clipping is on
  (``optim.clip_norm > 0``). Free to change: ``steps``, the lr schedule and AdamW constants,
  ``optim.grad_accum``, ``data.*`` (a different source or seed is warned about at restore),
  ``mesh.*`` (the state is resharded), ``checkpoint.*``, ``log.*``, ``name``, ``seed``.
  """
  out = []
  from lasp_jax.models.config import canonical_items  # pylint: disable=import-outside-toplevel
  old_m = canonical_items(saved.get("resolved_model") or {})
  new_m = canonical_items(new.get("resolved_model") or {})
  for k in new_m:
    if k in old_m and not resumable_model_key(k) and _norm(old_m[k]) != _norm(new_m[k]):
      out.append(f"model.{k}: {old_m[k]!r} -> {new_m[k]!r}")
  old_clip = (saved.get("optim") or {}).get("clip_norm")
  new_clip = new["optim"]["clip_norm"]
  if old_clip is not None and (old_clip > 0) != (new_clip > 0):
    out.append(f"optim.clip_norm: {old_clip!r} -> {new_clip!r} (clipping on/off changes the "
               f"optimiser state)")
  return out


def _norm(v):
  """YAML gives lists where the config has tuples."""
  return tuple(v) if isinstance(v, (list, tuple)) else v


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of a run under ``directory``."""

  def __init__(self, directory: str, keep: int):
    # Orbax also takes gs:// and other remote paths; only local ones are made absolute.
    self.directory = directory if "://" in str(directory) else os.path.abspath(directory)
    # create=False: the first save makes the directory, so a run that fails to start leaves none.
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def delete(self, steps) -> None:
    for s in steps:
      self.manager.delete(s)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save of ``state`` (a pytree of arrays) and ``meta`` (JSON).

    A checkpoint already at ``step`` is replaced: it is from a branch this run does not continue
    (a damaged checkpoint skipped at restore), and skipping the save would leave it in place.
    """
    if step in self.manager.all_steps():
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of ``step``; ``like`` gives the tree, shapes, dtypes and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_latest(self, like: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """``(step, state, meta)`` of the newest checkpoint that restores, or None when there is none.

    Each one that fails is named in a warning and the next older one is tried; all processes move
    on together. ``step`` restores exactly that step (no fallback: it was asked for).
    """
    steps = self.all_steps() if step is None else [step]
    failures = []
    for s in reversed(steps):
      try:
        state, meta = self.restore(s, like)
        error = None
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
        error = e
      if not any_process(error is not None):
        if failures:
          warnings.warn(f"resuming from checkpoint step {s} in {self.directory}: newer "
                        f"checkpoint(s) failed to restore and were skipped ("
                        + "; ".join(f"step {f}: {why}" for f, why in failures)
                        + "); they are replaced as the run reaches their steps")
        return s, state, meta
      failures.append((s, f"{type(error).__name__}: {str(error)[:300]}" if error is not None
                       else "failed on another process"))
    if not failures:
      return None
    raise RuntimeError(
        f"no checkpoint in {self.directory} restores: "
        + "; ".join(f"step {s}: {why}" for s, why in failures)
        + ". Pick one with checkpoint.step, or start afresh with checkpoint.overwrite=true")

  def close(self) -> None:
    """Waits for the saves in flight; a second call does nothing."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None
