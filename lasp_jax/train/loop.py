"""The training run: config -> mesh -> data -> model -> optimiser -> checkpoints and metrics.

``run(config)`` is the whole job. The model is split once (``nnx.split``) and one ``jax.jit``-ed
pure function of ``(params, rest, opt_state, batch, step)`` does a full optimiser step,
micro-batches included, so the Python cost per step is one call. Everything runs inside
``with jax.set_mesh(mesh)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from lasp_jax.train import optim
from lasp_jax.train.checkpoint import Checkpointer, resume_conflicts
from lasp_jax.train.config import SYNTHETIC_SOURCES, TrainConfig
from lasp_jax.train.data import Batches
from lasp_jax.train.mesh import SEQ_AXIS, any_process, batch_axes, build_mesh, setup_devices
from lasp_jax.train.metrics import RunLog, peak_flops_per_device
from lasp_jax.train.tokenizer import data_tokenizer_meta, save_run_tokenizer


def _models():
  """The models package (a function so that tests can substitute a stand-in)."""
  from lasp_jax import models  # pylint: disable=import-outside-toplevel
  return models


def model_config(cfg: TrainConfig, mesh):
  """The preset plus overrides, with the mesh's sequence and batch axes filled in."""
  models = _models()
  over = dict(cfg.model.overrides)
  axes = batch_axes(mesh)
  for key, want in (("runtime.seq_axis", SEQ_AXIS), ("runtime.batch_axes", axes)):
    if key in over and tuple(np.atleast_1d(over[key])) != tuple(np.atleast_1d(want)):
      raise ValueError(f"model.{key}={over[key]!r} disagrees with the mesh {dict(mesh.shape)}, "
                       f"which needs {want!r}; leave model.{key} unset")
  over["runtime.seq_axis"], over["runtime.batch_axes"] = SEQ_AXIS, axes
  base = models.get_config(cfg.model.preset)
  over["vocab_size"] = resolve_vocab_size(cfg, base.vocab_size)
  mcfg = models.ModelConfig.from_dict({**base.flat_dict(), **over})
  sequence_layout(mcfg, mesh, cfg.data.seq_len)
  return mcfg


def sequence_layout(mcfg, mesh, seq_len: int) -> str:
  """``mcfg``'s layout of the sequence over the mesh's sequence axis (``"contiguous"`` or
  ``"zigzag"``), after checking that ``seq_len`` (``data.seq_len``) splits into it: a ValueError
  naming it unless it is a multiple of sp devices x segments x the kernels' chunk size."""
  w = dict(zip(mesh.axis_names, mesh.axis_sizes))[SEQ_AXIS]
  segments = 2 if mcfg.runtime.layout == "zigzag" else 1
  if seq_len % (w * segments * mcfg.runtime.chunk_size):
    raise ValueError(
        f"data.seq_len={seq_len} must be a multiple of "
        f"{w * segments * mcfg.runtime.chunk_size}: "
        f"sp={w} devices x {segments} segment(s) ({mcfg.runtime.layout} layout) x "
        f"model.runtime.chunk_size={mcfg.runtime.chunk_size}; change data.seq_len, "
        f"model.runtime.chunk_size or mesh.sp")
  return mcfg.runtime.layout


def resolve_vocab_size(cfg: TrainConfig, preset_vocab: int) -> int:
  """The model's vocabulary: ``model.vocab_size`` if given (ValueError naming both numbers when it
  is smaller than the data's, except for text, whose bytes may use fewer), else the data's
  (``data.data_vocab_size``): a token file's sidecar or 256 for text exactly; for MQAR / parity
  the preset's, raised to what the task needs. The preset's when the data does not say (a token
  file without a sidecar vocab_size)."""
  from lasp_jax.train.data import data_vocab_size  # pylint: disable=import-outside-toplevel
  data_vocab, where = data_vocab_size(cfg.data)
  given = cfg.model.overrides.get("vocab_size")
  if given is not None:
    # text: bytes, 256 at most; a smaller vocabulary may fit the text (ASCII), which the first
    # batch checks (an id >= model.vocab_size is a set-up error naming it).
    if data_vocab is not None and given < data_vocab and cfg.data.source != "text":
      raise ValueError(f"model.vocab_size={given} is smaller than the data's vocab_size "
                       f"{data_vocab} ({where}): set model.vocab_size >= {data_vocab}, or leave it "
                       f"unset to take {data_vocab} from the data")
    return int(given)
  if data_vocab is None:
    return preset_vocab
  if cfg.data.source in SYNTHETIC_SOURCES:
    return max(preset_vocab, data_vocab)
  return data_vocab


