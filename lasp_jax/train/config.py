"""The training configuration: typed, frozen dataclasses from YAML plus command-line overrides.

One ``TrainConfig`` holds everything a run needs, in the order data flows through a run:
``mesh -> data -> model -> optim -> checkpoint / log``. The model section names a preset of
``lasp_jax.models.get_config`` plus overrides of any ``ModelConfig`` field.

Overrides are dotted keys: ``optim.lr=1e-3``, ``--data.seq_len 512``, ``model.num_layers=4``.
Unknown keys and values of the wrong type are ValueErrors whose message names the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "tiny.yaml")


@dataclass(frozen=True)
class MeshConfig:
  """Mesh axes over all devices of all hosts. A size of -1 takes the devices left over."""
  data: int = 1
  fsdp: int = 1                      # the axis is only created when > 1 (or -1)
  sp: int = -1
  platform: Literal["auto", "cpu", "gpu", "tpu"] = "auto"
  num_devices: int | None = None     # use only the first N devices (one process); None: all
  num_cpu_devices: int = 8           # simulated devices per process when the platform is cpu
  distributed: Literal["auto", "on", "off"] = "auto"
  coordinator_address: str | None = None   # "host:port"; else from the environment
  num_processes: int | None = None
  process_id: int | None = None
  init_timeout_s: int = 300


@dataclass(frozen=True)
class MqarConfig:
  """Multi-query associative recall: ``k1 v1 .. kn vn`` then queries ``k v`` (keys drawn again)."""
  num_kv_pairs: int = 8
  vocab_size: int | None = None      # MQAR uses token ids below this (None: the model's vocab)


@dataclass(frozen=True)
class ParityConfig:
  """Running parity (state tracking): random bits, the target at each position the XOR of the bits
  so far. Bit ``b`` is token ``first_token + b``, and so is the parity ``p`` of a target."""
  first_token: int = 0               # tokens first_token, first_token + 1: below the model's vocab
  skip: int = 0                      # the loss skips the first ``skip`` positions


# The synthetic sources: no files, no documents; eval accuracy against a known chance level.
SYNTHETIC_SOURCES = ("mqar", "parity")


@dataclass(frozen=True)
class DataConfig:
  source: Literal["mqar", "parity", "text", "tokens"] = "mqar"
  path: str | None = None            # text: a UTF-8 file; tokens: a flat binary of token ids
  # tokens: the id type. None: from the sidecar ``<path>.json`` (``train.py prepare`` writes one);
  # there is no default, since a uint32 file read as uint16 trains on garbage without an error.
  token_dtype: Literal["uint16", "uint32"] | None = None
  seq_len: int = 256
  batch_size: int = 8                # global sequences per micro-batch
  seed: int = 0
  eval_fraction: float = 0.05        # text / tokens: the tail held out for eval
  # text / tokens: the id that ends each document of a packed stream. With one, every example has
  # segment_ids (the documents of its window) and the target after each EOS is masked out of the
  # loss. text: a byte (the vocabulary is 256), e.g. 10 makes each line a document. tokens: None
  # takes the sidecar's eos_id (``train.py prepare --split-blank-lines`` writes 256, vocab 257).
  # None (and no sidecar eos_id): one unbroken stream, no segment_ids. mqar, parity: must be None.
  eos_id: int | None = None
  mqar: MqarConfig = field(default_factory=MqarConfig)
  parity: ParityConfig = field(default_factory=ParityConfig)


@dataclass(frozen=True)
class OptimConfig:
  """AdamW, linear warmup then cosine decay to ``lr * end_lr_ratio``, global-norm clipping."""
  lr: float = 3e-3
  end_lr_ratio: float = 0.1
  warmup_steps: int = 50
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0             # 0 disables clipping
  grad_accum: int = 1                # micro-batches per optimiser step


@dataclass(frozen=True)
class CheckpointConfig:
  every: int = 200                   # steps; 0 saves only at the end and on SIGTERM / SIGINT
  keep: int = 3
  resume: bool = True                # resume from the latest checkpoint in ``dir`` if there is one
  # overwrite=true deletes the directory's checkpoints and starts afresh, whatever ``resume``
  # says (so that a new run never leaves an old run's weights behind); without it, resume=false
  # on a directory holding checkpoints is an error.
  overwrite: bool = False
  step: int | None = None            # resume from this step (later ones are deleted); None: latest
  dir: str | None = None             # default: <run_dir>/checkpoints


@dataclass(frozen=True)
class LogConfig:
  every: int = 10                    # progress bar and TensorBoard (JSONL gets every step)
  eval_every: int = 100
  eval_batches: int = 4
  progress: bool = True
  tensorboard: bool = True
  peak_tflops_per_device: float | None = None   # for MFU; None: from the device kind if known


@dataclass(frozen=True)
class ModelSection:
  """A preset of ``lasp_jax.models.get_config`` plus overrides of ``ModelConfig`` fields."""
  preset: str = "tiny_hybrid"
  overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
  name: str = "tiny"
  run_dir: str = "runs/tiny"
  steps: int = 600
  seed: int = 0                      # model initialisation
  model: ModelSection = field(default_factory=ModelSection)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  data: DataConfig = field(default_factory=DataConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
  log: LogConfig = field(default_factory=LogConfig)

  def __post_init__(self):
    validate(self)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["model"] = {"preset": self.model.preset}
    for key, val in self.model.overrides.items():   # dotted keys written as nested groups
      head, _, tail = key.partition(".")
      if tail:
        d["model"].setdefault(head, {})[tail] = val
      else:
        d["model"][key] = val
    return d


# ----------------------------------------------------------------------------------------------
# Validation of values that types alone do not catch.

def _positive(name, v, allow_zero=False, allow_minus_one=False):
  if allow_minus_one and v == -1:
    return
  # ``nan < 0`` is False: without the finiteness test a NaN would pass every bound.
  if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
    raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def validate(c: TrainConfig) -> None:
  _positive("steps", c.steps)
  for ax in ("data", "fsdp", "sp"):
    _positive(f"mesh.{ax}", getattr(c.mesh, ax), allow_minus_one=True)
  if [c.mesh.data, c.mesh.fsdp, c.mesh.sp].count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={c.mesh.data} fsdp={c.mesh.fsdp} "
                     f"sp={c.mesh.sp}")
  _positive("mesh.num_cpu_devices", c.mesh.num_cpu_devices)
  if c.mesh.num_devices is not None:
    _positive("mesh.num_devices", c.mesh.num_devices)
  _positive("data.seq_len", c.data.seq_len)
  _positive("data.batch_size", c.data.batch_size)
  if c.data.source in ("text", "tokens") and not c.data.path:
    raise ValueError(f"data.source={c.data.source!r} needs data.path")
  if not 0.0 <= c.data.eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction must be in [0, 1), got {c.data.eval_fraction!r}")
  if c.data.eos_id is not None:
    if c.data.source in SYNTHETIC_SOURCES:
      raise ValueError(f"data.eos_id={c.data.eos_id}: the {c.data.source} source has no documents; "
                       f"eos_id is for data.source=text or tokens")
    _positive("data.eos_id", c.data.eos_id, allow_zero=True)
    if c.data.source == "text" and c.data.eos_id >= 256:
      raise ValueError(f"data.eos_id={c.data.eos_id} is not a byte: the text source's vocabulary "
                       f"is 256 (ids 0 .. 255)")
  _positive("data.mqar.num_kv_pairs", c.data.mqar.num_kv_pairs)
  if c.data.mqar.vocab_size is not None:
    _positive("data.mqar.vocab_size", c.data.mqar.vocab_size)
  _positive("data.parity.first_token", c.data.parity.first_token, allow_zero=True)
  _positive("data.parity.skip", c.data.parity.skip, allow_zero=True)
  if c.data.source == "parity" and c.data.parity.skip >= c.data.seq_len:
    raise ValueError(f"data.parity.skip={c.data.parity.skip} leaves no position of "
                     f"data.seq_len={c.data.seq_len} in the loss")
  _positive("optim.lr", c.optim.lr)
  _positive("optim.eps", c.optim.eps)
  _positive("optim.warmup_steps", c.optim.warmup_steps, allow_zero=True)
  _positive("optim.grad_accum", c.optim.grad_accum)
  _positive("optim.clip_norm", c.optim.clip_norm, allow_zero=True)
  _positive("optim.weight_decay", c.optim.weight_decay, allow_zero=True)
  if not 0.0 <= c.optim.end_lr_ratio <= 1.0:
    raise ValueError(f"optim.end_lr_ratio must be in [0, 1], got {c.optim.end_lr_ratio!r}")
  for b in ("b1", "b2"):
    if not 0.0 <= getattr(c.optim, b) < 1.0:
      raise ValueError(f"optim.{b} must be in [0, 1), got {getattr(c.optim, b)!r}")
  _positive("checkpoint.every", c.checkpoint.every, allow_zero=True)
  _positive("checkpoint.keep", c.checkpoint.keep)
  if c.checkpoint.step is not None:
    _positive("checkpoint.step", c.checkpoint.step)
  if c.checkpoint.step is not None and (not c.checkpoint.resume or c.checkpoint.overwrite):
    raise ValueError(f"checkpoint.step={c.checkpoint.step} resumes from that step: it needs "
                     f"checkpoint.resume=true and no checkpoint.overwrite=true")
  _positive("log.every", c.log.every)
  _positive("log.eval_every", c.log.eval_every, allow_zero=True)
  _positive("log.eval_batches", c.log.eval_batches)
  if c.log.peak_tflops_per_device is not None:
    _positive("log.peak_tflops_per_device", c.log.peak_tflops_per_device)


# ----------------------------------------------------------------------------------------------
# Typed coercion: YAML values and command-line strings -> the field's declared type.

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value: Any, tp: Any) -> Any:
  """``value`` as type ``tp``; ValueError naming ``key`` and ``value`` when it cannot be."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  bad = ValueError(f"{key}: cannot use {value!r} as {_type_name(tp)}")
  if tp is Any:
    return _parse_scalar(value) if isinstance(value, str) else value
  if origin in (typing.Union, types.UnionType):
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
      if type(None) in args:
        return None
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(key, value, a)
      except ValueError:
        pass
    raise bad
  if origin is Literal:
    for a in args:
      if value == a or (isinstance(value, str) and str(a) == value):
        return a
    raise ValueError(f"{key}: {value!r} is not one of {list(args)}")
  if origin in (tuple, list, Sequence) or tp in (tuple, list):
    if isinstance(value, str):
      s = value.strip()
      parsed = yaml.safe_load(s) if s.startswith("[") else [p for p in s.split(",") if p.strip()]
      value = parsed if parsed is not None else []
    if not isinstance(value, (list, tuple)):
      raise bad
    elem = args[0] if args else Any
    return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
      return value.lower() in _TRUE
    raise bad
  if tp is int:
    if isinstance(value, bool):
      raise bad
    if isinstance(value, int):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, str):
      try:
        f = float(value)
      except ValueError:
        raise bad from None
      if f.is_integer():
        return int(f)
    raise bad
  if tp is float:
    if isinstance(value, bool):
      raise bad
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        raise bad from None
    raise bad
  if tp is str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
      return str(value)
    raise bad
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, Mapping):
      raise bad
    return value
  return value


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_scalar(s: str) -> Any:
  """A command-line string with no declared type: YAML scalars, plus floats like ``1e-3``."""
  try:
    return float(s) if ("e" in s.lower() and not s.isalpha()) else yaml.safe_load(s)
  except (ValueError, yaml.YAMLError):
    return s


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _build(cls, d: Mapping[str, Any], prefix: str):
  """Dataclass ``cls`` from a nested mapping; unknown keys are errors naming them."""
  if not isinstance(d, Mapping):
    raise ValueError(f"{prefix or 'config'}: expected a mapping, got {d!r}")
  hints = _hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in d if k not in names]
  if unknown:
    where = f"{prefix}." if prefix else ""
    raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; "
                     f"valid keys{' under ' + prefix if prefix else ''}: {names}")
  kwargs = {}
  for k, v in d.items():
    key = f"{prefix}.{k}" if prefix else k
    tp = hints[k]
    if dataclasses.is_dataclass(tp):
      kwargs[k] = _build(tp, v or {}, key)
    else:
      kwargs[k] = _coerce(key, v, tp)
  return cls(**kwargs)


