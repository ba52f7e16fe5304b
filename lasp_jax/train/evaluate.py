"""``python train.py eval RUN_DIR [--data PATH | --split eval|train] [--batches N] [--step S]
[--mesh.sp N] [--mesh.data N] [--out FILE]``: held-out loss, perplexity and bits per byte of a
trained text run.

The model and its newest checkpoint (or ``--step``) come from the run directory as for ``train.py
sample``, but the evaluation runs as the training loop's does: sequence parallel on the run's mesh
(``mesh.*`` of its ``config.yaml``; ``--mesh.sp N`` / ``--mesh.data N`` choose another, e.g. fewer
devices), the parameters restored sharded on it, each batch sharded ``P(None, batch axes, "sp")``
in the model's layout, and the training loop's jitted eval step. ``data.seq_len`` must split over
the mesh as training requires. The data is the run's own eval split (the tail
``data.eval_fraction`` of its text or token file, every window once; ``--split train``: its
training windows), or ``--data PATH``: a token file (its sidecar must agree with the run's
tokenizer: vocabulary and EOS id) or a UTF-8 text file, encoded with the run's tokenizer. Windows
are the training loop's: non-overlapping ``data.seq_len + 1`` tokens, with the ``segment_ids`` and
masks of packed documents (each document starts afresh, the target after an EOS is not counted),
``data.batch_size`` windows a batch. ``--batches N`` takes examples ``0 .. N * batch_size - 1`` of
the split in the training loop's order (wrapping round as it does): ``--batches log.eval_batches``
gives the number the training loop's eval logged.

Results: ``loss`` (mean nats per counted token), ``perplexity`` (``exp(loss)``), ``bits_per_byte``
(the summed loss in bits over the UTF-8 bytes of the counted targets: the tokenizer's decode of
them without special tokens; for bytes one token is one byte), ``tokens``, ``bytes`` and ``mesh``
(the axes it ran on). A summary line goes to stderr, one JSON line to stdout, and the JSON to
``--out`` (default ``RUN_DIR/eval_step{S}.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np


def _error(msg: str) -> int:
  print(f"eval: {msg}", file=sys.stderr)
  return 2


def eval_tokens(run_dir: str, train_cfg, tok, data: str | None, split: str = "eval"
                ) -> tuple[np.ndarray, str, str]:
  """``(token stream, split, description)``: the run's ``split`` (eval or train) or ``data``'s
  tokens (split "all")."""
  # pylint: disable-next=import-outside-toplevel
  from lasp_jax.train.data import load_tokens, read_sidecar
  if data is None:
    if split == "eval" and train_cfg.data.eval_fraction <= 0:
      raise ValueError(f"{run_dir!r} trained with data.eval_fraction=0: it has no eval split; "
                       f"give --data PATH")
    return load_tokens(train_cfg.data), split, f"{train_cfg.data.path} ({split} split)"
  if not os.path.isfile(data):
    raise ValueError(f"--data {data!r} is not a file")
  meta = read_sidecar(data)
  if meta is not None:
    side = f"{data}.json"
    if meta.get("vocab_size") is not None and meta["vocab_size"] != tok.vocab_size:
      raise ValueError(f"{side} says vocab_size {meta['vocab_size']}, but {run_dir!r} trained "
                       f"with a tokenizer of vocab_size {tok.vocab_size}")
    if meta.get("tokenizer") != tok.kind:
      raise ValueError(f"{side} says tokenizer {meta.get('tokenizer')!r}, but {run_dir!r} trained "
                       f"with {tok.kind!r}")
    if (tok.kind == "huggingface" and meta.get("tokenizer_sha256")
        and meta["tokenizer_sha256"] != tok.sha256):
      raise ValueError(f"{side}: tokenizer_sha256 {meta['tokenizer_sha256'][:12]}... differs from "
                       f"the run's tokenizer.json ({tok.sha256[:12]}...): another tokenizer")
    if meta.get("eos_id") != tok.eos_id and meta.get("eos_id") is not None:
      raise ValueError(f"{side} says eos_id {meta.get('eos_id')}, but {run_dir!r} trained with "
                       f"eos_id {tok.eos_id}")
    tokens = np.memmap(data, dtype=meta["dtype"], mode="r")
    return tokens, "all", data
  with open(data, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--data {data!r} has no sidecar and is not UTF-8 text (byte {e.start})"
                     ) from None
  ids = tok.encode(text)
  return np.asarray(ids, dtype=np.int64), "all", f"{data} (text, {len(ids)} tokens)"


def eval_mesh_config(mesh_cfg, *, sp: int | None = None, data: int | None = None):
  """The run's ``MeshConfig``, or with ``--mesh.sp`` / ``--mesh.data`` changed: then, when no axis
  is -1, the mesh takes the first ``data x fsdp x sp`` devices (evaluation on fewer devices than
  training had). ValueError naming a size below 1."""
  if sp is None and data is None:
    return mesh_cfg
  for name, val in (("sp", sp), ("data", data)):
    if val is not None and val < 1:
      raise ValueError(f"--mesh.{name} must be >= 1, got {val}")
  out = dataclasses.replace(mesh_cfg, sp=mesh_cfg.sp if sp is None else sp,
                            data=mesh_cfg.data if data is None else data)
  sizes = (out.data, out.fsdp, out.sp)
  if -1 not in sizes:
    out = dataclasses.replace(out, num_devices=int(np.prod(sizes)))
  return out


def run_mesh(train_cfg, model_cfg, mesh_cfg):
  """``(mesh, layout)``: the mesh evaluation runs on, built as the training loop builds it, and the
  model's sequence layout, after the training loop's checks: the devices exist, ``data.seq_len``
  splits over ``sp`` into whole chunks and ``data.batch_size`` over the batch axes (ValueErrors
  naming the value)."""
  import jax  # pylint: disable=import-outside-toplevel

  from lasp_jax.train.loop import sequence_layout  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from lasp_jax.train.mesh import batch_axes, build_mesh, setup_devices
  setup_devices(mesh_cfg)            # before JAX starts its backends (a fresh `train.py eval`)
  if mesh_cfg.num_devices is not None and mesh_cfg.num_devices > jax.device_count():
    raise ValueError(f"the eval mesh (data={mesh_cfg.data}, fsdp={mesh_cfg.fsdp}, "
                     f"sp={mesh_cfg.sp}) needs {mesh_cfg.num_devices} devices; there are "
                     f"{jax.device_count()}")
  mesh = build_mesh(mesh_cfg)
  layout = sequence_layout(model_cfg, mesh, train_cfg.data.seq_len)
  shards = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
  if train_cfg.data.batch_size % shards:
    raise ValueError(f"data.batch_size={train_cfg.data.batch_size} is not divisible by the "
                     f"{shards} batch shards of the mesh {dict(mesh.shape)}")
  return mesh, layout


def restore_on_mesh(run_dir: str, train_cfg, model_cfg, mesh, step: int | None = None):
  """``(graphdef, params, rest, restored_step)``: the run's model with the parameters of its
  newest checkpoint that restores (or of ``step``), each array restored straight onto ``mesh``
  with the sharding training gives it (``create_model(mesh=...)``; nothing is materialised
  first). Errors as ``sample.restore_run``'s."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from lasp_jax import models  # pylint: disable=import-outside-toplevel
  from lasp_jax.train.loop import _step_functions  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from lasp_jax.train.sample import check_checkpoint_dir, restore_checkpoint

  check_checkpoint_dir(run_dir, train_cfg)     # before anything is built
  create = lambda: models.create_model(model_cfg, mesh=mesh, seed=train_cfg.seed)  # noqa: E731
  graphdef, params, rest = nnx.split(nnx.eval_shape(create), nnx.Param, ...)
  if jax.tree.leaves(rest):          # non-parameter state is not checkpointed: take it fresh
    _, _, rest = nnx.split(create(), nnx.Param, ...)
  init_opt = _step_functions(graphdef, train_cfg.optim, train_cfg.steps)[0]

  def on_mesh(x):                    # abstract shardings -> this mesh's (scalars: replicated)
    spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  like = jax.tree.map(on_mesh, {"params": params, "opt_state": jax.eval_shape(init_opt, params)})
  restored_step, state = restore_checkpoint(run_dir, train_cfg, like, step)
  return graphdef, state["params"], rest, restored_step