# ----------------------------------------------------------------------------------------------
# The step functions (pure, jitted once).

def _sums(graphdef, rest, params, inputs, targets, mask, segment_ids=None, *, router_aux=False):
  """Sum of masked token NLLs and ``(token count, correct count)`` for one micro-batch (B, N);
  ``segment_ids`` (B, N) or None: the packed documents of ``inputs``.

  ``router_aux`` (the training step) with Mixture-of-Memories layers and ``coef =
  linear.router_aux_coef > 0``: the first value is the objective, the NLL sum plus ``coef * L_aux
  * token count`` (so that its mean is ``NLL + coef * L_aux``), and two sums follow the counts:
  ``(token count, correct count, NLL sum, L_aux * token count)``. With ``coef`` 0 nothing
  changes."""
  model = nnx.merge(graphdef, params, rest)
  coef = _router_aux_coef(model)
  if router_aux and coef:
    logits, aux = _models().forward_with_router_aux_loss(model, inputs, segment_ids)
  else:
    logits, aux = model(inputs, segment_ids), None
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  nll_sum, count = jnp.sum(nll * mask), jnp.sum(mask)
  if not router_aux or not coef:
    return nll_sum, (count, jnp.sum(correct * mask))
  aux_sum = jnp.zeros((), jnp.float32) if aux is None else aux.astype(jnp.float32) * count
  return nll_sum + coef * aux_sum, (count, jnp.sum(correct * mask), nll_sum, aux_sum)


def _router_aux_coef(model) -> float:
  """``linear.router_aux_coef`` of a model with Mixture-of-Memories layers, else 0."""
  lin = getattr(getattr(model, "config", None), "linear", None)
  return float(getattr(lin, "router_aux_coef", 0.0)) if getattr(lin, "memories", 0) else 0.0


def make_train_step(graphdef, tx, lr_schedule):
  """``step(params, rest, opt_state, batch, step) -> (params, opt_state, metrics)``.

  ``batch`` arrays are (A, B, N), ``segment_ids`` among them when the data packs documents (its
  keys are part of the jitted structure: a run's batches all have the same, one compile). The
  gradient is of the summed NLL over all ``A`` micro-batches divided by their token count:
  accumulation gives the same update as one batch of ``A * B``. With Mixture-of-Memories layers
  and ``linear.router_aux_coef > 0`` the objective adds ``coef * L_aux`` per token (``_sums``); the
  metrics' ``loss`` stays the NLL and ``router_aux_loss`` is the token-weighted mean ``L_aux``.
  ``rest`` is the model's non-parameter state (passed, not closed over, so that one compiled step
  serves every run of the same model and optimiser in a process).
  """
  def step(params, rest, opt_state, batch, step):
    aux = bool(_router_aux_coef(nnx.merge(graphdef, params, rest)))  # static: the model's config
    vg = jax.value_and_grad(lambda p, *xyms: _sums(graphdef, rest, p, *xyms, router_aux=aux),
                            has_aux=True)
    xyms = (batch["inputs"], batch["targets"], batch["mask"])
    if "segment_ids" in batch:
      xyms += (batch["segment_ids"],)
    if xyms[0].shape[0] == 1:
      (loss_sum, counts), grads = vg(params, *(a[0] for a in xyms))
    else:
      def body(carry, xym):
        g_acc, l_acc, c_acc = carry
        (l, c), g = vg(params, *xym)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, c_acc, c)), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      z = jnp.zeros((), jnp.float32)
      (grads, loss_sum, counts), _ = jax.lax.scan(body, (zeros, z, (z,) * (4 if aux else 2)),
                                                  xyms)
    count, correct = counts[:2]
    if aux:  # the objective had coef * L_aux in it: report the NLL and L_aux apart
      loss_sum, aux_sum = counts[2:]
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss_sum / denom, "accuracy": correct / denom, "grad_norm": grad_norm,
               "tokens": count, "lr": lr_schedule(step)}
    if aux:
      metrics["router_aux_loss"] = aux_sum / denom
    return params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 2))


def make_eval_step(graphdef):
  """``eval(params, rest, batch) -> (loss_sum, count, correct)`` over a batch (1, B, N)."""
  def ev(params, rest, batch):
    seg = batch["segment_ids"][0] if "segment_ids" in batch else None
    loss_sum, (count, correct) = _sums(graphdef, rest, params, batch["inputs"][0],
                                       batch["targets"][0], batch["mask"][0], seg)
    return loss_sum, count, correct
  return jax.jit(ev)


