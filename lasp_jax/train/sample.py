"""``python train.py sample RUN_DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N]
[--temperature T] [--top-k K] [--seed S] [--step STEP]``: text (or token ids) from a trained run.

The model is rebuilt from the run's saved ``config.yaml`` (its ``resolved_model``, the exact
``ModelConfig`` the run trained) and its parameters come from the run's newest checkpoint that
restores (``Checkpointer.restore_latest``; ``--step`` picks one), placed on one device: a run
trained sequence parallel over many devices samples on one. Generation is
``lasp_jax.models.decoding.generate``: greedy at temperature 0 (the default), else seeded sampling.

``--prompt TEXT`` is for text runs (``data.source=text``, or a token file written by ``train.py
prepare``): the prompt is encoded with the run's tokenizer (``RUN_DIR/data.json`` and
``RUN_DIR/tokenizer.json``, which training copies there; for older runs the data's sidecar): bytes,
bytes + EOS, or a Hugging Face ``tokenizer.json``; the output is the prompt followed by the
continuation, decoded with it (bytes as UTF-8 with ``errors="replace"``). ``--stop-at-eos`` ends
the continuation at the first EOS. ``--prompt-ids`` works for any run: comma-separated token ids
in, the prompt's ids followed by the generated ones out, in the same format. Errors (no such run,
no checkpoint, a text prompt for a run without a tokenizer, an id outside the vocabulary, bad
arguments) exit with status 2
and a message on stderr; the restored step goes to stderr too, so stdout holds only the sample.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import yaml

from lasp_jax.train.config import TrainConfig, from_dict

BYTE_VOCAB = 256


def read_run_config(run_dir: str):
  """``(TrainConfig, ModelConfig)`` from ``run_dir/config.yaml`` as the training run saved it.

  ValueError (naming the file) when the directory or its config is missing or unreadable.
  """
  from lasp_jax import models  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(run_dir):
    raise ValueError(f"run directory {run_dir!r} does not exist")
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} not found: {run_dir!r} is not a training run directory (a run "
                     f"writes its config.yaml there when it starts)")
  try:
    with open(path, encoding="utf-8") as f:
      saved = yaml.safe_load(f) or {}
  except (OSError, yaml.YAMLError) as e:
    raise ValueError(f"{path!r}: cannot read it ({e})") from None
  if not isinstance(saved, dict) or not isinstance(saved.get("resolved_model"), dict):
    raise ValueError(f"{path!r} has no resolved_model section: not a config.yaml written by a "
                     f"training run")
  saved = dict(saved)
  resolved = saved.pop("resolved_model")
  try:
    train_cfg = from_dict(saved)
    model_cfg = models.ModelConfig.from_dict(resolved)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path!r}: {e}") from None
  return train_cfg, model_cfg


def checkpoint_dir(run_dir: str, train_cfg: TrainConfig) -> str:
  """Where the run's checkpoints are: its ``checkpoint.dir`` if it set one (a relative one is
  taken from the working directory, as training took it), else ``RUN_DIR/checkpoints``."""
  return train_cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")


def run_tokenizer(run_dir: str, train_cfg: TrainConfig, model_cfg):
  """``(tokenizer, None)`` for a text run (``tokenizer.load_run_tokenizer``: the copy in the run
  directory, else the data's), or ``(None, why not)``."""
  from lasp_jax.train.tokenizer import load_run_tokenizer  # pylint: disable=import-outside-toplevel
  src = train_cfg.data.source
  if src not in ("text", "tokens"):
    return None, f"it trained on synthetic {src} data, not text"
  tok = load_run_tokenizer(run_dir, train_cfg)
  if tok is None:
    return None, (f"it trained on the token file {train_cfg.data.path!r}, whose tokenizer is "
                  f"unknown (no {run_dir}/data.json and no readable sidecar naming one)")
  if tok.vocab_size > model_cfg.vocab_size:
    return None, (f"its tokenizer ({tok.kind}) has vocab_size {tok.vocab_size}, more than the "
                  f"model's vocab_size {model_cfg.vocab_size}")
  return tok, None


def load_model(run_dir: str, *, step: int | None = None):
  """``(model, train_config)``: the run's model with the parameters of its newest checkpoint that
  restores (or of ``step``), on one device. See ``restore_run``."""
  model, train_cfg, _ = restore_run(run_dir, step=step)
  return model, train_cfg


def restore_run(run_dir: str, *, step: int | None = None):
  """``(model, train_config, restored_step)``: ``load_model`` plus the checkpoint step used.

  The model's structure comes from the saved ``config.yaml``; the checkpoint is read by
  ``Checkpointer.restore_latest`` with the run's state tree (parameters and optimiser state, the
  optimiser state then dropped). ValueError when there is no run or no checkpoint; RuntimeError
  when no checkpoint restores.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lasp_jax import models  # pylint: disable=import-outside-toplevel
  from lasp_jax.train import optim  # pylint: disable=import-outside-toplevel

  train_cfg, model_cfg = read_run_config(run_dir)
  check_checkpoint_dir(run_dir, train_cfg)
  abstract = nnx.eval_shape(lambda: models.LinearLlama(model_cfg, rngs=nnx.Rngs(params=0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):          # non-parameter state is not checkpointed: take it fresh
    _, _, rest = nnx.split(models.create_model(model_cfg, seed=train_cfg.seed), nnx.Param, ...)
  tx, _ = optim.build(train_cfg.optim, train_cfg.steps)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      {"params": params, "opt_state": jax.eval_shape(tx.init, params)})
  restored_step, state = restore_checkpoint(run_dir, train_cfg, like, step)
  return nnx.merge(graphdef, state["params"], rest), train_cfg, restored_step


def check_checkpoint_dir(run_dir: str, train_cfg: TrainConfig) -> str:
  """The run's checkpoint directory; ValueError when it does not exist."""
  directory = checkpoint_dir(run_dir, train_cfg)
  if "://" not in directory and not os.path.isdir(directory):
    raise ValueError(f"no checkpoints in {run_dir!r}: {directory!r} does not exist (a run saves "
                     f"one every checkpoint.every steps and at its end)")
  return directory


def restore_checkpoint(run_dir: str, train_cfg: TrainConfig, like, step: int | None = None):
  """``(restored_step, state)``: the newest checkpoint of the run that restores against the
  abstract state ``like`` (shapes, dtypes, shardings), or ``step``'s; ValueError naming a missing
  step or an empty directory."""
  from lasp_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  directory = check_checkpoint_dir(run_dir, train_cfg)
  ckpt = Checkpointer(directory, train_cfg.checkpoint.keep)
  try:
    if step is not None and step not in ckpt.all_steps():
      raise ValueError(f"no checkpoint step {step} in {directory!r} (it holds steps "
                       f"{ckpt.all_steps()})")
    found = ckpt.restore_latest(like, step=step)
  finally:
    ckpt.close()
  if found is None:
    raise ValueError(f"no checkpoints in {directory!r} (the run saves one every checkpoint.every "
                     f"steps and at its end)")
  return found[0], found[1]


def sample_ids(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0) -> list[int]:
  """The ``max_new_tokens`` ids generated after ``prompt_ids`` (a sequence of ints)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from lasp_jax.models.decoding import generate  # pylint: disable=import-outside-toplevel
  prompt = np.asarray([list(prompt_ids)], dtype=np.int64)
  if prompt.shape[1] == 0:
    raise ValueError("the prompt is empty: give at least one token")
  out = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
  return [int(t) for t in np.asarray(out)[0, prompt.shape[1]:]]


def encode_text(text: str) -> list[int]:
  """UTF-8 bytes of ``text``; characters the command line could not decode (surrogate escapes)
  become their original bytes."""
  return list(text.encode("utf-8", "surrogateescape"))


def decode_bytes(ids) -> str:
  return bytes(ids).decode("utf-8", errors="replace")


def sample_text(model, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                top_k: int | None = None, seed: int = 0, tokenizer=None) -> str:
  """The continuation of ``prompt``: ``max_new_tokens`` tokens decoded with ``tokenizer`` (a
  ``lasp_jax.train.tokenizer`` one; None: bytes, for a byte-level model), without the prompt."""
  if tokenizer is None:
    if model.config.vocab_size != BYTE_VOCAB:
      raise ValueError(f"a text prompt without a tokenizer needs a byte-level model (vocab_size "
                       f"{BYTE_VOCAB}); this one has vocab_size {model.config.vocab_size}: pass "
                       f"its tokenizer, or use token ids")
    return decode_bytes(sample_ids(model, encode_text(prompt), max_new_tokens,
                                   temperature=temperature, top_k=top_k, seed=seed))
  return tokenizer.decode(sample_ids(model, tokenizer.encode(prompt), max_new_tokens,
                                     temperature=temperature, top_k=top_k, seed=seed))


def parse_ids(text: str) -> list[int]:
  """``"1,2, 3"`` -> ``[1, 2, 3]``; ValueError naming the bad entry."""
  ids = []
  for part in text.split(","):
    part = part.strip()
    try:
      ids.append(int(part))
    except ValueError:
      raise ValueError(f"--prompt-ids {text!r}: {part!r} is not an integer (give comma-separated "
                       f"token ids, e.g. 1,2,3)") from None
  return ids


def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="python train.py sample",
      description="Generate from a training run: the model from RUN_DIR/config.yaml, the "
                  "parameters from its newest checkpoint, on one device. Prints the prompt "
                  "followed by the continuation on stdout (the restored step goes to stderr).")
  ap.add_argument("run_dir", metavar="RUN_DIR", help="a training run's directory (run_dir=)")
  prompt = ap.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", metavar="TEXT",
                      help="text, for runs on text or on a token file from train.py prepare: "
                           "encoded with the run's tokenizer (bytes, bytes + EOS or its "
                           "tokenizer.json); prints the prompt followed by the continuation, "
                           "decoded with the same tokenizer")
  prompt.add_argument("--prompt-ids", metavar="IDS",
                      help="comma-separated token ids (any run), e.g. 1,2,3; prints the prompt's "
                           "ids followed by the generated ones, comma-separated")
  ap.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                  help="tokens (bytes, for text) to generate (default 200)")
  ap.add_argument("--temperature", type=float, default=0.0, metavar="T",
                  help="0 (default): greedy; > 0: sample from softmax(logits / T)")
  ap.add_argument("--top-k", type=int, default=None, metavar="K",
                  help="sample among the K most likely tokens only (with --temperature > 0)")
  ap.add_argument("--seed", type=int, default=0, metavar="S",
                  help="sampling seed (default 0): the same seed gives the same sample")
  ap.add_argument("--stop-at-eos", action="store_true",
                  help="end the continuation at the first EOS (the tokenizer's, else data.eos_id)")
  ap.add_argument("--step", type=int, default=None,
                  help="restore this checkpoint step instead of the newest")
  return ap


def _error(msg: str) -> int:
  print(f"sample: {msg}", file=sys.stderr)
  return 2


def main(argv) -> int:
  """The ``train.py sample`` command line: 0 on success, 2 (a message on stderr) on bad input."""
  try:
    args = _parser().parse_args(list(argv))
  except SystemExit as e:            # --help (0) or a usage error (2, already printed)
    return e.code if isinstance(e.code, int) else 2
  if args.max_new_tokens < 0:
    return _error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    return _error(f"--temperature must be a finite number >= 0, got {args.temperature}")
  if args.top_k is not None and args.top_k < 1:
    return _error(f"--top-k must be >= 1, got {args.top_k}")
  if args.seed < 0:
    return _error(f"--seed must be >= 0, got {args.seed}")
  try:
    train_cfg, model_cfg = read_run_config(args.run_dir)
    vocab = model_cfg.vocab_size
    tok = None
    if args.prompt is not None:
      tok, why = run_tokenizer(args.run_dir, train_cfg, model_cfg)
      if tok is None:
        return _error(f"--prompt needs a text run, and {args.run_dir!r} is not one: {why}. Give "
                      f"token ids with --prompt-ids")
      ids = tok.encode(args.prompt)
    else:
      ids = parse_ids(args.prompt_ids)
    if not ids:
      return _error("the prompt is empty: give at least one character or token id")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
      return _error(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    if args.top_k is not None and args.top_k > vocab:
      return _error(f"--top-k {args.top_k} exceeds the model's vocab_size {vocab}")
    model, _, restored_step = restore_run(args.run_dir, step=args.step)
    print(f"sample: {args.run_dir}: checkpoint step {restored_step}, "
          f"{'greedy' if args.temperature == 0 else f'temperature {args.temperature:g}'}"
          f"{'' if args.top_k is None else f', top-k {args.top_k}'}", file=sys.stderr)
    new = sample_ids(model, ids, args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, seed=args.seed)
  except (ValueError, RuntimeError) as e:
    return _error(str(e))
  if args.stop_at_eos:
    eos = tok.eos_id if tok is not None else train_cfg.data.eos_id
    if eos is None and tok is None:
      # pylint: disable-next=import-outside-toplevel
      from lasp_jax.train.tokenizer import load_run_tokenizer
      try:
        t = load_run_tokenizer(args.run_dir, train_cfg)
      except (OSError, ValueError):
        t = None
      eos = t.eos_id if t is not None else None
    if eos is not None and eos in new:
      new = new[:new.index(eos) + 1]
  if args.prompt is not None:
    print(tok.decode(ids + new))     # the prompt, then the continuation
  else:
    print(",".join(str(t) for t in ids + new))
  return 0