def place(batch: dict, mesh, layout: str) -> dict:
  """Host arrays (B, N) in natural order -> the training loop's eval batch: global arrays
  (1, B, N) in ``layout`` order along N, sharded ``P(None, batch axes, "sp")`` as
  ``data.Batches`` shards them (each device's block cut from the host array)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from lasp_jax.train.data import zigzag_permutation  # pylint: disable=import-outside-toplevel
  from lasp_jax.train.mesh import SEQ_AXIS, batch_axes  # pylint: disable=import-outside-toplevel
  axes = batch_axes(mesh)
  sharding = NamedSharding(mesh, P(None, axes if axes else None, SEQ_AXIS))
  n = next(iter(batch.values())).shape[-1]
  perm = zigzag_permutation(n, mesh.shape[SEQ_AXIS]) if layout == "zigzag" else None
  out = {}
  for k, v in batch.items():
    v = v[None] if perm is None else v[None][..., perm]
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


def evaluate(run_dir: str, *, data: str | None = None, batches: int | None = None,
             step: int | None = None, split: str = "eval", progress: bool = False,
             mesh_sp: int | None = None, mesh_data: int | None = None) -> dict:
  """The results dict (see the module's docstring). ValueError on bad input."""
  import grain  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  from lasp_jax.train import data as data_lib  # pylint: disable=import-outside-toplevel
  from lasp_jax.train.loop import _step_functions  # pylint: disable=import-outside-toplevel
  from lasp_jax.train.mesh import SEQ_AXIS  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from lasp_jax.train.sample import read_run_config, run_tokenizer

  train_cfg, model_cfg = read_run_config(run_dir)
  tok, why = run_tokenizer(run_dir, train_cfg, model_cfg)
  if tok is None:
    raise ValueError(f"{run_dir!r} is not a text run: {why}")
  mesh_cfg = eval_mesh_config(train_cfg.mesh, sp=mesh_sp, data=mesh_data)
  tokens, split, described = eval_tokens(run_dir, train_cfg, tok, data, split)
  cfg = train_cfg.data
  eos = tok.eos_id if data is not None else data_lib.eos_id(cfg, model_cfg.vocab_size)
  L, B = cfg.seq_len, cfg.batch_size
  if split == "all":
    num = (len(tokens) - 1) // L
    if num < 1:
      raise ValueError(f"{described}: {len(tokens)} tokens, too few for one window of "
                       f"data.seq_len={L} + 1")

    def window(w):
      x = np.asarray(tokens[w * L:w * L + L + 1], dtype=np.int32)
      if eos is None:
        return {"inputs": x[:-1], "targets": x[1:], "mask": np.ones(L, np.float32)}
      seg, mask = data_lib.documents(x[:-1], eos)
      return {"inputs": x[:-1], "targets": x[1:], "mask": mask, "segment_ids": seg}
    ds = grain.MapDataset.range(num).repeat().map(window)
  else:
    ds = data_lib.window_dataset(tokens, cfg, split, cfg.seed, eos)
    nw = (len(tokens) - 1) // L
    ne = max(int(round(nw * cfg.eval_fraction)), 1) if cfg.eval_fraction > 0 else 0
    num = ne if split == "eval" else nw - ne
  examples = num if batches is None else batches * B
  mesh, layout = run_mesh(train_cfg, model_cfg, mesh_cfg)
  if eos is not None and mesh.shape[SEQ_AXIS] == 1:
    # The model's document positions fail on a one-device sequence axis (a ShardingTypeError from
    # the cummax in models/layers.py); training with mesh.sp=1 on packed documents fails alike.
    raise ValueError(f"sp={mesh.shape[SEQ_AXIS]}: packed documents (eos_id {eos}) need a sequence "
                     f"axis of at least 2 devices; use --mesh.sp >= 2")
  with jax.set_mesh(mesh):
    graphdef, params, rest, restored = restore_on_mesh(run_dir, train_cfg, model_cfg, mesh, step)
    eval_step = _step_functions(graphdef, train_cfg.optim, train_cfg.steps)[3]
    tot_nll = tot_count = 0.0
    tot_bytes = 0
    starts = range(0, examples, B)
    it = starts
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      it = tqdm(starts, desc="eval", unit="batch", file=sys.stderr)
    for s in it:
      exs = [ds[i] for i in range(s, min(s + B, examples))]
      while len(exs) < B:                # a last partial batch: pad with uncounted rows
        pad = {k: np.zeros_like(v) for k, v in exs[0].items()}
        exs.append(pad)
      batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
      top = int(max(batch["inputs"].max(), batch["targets"].max()))
      if top >= model_cfg.vocab_size:
        raise ValueError(f"token id {top} in {described} is >= the model's vocab_size "
                         f"{model_cfg.vocab_size}")
      nll, count, _ = eval_step(params, rest, place(batch, mesh, layout))
      tot_nll += float(nll)
      tot_count += float(count)
      for t, m in zip(batch["targets"], batch["mask"]):
        tot_bytes += tok.num_bytes(t[m > 0].tolist())
  loss = tot_nll / max(tot_count, 1.0)
  return {"run_dir": run_dir, "step": restored, "data": described, "examples": examples,
          "tokens": int(tot_count), "bytes": int(tot_bytes), "loss": loss,
          "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": tot_nll / math.log(2) / tot_bytes if tot_bytes else None,
          "mesh": dict(mesh.shape)}


def main(argv) -> int:
  """The ``train.py eval`` command line: 0 on success, 2 (a message on stderr) on bad input."""
  ap = argparse.ArgumentParser(prog="python train.py eval",
                               description="Held-out loss, perplexity and bits per byte of a "
                                           "text run (a JSON line on stdout)")
  ap.add_argument("run_dir", metavar="RUN_DIR")
  ap.add_argument("--data", default=None, metavar="PATH",
                  help="a token file (with sidecar) or a UTF-8 text file; default: the run's "
                       "eval split")
  ap.add_argument("--split", choices=("eval", "train"), default="eval",
                  help="without --data: the run's held-out tail (default) or its training windows "
                       "(in the training loop's shuffled order)")
  ap.add_argument("--batches", type=int, default=None, metavar="N",
                  help="evaluate N batches of data.batch_size windows (default: every window once)")
  ap.add_argument("--step", type=int, default=None, help="the checkpoint step (default: newest)")
  ap.add_argument("--out", default=None, metavar="FILE",
                  help="where to write the JSON (default RUN_DIR/eval_step{STEP}.json)")
  ap.add_argument("--mesh.sp", dest="mesh_sp", type=int, default=None, metavar="N",
                  help="sequence-parallel devices (default: the run's mesh.sp)")
  ap.add_argument("--mesh.data", dest="mesh_data", type=int, default=None, metavar="N",
                  help="data-parallel devices (default: the run's mesh.data); with --mesh.sp, "
                       "the mesh takes the first data x sp devices")
  ap.add_argument("--no-progress", action="store_true")
  try:
    args = ap.parse_args(list(argv))
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 2
  if args.batches is not None and args.batches < 1:
    return _error(f"--batches must be >= 1, got {args.batches}")
  try:
    res = evaluate(args.run_dir, data=args.data, batches=args.batches, step=args.step,
                   split=args.split, progress=not args.no_progress, mesh_sp=args.mesh_sp,
                   mesh_data=args.mesh_data)
  except (ValueError, RuntimeError, OSError) as e:
    return _error(str(e))
  out = args.out or os.path.join(args.run_dir, f"eval_step{res['step']}.json")
  with open(out + ".tmp", "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  os.replace(out + ".tmp", out)
  bpb = "" if res["bits_per_byte"] is None else f", {res['bits_per_byte']:.4f} bits/byte"
  print(f"eval: {res['data']}, step {res['step']}: loss {res['loss']:.4f}, perplexity "
        f"{res['perplexity']:.2f}{bpb} over {res['tokens']} tokens on mesh {res['mesh']} -> {out}",
        file=sys.stderr)
  print(json.dumps(res))
  return 0
