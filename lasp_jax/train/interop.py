"""``train.py import HF_DIR RUN_DIR`` and ``train.py export RUN_DIR HF_DIR``: Hugging Face Qwen3.5
(or fla Gated DeltaNet, by the folder's ``model_type``) checkpoints into a run directory whose
training continues from their weights, and a run's weights back out (``--layout fla`` for fla's;
``lasp_jax.models.hf`` does the mapping).

Import writes ``RUN_DIR/config.yaml`` (the default training config with the imported model and any
overrides given) and a step-0 checkpoint holding the weights and a fresh optimiser state; then
``python train.py RUN_DIR/config.yaml data.path=... steps=...`` resumes from it on any mesh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import yaml

from lasp_jax.train.config import load_config


def _error(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 2


def import_checkpoint(hf_dir: str, run_dir: str, overrides=(), *, text_only: bool = False,
                      param_dtype: str = "float32") -> str:
  """Writes ``run_dir`` (which must not exist) from ``hf_dir``; returns its config.yaml path.
  Everything is written under a temporary name first, so a failure leaves nothing behind."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lasp_jax.models import hf  # pylint: disable=import-outside-toplevel
  from lasp_jax.train import optim  # pylint: disable=import-outside-toplevel
  from lasp_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  if os.path.exists(run_dir):
    raise ValueError(f"{run_dir!r} exists; import writes a new run directory")
  model = hf.from_hf(hf_dir, param_dtype=param_dtype,
                     ignore_prefixes=hf.NON_TEXT_PREFIXES if text_only else ())
  mcfg = model.config
  model_keys = {f"model.{k}": v for k, v in mcfg.flat_dict().items()
                if k not in ("runtime.seq_axis", "runtime.batch_axes")}
  if "run_dir" in dict(overrides):
    raise ValueError(f"run_dir is the import's RUN_DIR {run_dir!r}; do not override it")
  cfg = load_config(None, {**model_keys, **dict(overrides), "run_dir": run_dir})
  tmp = f"{run_dir.rstrip(os.sep)}.importing"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    _, params, _ = nnx.split(model, nnx.Param, ...)
    tx, _ = optim.build(cfg.optim, cfg.steps)
    ckpt = Checkpointer(os.path.join(os.path.abspath(tmp), "checkpoints"), cfg.checkpoint.keep)
    try:
      ckpt.save(0, {"params": params, "opt_state": jax.jit(tx.init)(params)},
                {"data": {"next_example": 0, "source": cfg.data.source,
                          "seed": cfg.data.seed}, "imported_from": os.path.abspath(hf_dir)})
    finally:
      ckpt.close()
    with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
      yaml.safe_dump({**cfg.to_dict(), "resolved_model": mcfg.to_dict()}, f, sort_keys=False)
    os.rename(tmp, run_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(run_dir, "config.yaml")


def import_main(argv) -> int:
  p = argparse.ArgumentParser(
      prog="train.py import",
      description="A Hugging Face Qwen3.5 (or fla Gated DeltaNet) folder -> a run directory "
                  "that trains on from its "
                  "weights (python train.py RUN_DIR/config.yaml data.path=...).")
  p.add_argument("hf_dir")
  p.add_argument("run_dir")
  p.add_argument("overrides", nargs="*", help="training config overrides (data.*, optim.*, ...)")
  p.add_argument("--text-only", action="store_true",
                 help="skip the released checkpoints' vision tower and MTP head")
  p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
  args = p.parse_intermixed_args(argv)
  from lasp_jax.train.config import parse_overrides  # pylint: disable=import-outside-toplevel
  try:
    path = import_checkpoint(args.hf_dir, args.run_dir, parse_overrides(args.overrides),
                             text_only=args.text_only, param_dtype=args.param_dtype)
  except ValueError as e:
    return _error(str(e))
  print(f"imported {args.hf_dir} -> {args.run_dir} (step 0); train on with:\n"
        f"  python train.py {path} data.path=... steps=...")
  return 0


def export_main(argv) -> int:
  p = argparse.ArgumentParser(prog="train.py export",
                              description="A run's weights -> a Hugging Face Qwen3.5 (or fla "
                                          "Gated DeltaNet) folder.")
  p.add_argument("run_dir")
  p.add_argument("hf_dir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="dtype of the stored tensors (default: the run's param_dtype)")
  p.add_argument("--layout", choices=("qwen3_5", "fla"), default="qwen3_5",
                 help="Qwen3_5ForCausalLM (default) or fla's GatedDeltaNetForCausalLM")
  args = p.parse_args(argv)
  from lasp_jax.models import hf  # pylint: disable=import-outside-toplevel
  from lasp_jax.train.sample import restore_run  # pylint: disable=import-outside-toplevel
  try:
    model, _, step = restore_run(args.run_dir, step=args.step)
    hf.check_exportable(model.config, args.layout)
    hf.to_hf(model, args.hf_dir, dtype=args.dtype, layout=args.layout)
  except ValueError as e:
    return _error(str(e))
  print(f"exported {args.run_dir} (step {step}) -> {args.hf_dir}")
  return 0