def _model_config_class():
  """``ModelConfig``, or None while the models package is unavailable."""
  try:
    from lasp_jax.models import ModelConfig  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return ModelConfig


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"linear": {"variant": x}}`` -> ``{"linear.variant": x}`` (only the model's groups nest)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and not prefix:
      out.update(_flatten(v, f"{k}."))
    else:
      out[prefix + k] = v
  return out


def _model_section(d: Mapping[str, Any] | None) -> ModelSection:
  d = dict(d or {})
  preset = d.pop("preset", ModelSection.preset)
  overrides = d.pop("overrides", None) or {}
  if not isinstance(overrides, Mapping):
    raise ValueError(f"model.overrides: expected a mapping, got {overrides!r}")
  # `model: {preset: tiny, d_model: 64}`, `model: {linear: {variant: gla}}`, dotted keys and the
  # flat names of earlier versions (`linear_variant`) all work; kept under their dotted names.
  overrides = _flatten({**overrides, **d})
  model_config = _model_config_class()
  if model_config is not None:
    hints, canonical = model_config.field_types(), {}
    for k, v in overrides.items():
      try:
        key = model_config.canonical_key(k)
      except ValueError:
        raise ValueError(f"unknown config key(s) {['model.' + k]}; valid model keys: "
                         f"['preset', {', '.join(repr(k) for k in hints)}]") from None
      canonical[key] = _coerce(f"model.{key}", v, hints[key])
    overrides = canonical
    from lasp_jax import models  # pylint: disable=import-outside-toplevel
    try:                              # the model's own checks, now rather than at run time
      base = models.get_config(str(preset))
      models.ModelConfig.from_dict({**base.flat_dict(), **overrides})
    except (ValueError, TypeError) as e:
      raise ValueError(f"model (preset {preset!r}): {e}") from None
  return ModelSection(preset=str(preset), overrides=overrides)


def from_dict(d: Mapping[str, Any]) -> TrainConfig:
  """A ``TrainConfig`` from a nested mapping (a YAML file's contents); unknown keys rejected."""
  d = dict(d or {})
  d.pop("resolved_model", None)     # a run's config.yaml: derived from the rest, so it loads too
  model = _model_section(d.pop("model", None))
  cfg = _build(TrainConfig, d, "")
  return dataclasses.replace(cfg, model=model)


# ----------------------------------------------------------------------------------------------
# YAML + command line.

def _set_dotted(d: dict, key: str, value: Any) -> None:
  parts = key.split(".")
  if any(not p for p in parts):
    raise ValueError(f"bad override key {key!r}")
  node = d
  for p in parts[:-1]:
    nxt = node.get(p)
    if nxt is None:
      nxt = node[p] = {}
    elif not isinstance(nxt, dict):
      raise ValueError(f"override {key!r}: {p!r} is a value, not a section")
    node = nxt
  node[parts[-1]] = value


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """``["a.b=1", "--c.d", "2", "--e=3"]`` -> ``[("a.b", "1"), ("c.d", "2"), ("e", "3")]``."""
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    if a.startswith("--"):
      a = a[2:]
      if "=" in a:
        k, v = a.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise ValueError(f"--{a} needs a value")
        k, v = a, argv[i + 1]
        i += 1
    elif "=" in a:
      k, v = a.split("=", 1)
    else:
      raise ValueError(f"cannot parse argument {a!r}: use key=value or --key value")
    out.append((k.replace("-", "_"), v))
    i += 1
  return out


def load_config(path: str | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
                ) -> TrainConfig:
  """Reads YAML ``path`` (the tiny default when None), applies overrides, validates.

  ``overrides``: command-line strings (``key=value`` / ``--key value``) or a mapping of dotted
  keys to values.
  """
  path = path or DEFAULT_CONFIG
  if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path)):
    path = os.path.join(CONFIG_DIR, path)
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} not found")
  with open(path, encoding="utf-8") as f:
    d = yaml.safe_load(f) or {}
  if not isinstance(d, dict):
    raise ValueError(f"config file {path!r} must hold a mapping, got {type(d).__name__}")
  pairs = overrides.items() if isinstance(overrides, Mapping) else parse_overrides(overrides)
  for k, v in pairs:
    _set_dotted(d, k, v)
  return from_dict(d)


def candidate_paths(path: str) -> list[str]:
  """Where a data path is looked for, in order: as given (from the working directory), then
  relative to the repository root; absolute paths only as given."""
  if os.path.isabs(path):
    return [path]
  return [os.path.abspath(path), os.path.join(REPO_ROOT, path)]


def resolve_path(path: str) -> str:
  """A data path as given if it exists, else relative to the repository root."""
  if os.path.isabs(path) or os.path.exists(path):
    return path
  alt = os.path.join(REPO_ROOT, path)
  return alt if os.path.exists(alt) else path