_STEP_CACHE: dict = {}


def _step_functions(graphdef, optim_cfg, total_steps):
  """``(init_opt_state, lr_schedule, train_step, eval_step)``, built once per model structure and
  optimiser config in a process: a second run (a resume, a test) reuses the compiled programs."""
  key = (graphdef, optim_cfg, total_steps)
  if key not in _STEP_CACHE:
    tx, lr_schedule = optim.build(optim_cfg, total_steps)
    _STEP_CACHE.clear()              # keep at most one model's programs alive
    _STEP_CACHE[key] = (jax.jit(tx.init), lr_schedule, make_train_step(graphdef, tx, lr_schedule),
                        make_eval_step(graphdef))
  return _STEP_CACHE[key]


# ----------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT at the next step boundary, with a checkpoint.

class _StopOnSignal:
  """First SIGTERM/SIGINT: finish the step, save, stop. A second SIGINT interrupts at once."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
        # train.py records signals while JAX loads (``received``): keep one it already got.
        self.received = self.received or getattr(self._previous[sig], "received", None)
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)

  def any_process(self) -> bool:
    """True when any process got a signal (all processes must stop at the same step)."""
    return any_process(self.received is not None)


# ----------------------------------------------------------------------------------------------

def _flops_per_token(model_cfg, seq_len: int) -> float | None:
  fn = getattr(_models(), "flops_per_token", None)
  return float(fn(model_cfg, seq_len)) if fn is not None else None


def _count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


class SetupError(ValueError):
  """A bad config, data file or run directory, found before the first step: ``train.py`` prints
  it as one line, like a config error."""


def run(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
  """Trains as ``cfg`` says, resuming from the run's newest checkpoint that restores (or
  ``checkpoint.step``); returns a summary. Nothing in the run directory changes before the
  mesh, data, model, optimiser state and resume decision are all ready, so a failed start
  (SetupError) or a stop during it leaves the directory as it was.

  SIGTERM and SIGINT stop the run cleanly from the start on: during set-up and the first
  compilations (``stopped_by`` set, ``steps`` = the start step, nothing written), or after the
  current step, with a checkpoint.

  ``on_step(step, record)`` is called after each step's record is written (tests, notebooks).
  """
  # Installed before any compilation: a KeyboardInterrupt raised inside XLA's compiler has ended
  # the process with a segmentation fault (issue 23); a flag is read between the phases instead.
  with _StopOnSignal() as stop:
    try:
      setup_devices(cfg.mesh)
      mesh = build_mesh(cfg.mesh)
      mcfg = model_config(cfg, mesh)
    except ValueError as e:
      raise SetupError(str(e)) from e
    if cfg.optim.warmup_steps >= cfg.steps:
      warnings.warn(f"optim.warmup_steps={cfg.optim.warmup_steps} >= steps={cfg.steps}: the "
                    f"learning rate only warms up (to {cfg.optim.lr:g} at the last step) and "
                    f"never decays; lower optim.warmup_steps for a decaying schedule")
    ckpt = Checkpointer(cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints"),
                        cfg.checkpoint.keep)
    try:
      try:
        overwritten = _prepare_run_dir(cfg, ckpt, {**cfg.to_dict(),
                                                   "resolved_model": mcfg.to_dict()})
      except ValueError as e:
        raise SetupError(str(e)) from e
      return _train(cfg, mesh, mcfg, ckpt, on_step, stop, overwritten)
    finally:
      ckpt.close()


def _prepare_run_dir(cfg: TrainConfig, ckpt: Checkpointer, new: dict) -> list[int]:
  """The resume decision, taken before anything in the run directory changes; returns the steps
  of the checkpoints that ``checkpoint.overwrite=true`` deletes when the run starts.

  overwrite=true: the checkpoints are deleted (whatever ``resume`` says). resume=false on
  checkpoints: an error. resume=true on checkpoints: the saved ``config.yaml`` must agree with
  ``new`` on every field the checkpoints' shapes depend on (``checkpoint.resume_conflicts``).
  """
  steps = ckpt.all_steps()
  if cfg.checkpoint.step is not None and cfg.checkpoint.step not in steps:
    raise ValueError(f"checkpoint.step={cfg.checkpoint.step}: no such checkpoint in "
                     f"{ckpt.directory} (it holds steps {steps})")
  if not steps:
    return []
  if cfg.checkpoint.overwrite:
    return steps
  if not cfg.checkpoint.resume:
    raise ValueError(f"{ckpt.directory} holds checkpoints {steps} and checkpoint.resume=false: "
                     f"set checkpoint.overwrite=true to delete them, checkpoint.resume=true to "
                     f"continue that run, or choose another run_dir / checkpoint.dir")
  path = os.path.join(cfg.run_dir, "config.yaml")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      conflicts = resume_conflicts(yaml.safe_load(f) or {}, new)
    if conflicts:
      raise ValueError(f"cannot resume the checkpoints {steps} in {ckpt.directory}: the config "
                       f"differs from {path} in fields the saved state depends on: "
                       f"{'; '.join(conflicts)}. Undo those changes, or start afresh with "
                       f"checkpoint.overwrite=true (or another run_dir)")
  return []


def _train(cfg: TrainConfig, mesh, mcfg, ckpt: Checkpointer, on_step, stop: _StopOnSignal,
           overwritten: list[int]) -> dict[str, Any]:
  A = cfg.optim.grad_accum
  run_dir, ckpt_dir = cfg.run_dir, ckpt.directory
  is_main = jax.process_index() == 0
  resume = cfg.checkpoint.resume and not cfg.checkpoint.overwrite
  with jax.set_mesh(mesh):
    do_eval = cfg.log.eval_every > 0 and (cfg.data.source in SYNTHETIC_SOURCES
                                          or cfg.data.eval_fraction > 0)
    try:
      train_data = Batches(cfg.data, vocab_size=mcfg.vocab_size, mesh=mesh,
                           layout=mcfg.runtime.layout,
                           micro_batches=A, split="train")
      eval_data = (Batches(cfg.data, vocab_size=mcfg.vocab_size, mesh=mesh,
                           layout=mcfg.runtime.layout,
                           micro_batches=1, split="eval") if do_eval else None)
      run_tokenizer = data_tokenizer_meta(cfg.data, mcfg.vocab_size)
    except ValueError as e:
      raise SetupError(str(e)) from e

    model = _models().create_model(mcfg, mesh=mesh, seed=cfg.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    init_opt, lr_schedule, train_step, eval_step = _step_functions(graphdef, cfg.optim, cfg.steps)
    opt_state = init_opt(params)
    num_params = _count_params(params)

    step, next_example = 0, 0
    found = (ckpt.restore_latest({"params": params, "opt_state": opt_state},
                                 step=cfg.checkpoint.step) if resume else None)
    if found is not None:
      step, restored, meta = found
      params, opt_state = restored["params"], restored["opt_state"]
      next_example = int(meta["data"]["next_example"])
    try:   # the first batch too: an id outside the vocabulary is a set-up error
      batch = train_data.get(next_example) if step < cfg.steps else None
    except ValueError as e:
      raise SetupError(str(e)) from e
    if stop.any_process():
      stopped_by = stop.received or "signal on another process"
      if is_main:
        print(f"stopped by {stopped_by} before the first step; {run_dir} is unchanged", flush=True)
      return {"start_step": step, "steps": step, "losses": [], "evals": [],
              "stopped_by": stopped_by, "run_dir": run_dir}

    # Everything that can fail or be interrupted before training is done: now the run directory
    # changes (overwritten checkpoints go, a resumed branch loses its later ones, config.yaml).
    ckpt.delete(overwritten)
    if found is not None and cfg.checkpoint.step is not None:   # a branch this run abandons
      ckpt.delete([s for s in ckpt.all_steps() if s > step])
    if is_main:
      os.makedirs(run_dir, exist_ok=True)
      with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump({**cfg.to_dict(), "resolved_model": mcfg.to_dict()}, f, sort_keys=False)
      save_run_tokenizer(run_dir, run_tokenizer)
    if found is not None and step > 0:     # at step 0 (an import) no data was read yet
      same = {k: meta["data"].get(k) == v for k, v in (("source", cfg.data.source),
                                                         ("seed", cfg.data.seed))}
      if not all(same.values()):
        warnings.warn(f"resuming {ckpt_dir} at step {step} with different data settings than it "
                      f"was saved with ({meta['data']}): the data order will not continue exactly")

    eval_step = eval_step if do_eval else None
    tokens_per_step = A * cfg.data.batch_size * cfg.data.seq_len
    fpt = _flops_per_token(mcfg, cfg.data.seq_len)
    peak = peak_flops_per_device(cfg.log.peak_tflops_per_device)
    chance = {"mqar": 1.0 / cfg.data.mqar.num_kv_pairs, "parity": 0.5}.get(cfg.data.source)

    log = RunLog(run_dir, total_steps=cfg.steps, start_step=step, tensorboard=cfg.log.tensorboard,
                 progress=cfg.log.progress, every=cfg.log.every)
    log.message(f"{cfg.name}: {num_params / 1e6:.3g}M params, mesh {dict(mesh.shape)} over "
                f"{mesh.size} {jax.devices()[0].platform} devices in "
                f"{jax.process_count()} process(es), data {cfg.data.source} (this process reads "
                f"{len(train_data.local_rows)}/{train_data.examples_per_step()} rows a step), "
                f"{'from scratch' if found is None else 'resuming at step ' + str(step)} -> {ckpt_dir}",
                all_processes=True)

    def meta(s, nxt):
      return {"step": s, "data": {"next_example": nxt, "source": cfg.data.source,
                                  "seed": cfg.data.seed}, "config": cfg.to_dict()}

    def evaluate(s):
      tot = np.zeros(3)
      for e in range(cfg.log.eval_batches):
        tot += np.array([float(v) for v in eval_step(params, rest, eval_data.get(e * eval_data.B))])
      count = max(tot[1], 1.0)
      rec = {"step": s, "loss": float(tot[0] / count)}
      if chance is not None:
        rec["accuracy"], rec["chance"] = float(tot[2] / count), chance
      else:
        rec["perplexity"] = float(math.exp(min(rec["loss"], 700.0)))
      log.write(rec, kind="eval")
      return rec

    summary = {"start_step": step, "resumed": found is not None, "steps": step, "losses": [],
               "evals": [], "stopped_by": None}
    last_saved = step if found is not None else None
    try:
      while step < cfg.steps:
        t0 = time.perf_counter()   # step time: dispatch to metrics (not eval or checkpoints)
        params, opt_state, metrics = train_step(params, rest, opt_state, batch, np.int32(step))
        step += 1
        next_example += train_data.examples_per_step()
        # Prepare the next batch on the host while the device works on this step.
        batch = train_data.get(next_example) if step < cfg.steps else None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        lr = m["lr"]
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": m["loss"], "lr": lr, "grad_norm": m["grad_norm"],
               "step_time": dt, "tok_s": tokens_per_step / dt}
        if chance is not None:
          rec["accuracy"] = m["accuracy"]
        if "router_aux_loss" in m:   # Mixture-of-Memories' load balancing (linear.router_aux_coef)
          rec["router_aux_loss"] = m["router_aux_loss"]
        if fpt is not None:
          rec["tflops_s"] = fpt * tokens_per_step / dt / 1e12
          if peak is not None:
            rec["mfu"] = fpt * tokens_per_step / dt / (peak * mesh.size)
        log.write(rec)
        summary["losses"].append(m["loss"])
        summary["steps"] = step
        if not math.isfinite(m["loss"]):
          raise FloatingPointError(
              f"loss is {m['loss']} at step {step} (grad norm {m['grad_norm']:.4g}, "
              f"lr {lr:.4g}); "
              f"stopping. The last checkpoint is step {last_saved} in {ckpt_dir}. Try a lower "
              f"optim.lr, a longer optim.warmup_steps or model.runtime.compute_dtype=float32.")
        if on_step is not None:
          on_step(step, rec)
        if eval_step is not None and step % cfg.log.eval_every == 0:
          summary["evals"].append(evaluate(step))
        stopping = stop.any_process()
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping \
            or step == cfg.steps:
          ckpt.save(step, {"params": params, "opt_state": opt_state}, meta(step, next_example))
          last_saved = step
        if stopping:
          summary["stopped_by"] = stop.received or "signal on another process"
          again = ("run it again without checkpoint.overwrite=true to resume"
                   if cfg.checkpoint.overwrite else "run the same command again to resume")
          log.message(f"stopped by {summary['stopped_by']} at step {step}; checkpoint saved in "
                      f"{ckpt_dir}; {again}")
          break
      if eval_step is not None and step == cfg.steps and (not summary["evals"] or
                                                           summary["evals"][-1]["step"] != step):
        summary["evals"].append(evaluate(step))
    finally:
      ckpt.close()                   # before summary.json, which says the run is done
      log.close()
  summary.update(run_dir=run_dir, num_params=num_params, mesh=dict(mesh.shape),
                 model=dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) else None)
  if is_main:
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in summary.items() if k != "losses"}, f, indent=1, default=str)
  return summary
