"""Model configuration: one frozen, validated dataclass grouped by what it configures, and the named
presets (design §7).

``ModelConfig`` holds the architecture (sizes, layer types, embeddings, parameter dtype) and four
groups: ``norm`` (the RMSNorms), ``linear`` (the linear-attention mixer), ``softmax`` (the softmax
mixer) and ``runtime`` (how the model runs: compute dtype, chunking, remat, mesh axes, layout,
exchange, kernel backend; changing a runtime field never changes the parameters, so a run may
resume under a new one). Keys are written ``linear.variant``, ``runtime.layout``...; the flat names
of earlier versions (``linear_variant``, ``layout``, ...: ``FLAT_ALIASES``) are still accepted by
``from_dict``, ``replace`` and ``get_config``, so old YAML files, overrides and saved runs work.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from lasp_jax.kernels import dispatch
from lasp_jax.models import variants
# The diagonal-decay family (design §7), then the delta rule (design §11), one entry each.
from lasp_jax.models.variants import DELTA_VARIANTS, DIAGONAL_VARIANTS, LINEAR_VARIANTS  # noqa: F401

FEATURE_MAPS = ("identity", "swish", "relu", "elu_plus_one")
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("contiguous", "zigzag")
# How the linear layers' segment summaries meet under SP (lasp_jax.sequence_parallel.exchange).
EXCHANGES = ("allgather", "scan", "auto")
# Lowering of the linear layers' kernels (``lasp_jax.kernels.chunk_linear_attention``): "auto" is
# the kernels' own per-device choice; the others force one path (benchmarks, A/B runs).
KERNEL_BACKENDS = ("auto",) + dispatch.BACKENDS
LAYER_KINDS = {"L": "linear", "N": "softmax"}


def _positive_int(where, val, none_ok=False):
  if none_ok and val is None:
    return
  if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
    raise ValueError(f"{where} must be a positive int{' or None' if none_ok else ''}, "
                     f"got {val!r}")


def _positive_number(where, val):
  if not isinstance(val, (int, float)) or isinstance(val, bool) or not val > 0:
    raise ValueError(f"{where} must be a positive number, got {val!r}")


def _bool(where, val):
  if not isinstance(val, bool):
    raise ValueError(f"{where} must be a bool, got {val!r}")


def _one_of(where, val, allowed):
  if val not in allowed:
    raise ValueError(f"{where} must be one of {allowed}, got {val!r}")


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """The RMSNorms (before each mixer and MLP, the final one, the linear layers' output norm).

  ``zero_centered``: the weight is stored as an offset from one, ``x_hat * (1 + w)`` with ``w``
  initialised to zero (Qwen3.5); else ``x_hat * w`` with ``w`` initialised to one.
  """
  eps: float = 1e-5
  zero_centered: bool = False

  def __post_init__(self):
    _positive_number("norm.eps", self.eps)
    _bool("norm.zero_centered", self.zero_centered)


@dataclasses.dataclass(frozen=True)
class LinearMixerConfig:
  """The linear-attention layers (design §2, §7, §11, §12).

  ``variant``: an entry of ``models/variants.py``. ``feature_map`` applies to every variant but
  ``based``/``rebased``, whose maps are part of their definition on a ``feature_dim``-wide
  projection, and the delta-rule variants (SiLU then L2 norm on q and k). ``gate_rank`` /
  ``gate_normalizer``: the rank of GLA's (and KDA's) low-rank gate and the divisor of GLA's and
  simple GLA's logsigmoid. ``allow_neg_eigval`` (delta rule only): ``beta`` in ``[0, 2]`` instead of
  ``[0, 1]``, so the transition ``I - beta k^T k`` can have the eigenvalue ``-1`` that state
  tracking needs (design §11). ``short_conv``: kernel size of the depthwise causal conv + SiLU on
  q, k and v after their projections (design §12; 0: none).

  Heads (as Qwen3.5's and fla's Gated DeltaNet): q and k have the model's ``num_heads`` heads of
  ``key_dim``; v, the state and the output have ``num_value_heads`` heads of ``value_dim``
  (None: ``num_heads`` and the model's head size). With more value heads than key heads, value
  head ``j`` reads q and k of head ``j // (num_value_heads // num_heads)`` (a group of value heads
  shares them; the op runs on the value heads with q and k repeated), and the gates and ``beta``
  are per value head. Based/ReBased project q and k to ``feature_dim`` instead of ``key_dim``.

  Mixture-of-Memories (``lasp_jax.models.mom``; Du et al. 2025): ``memories`` M >= 2 turns each
  linear layer into M memories of recurrence ``variant``, a router sending each token to its
  ``memory_top_k`` of them (renormalised softmax weights), plus with ``shared_memory`` one memory
  that every token writes and reads with weight 1 (0: a plain linear layer). ``router_aux_coef``:
  the weight of the router's load-balancing loss in the training loss (0: none).
  """
  variant: str = "basic"
  feature_map: str = "swish"
  feature_dim: int = 16
  gate_rank: int = 16
  gate_normalizer: float = 16.0
  allow_neg_eigval: bool = False
  short_conv: int = 0
  num_value_heads: int | None = None
  key_dim: int | None = None
  value_dim: int | None = None
  memories: int = 0
  memory_top_k: int = 2
  shared_memory: bool = True
  router_aux_coef: float = 0.0

  def __post_init__(self):
    variants.get(self.variant)   # ValueError naming the variants
    _check_memories(self)
    for name in ("num_value_heads", "key_dim", "value_dim"):
      _positive_int(f"linear.{name}", getattr(self, name), none_ok=True)
    if self.key_dim is not None and variants.get(self.variant).normalised:
      raise ValueError(f"linear.key_dim={self.key_dim}: {self.variant!r} projects q and k to "
                       f"linear.feature_dim instead; leave linear.key_dim unset")
    _one_of("linear.feature_map", self.feature_map, FEATURE_MAPS)
    _positive_int("linear.feature_dim", self.feature_dim)
    _positive_int("linear.gate_rank", self.gate_rank)
    _positive_number("linear.gate_normalizer", self.gate_normalizer)
    _bool("linear.allow_neg_eigval", self.allow_neg_eigval)
    if self.allow_neg_eigval and not variants.get(self.variant).delta:
      raise ValueError(f"linear.allow_neg_eigval=True widens the delta rule's beta to [0, 2]: it "
                       f"needs a linear.variant in {DELTA_VARIANTS}, got {self.variant!r}")
    if not isinstance(self.short_conv, int) or isinstance(self.short_conv, bool) or (
        self.short_conv < 0):
      raise ValueError(f"linear.short_conv must be a kernel size >= 0 (0: no conv), "
                       f"got {self.short_conv!r}")


def _check_memories(lin) -> None:
  """The Mixture-of-Memories keys of ``LinearMixerConfig`` (one-line ValueErrors naming them)."""
  m = lin.memories
  if not isinstance(m, int) or isinstance(m, bool) or m < 0 or m == 1:
    raise ValueError(f"linear.memories must be 0 (a plain linear layer) or an int >= 2, got {m!r}")
  _positive_int("linear.memory_top_k", lin.memory_top_k)
  _bool("linear.shared_memory", lin.shared_memory)
  coef = lin.router_aux_coef
  if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not coef >= 0:
    raise ValueError(f"linear.router_aux_coef must be a number >= 0, got {coef!r}")
  if m and lin.memory_top_k > m:
    raise ValueError(f"linear.memory_top_k={lin.memory_top_k} must be <= linear.memories={m}")
  if m and variants.get(lin.variant).normalised:
    raise ValueError(f"linear.memories={m} needs an unnormalised linear.variant: "
                     f"{lin.variant!r} divides by its own normaliser")


@dataclasses.dataclass(frozen=True)
class SoftmaxMixerConfig:
  """The softmax-attention layers (LASP-2H under SP, design §9).

  ``num_heads`` / ``head_dim``: the query heads and their size (None: the model's). ``num_kv_heads``:
  grouped-query attention (None: as many as the query heads). ``rope_base``: RoPE's theta;
  ``rotary_fraction``: the leading fraction of each head's dims that rotate (Qwen3.5's
  ``partial_rotary_factor``; the rest pass through). ``qk_norm``: an RMSNorm over each head of q
  and k before RoPE (zero-centred with ``norm.zero_centered``). ``output_gate``: the attention's
  output times ``sigmoid(x W_gate)`` per head and channel, before the output projection
  (Qwen3.5's gated attention).
  """
  num_heads: int | None = None
  head_dim: int | None = None
  num_kv_heads: int | None = None
  rope_base: float = 500000.0
  rotary_fraction: float = 1.0
  qk_norm: bool = False
  output_gate: bool = False

  def __post_init__(self):
    for name in ("num_heads", "head_dim", "num_kv_heads"):
      _positive_int(f"softmax.{name}", getattr(self, name), none_ok=True)
    _positive_number("softmax.rope_base", self.rope_base)
    if (not isinstance(self.rotary_fraction, (int, float)) or isinstance(self.rotary_fraction, bool)
        or not 0 < self.rotary_fraction <= 1):
      raise ValueError(f"softmax.rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
    _bool("softmax.qk_norm", self.qk_norm)
    _bool("softmax.output_gate", self.output_gate)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How the model runs; none of it changes the parameters or the maths (beyond rounding).

  ``compute_dtype``: activations and kernel inputs. ``chunk_size``: the kernels' chunk (must divide
  each device's sequence). ``remat``: recompute each layer in the backward pass. Sharding: the
  sequence over mesh axis ``seq_axis``, the batch over ``batch_axes``, weights over ``fsdp_axis`` /
  ``tensor_axis`` where the mesh has them. ``layout``: how the sequence is laid over ``seq_axis``
  (``"zigzag"`` balances causal softmax work). ``exchange``: how LASP-2 combines the linear layers'
  segment summaries, ``"allgather"`` (one step, W summaries held), ``"scan"`` (log-depth
  ppermutes, O(1) held) or ``"auto"`` (``exchange.choose_exchange``). ``kernel_backend``: the
  lowering of the linear layers' kernels, ``"auto"`` (the kernels' choice for the device),
  ``"xla"``, ``"gpu"`` or ``"tpu"`` (Pallas); the softmax layers' flash attention has one XLA path.
  """
  compute_dtype: str = "float32"
  chunk_size: int = 64
  remat: bool = False
  seq_axis: str = "sp"
  batch_axes: tuple[str, ...] = ("data",)
  fsdp_axis: str | None = "fsdp"
  tensor_axis: str | None = "tensor"
  layout: str = "contiguous"
  exchange: str = "allgather"
  kernel_backend: str = "auto"

  def __post_init__(self):
    if isinstance(self.batch_axes, (list, str)):
      object.__setattr__(self, "batch_axes",
                         (self.batch_axes,) if isinstance(self.batch_axes, str)
                         else tuple(self.batch_axes))
    _one_of("runtime.compute_dtype", self.compute_dtype, DTYPES)
    _positive_int("runtime.chunk_size", self.chunk_size)
    _bool("runtime.remat", self.remat)
    _one_of("runtime.layout", self.layout, LAYOUTS)
    _one_of("runtime.exchange", self.exchange, EXCHANGES)
    _one_of("runtime.kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
    if not isinstance(self.seq_axis, str) or not self.seq_axis:
      raise ValueError(f"runtime.seq_axis must be a mesh axis name, got {self.seq_axis!r}")
    if not all(isinstance(a, str) for a in self.batch_axes):
      raise ValueError(f"runtime.batch_axes must be mesh axis names, got {self.batch_axes!r}")
    if self.seq_axis in self.batch_axes:
      raise ValueError(f"runtime.seq_axis {self.seq_axis!r} cannot also be a batch axis "
                       f"{self.batch_axes!r}")
    for name in ("fsdp_axis", "tensor_axis"):
      val = getattr(self, name)
      if val is not None and (not isinstance(val, str) or not val):
        raise ValueError(f"runtime.{name} must be a mesh axis name or None, got {val!r}")


GROUPS = {"norm": NormConfig, "linear": LinearMixerConfig, "softmax": SoftmaxMixerConfig,
          "runtime": RuntimeConfig}

# The flat keys of earlier versions and where they live now.
FLAT_ALIASES = {
    "norm_eps": "norm.eps",
    "linear_variant": "linear.variant", "feature_map": "linear.feature_map",
    "feature_dim": "linear.feature_dim", "gate_rank": "linear.gate_rank",
    "gate_normalizer": "linear.gate_normalizer", "allow_neg_eigval": "linear.allow_neg_eigval",
    "short_conv": "linear.short_conv",
    "num_kv_heads": "softmax.num_kv_heads", "rope_base": "softmax.rope_base",
    **{f"{name}": f"runtime.{name}" for name in (
        "compute_dtype", "chunk_size", "remat", "seq_axis", "batch_axes", "fsdp_axis",
        "tensor_axis", "layout", "exchange", "kernel_backend")},
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Linear-Llama3 decoder or one of its hybrids.

  ``layer_pattern`` is repeated (and cut) to ``num_layers``: ``"L"`` is a linear-attention layer,
  ``"N"`` a normal (softmax) one; ``"LLLN"`` is the paper's 1/4 hybrid. ``layer_types``, when
  given, lists every layer's kind explicitly (``"linear"`` / ``"softmax"``, ``num_layers`` of
  them) and takes the place of the pattern. Linear layers have ``num_heads`` heads for q and k
  (``linear.num_value_heads`` for v); softmax layers ``softmax.num_heads`` (default
  ``num_heads``) query heads and ``softmax.num_kv_heads`` key/value heads. ``head_dim`` None
  means ``d_model // num_heads``; the groups may set their own.
  ``param_dtype``: the stored weights; ``init_std``: the normal init of the projections (it may
  change on resume: it only matters at step 0). The groups: ``NormConfig``,
  ``LinearMixerConfig``, ``SoftmaxMixerConfig``, ``RuntimeConfig`` (module docstring).
  """

  vocab_size: int = 256
  d_model: int = 32
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int | None = None
  ffn_dim: int = 64
  layer_pattern: str = "L"
  layer_types: tuple[str, ...] | None = None
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  init_std: float = 0.02
  norm: NormConfig = dataclasses.field(default_factory=NormConfig)
  linear: LinearMixerConfig = dataclasses.field(default_factory=LinearMixerConfig)
  softmax: SoftmaxMixerConfig = dataclasses.field(default_factory=SoftmaxMixerConfig)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

  @property
  def variant(self) -> variants.LinearVariant:
    """The linear layers' entry of ``models/variants.py``."""
    return variants.get(self.linear.variant)

  def __post_init__(self):
    for group, cls in GROUPS.items():
      val = getattr(self, group)
      if isinstance(val, Mapping):
        object.__setattr__(self, group, _group(group, val))
      elif not isinstance(val, cls):
        raise TypeError(f"{group} must be a {cls.__name__} or a mapping, got {val!r}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim"):
      _positive_int(name, getattr(self, name))
    _positive_int("head_dim", self.head_dim, none_ok=True)
    _bool("tie_embeddings", self.tie_embeddings)
    _one_of("param_dtype", self.param_dtype, DTYPES)
    _positive_number("init_std", self.init_std)
    if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
      raise ValueError(f"layer_pattern must be a non-empty string of 'L'/'N', "
                       f"got {self.layer_pattern!r}")
    bad = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
    if bad:
      raise ValueError(f"layer_pattern {self.layer_pattern!r} has letters {bad}; "
                       f"only 'L' (linear) and 'N' (softmax) are allowed")
    if self.layer_types is not None:
      if isinstance(self.layer_types, (list, str)):
        object.__setattr__(self, "layer_types", tuple(
            [self.layer_types] if isinstance(self.layer_types, str) else self.layer_types))
      kinds = tuple(LAYER_KINDS.values())
      bad = [t for t in self.layer_types if t not in kinds]
      if bad:
        raise ValueError(f"layer_types may hold only {kinds}, got {bad}")
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                         f"num_layers={self.num_layers}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide d_model={self.d_model} "
                       f"(set head_dim explicitly or change one of them)")
    if self.softmax_heads % self.kv_heads:
      raise ValueError(f"softmax.num_kv_heads={self.softmax.num_kv_heads} does not divide "
                       f"the softmax layers' {self.softmax_heads} query heads")
    if self.linear_value_heads % self.num_heads:
      raise ValueError(f"linear.num_value_heads={self.linear.num_value_heads} must be a multiple "
                       f"of num_heads={self.num_heads} (groups of value heads share q and k)")
    if self.softmax.rotary_fraction < 1 and int(self.softmax_head_dim
                                                 * self.softmax.rotary_fraction) % 2:
      raise ValueError(f"softmax.rotary_fraction={self.softmax.rotary_fraction} of head_dim "
                       f"{self.softmax_head_dim} is not an even number of rotary dims")

  # Derived sizes.
  @property
  def dim_per_head(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def softmax_heads(self) -> int:
    """Query heads of the softmax layers."""
    return self.softmax.num_heads or self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads of the softmax layers."""
    return self.softmax.num_kv_heads or self.softmax_heads

  @property
  def softmax_head_dim(self) -> int:
    return self.softmax.head_dim or self.dim_per_head

  @property
  def linear_value_heads(self) -> int:
    """Heads of v, the state and the output of the linear layers (>= ``num_heads``)."""
    return self.linear.num_value_heads or self.num_heads

  @property
  def linear_key_dim(self) -> int:
    """Per-head width of the linear layers' q and k projections (Based/ReBased: the feature
    map's input, ``linear.feature_dim``)."""
    if self.variant.normalised:
      return self.linear.feature_dim
    return self.linear.key_dim or self.dim_per_head

  @property
  def linear_value_dim(self) -> int:
    return self.linear.value_dim or self.dim_per_head

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """``"linear"`` or ``"softmax"`` for each layer: ``layer_types``, or the pattern repeated
    to the depth."""
    if self.layer_types is not None:
      return tuple(self.layer_types)
    pat = self.layer_pattern
    return tuple(LAYER_KINDS[pat[i % len(pat)]] for i in range(self.num_layers))

  # Keys, dictionaries and changes.
  def replace(self, **changes) -> "ModelConfig":
    """A copy with fields changed: top-level names, group keys as ``linear__variant`` or through
    a mapping (``linear={"variant": "gla"}``), or the flat names of ``FLAT_ALIASES``."""
    d = self.to_dict()
    for key, val in changes.items():
      _set(d, key.replace("__", "."), val)
    return type(self).from_dict(d)

  def to_dict(self) -> dict[str, Any]:
    """Nested: top-level fields, then one mapping per group (lists where the config has tuples)."""
    d = dataclasses.asdict(self)
    d["runtime"]["batch_axes"] = list(self.runtime.batch_axes)
    if self.layer_types is not None:
      d["layer_types"] = list(self.layer_types)
    return d

  def flat_dict(self) -> dict[str, Any]:
    """``{"vocab_size": ..., "linear.variant": ..., ...}``: one dotted key per field."""
    out = {}
    for key, val in self.to_dict().items():
      if key in GROUPS:
        out.update({f"{key}.{k}": v for k, v in val.items()})
      else:
        out[key] = val
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """A config from a mapping (e.g. parsed YAML): nested groups, dotted keys or the old flat
    names; fields not given take their defaults; unknown keys are a ValueError naming them."""
    if not isinstance(d, Mapping):
      raise TypeError(f"ModelConfig.from_dict needs a mapping, got {type(d).__name__}")
    nested: dict[str, Any] = {g: {} for g in GROUPS}
    for key, val in d.items():
      _set(nested, key, val)
    return cls(**nested)

  @staticmethod
  def field_types() -> dict[str, Any]:
    """The type hint of every dotted key (``flat_dict``'s keys), for parsing overrides."""
    out = {}
    for key, tp in typing.get_type_hints(ModelConfig).items():
      if key in GROUPS:
        out.update({f"{key}.{k}": t for k, t in typing.get_type_hints(GROUPS[key]).items()})
      else:
        out[key] = tp
    return out

  @staticmethod
  def canonical_key(key: str) -> str:
    """The dotted key of ``key`` (an old flat name, a dotted key or a top-level name);
    ValueError naming the valid keys if it is none of them."""
    key = FLAT_ALIASES.get(key, key)
    head, _, tail = key.partition(".")
    if tail:
      if head in GROUPS and tail in {f.name for f in dataclasses.fields(GROUPS[head])}:
        return key
    elif key in _TOP_LEVEL:
      return key
    raise ValueError(f"unknown ModelConfig key {key!r}; known keys are {sorted(_valid_keys())}")


def canonical_items(d: Mapping[str, Any]) -> dict[str, Any]:
  """``{dotted key: value}`` of a saved or written model mapping (nested groups, dotted keys or
  old flat names), without validating values; keys it does not know are kept as they are (a
  newer or older ``ModelConfig``)."""
  out = {}
  for key, val in d.items():
    if key in GROUPS and isinstance(val, Mapping):
      out.update(canonical_items({f"{key}.{k}": v for k, v in val.items()}))
      continue
    try:
      out[ModelConfig.canonical_key(key)] = val
    except ValueError:
      out[key] = val
  return out


_TOP_LEVEL = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in GROUPS)


def _valid_keys() -> list[str]:
  return list(_TOP_LEVEL) + [f"{g}.{f.name}" for g, c in GROUPS.items()
                             for f in dataclasses.fields(c)]


def _group(name: str, d: Mapping[str, Any]):
  cls = GROUPS[name]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown ModelConfig keys {[f'{name}.{k}' for k in unknown]}; "
                     f"{name} has {sorted(known)}")
  return cls(**dict(d))


def _set(nested: dict, key: str, val) -> None:
  """Puts ``val`` at ``key`` (any spelling ``canonical_key`` accepts, or a whole group)."""
  if key in GROUPS:
    if dataclasses.is_dataclass(val):
      val = dataclasses.asdict(val)
    if not isinstance(val, Mapping):
      raise ValueError(f"ModelConfig key {key!r} is a group: give a mapping, got {val!r}")
    for k, v in val.items():
      _set(nested, f"{key}.{k}", v)
    return
  key = ModelConfig.canonical_key(key)
  head, _, tail = key.partition(".")
  if tail:
    nested.setdefault(head, {})[tail] = val
  else:
    nested[key] = val


def _preset(**fields) -> ModelConfig:
  return ModelConfig.from_dict(fields)


_PRESETS: dict[str, ModelConfig] = {
    # Tests and CPU runs: 2 layers, d_model 32, 4 heads of 8, the kernel-4 short conv of fla.
    "tiny": _preset(vocab_size=256, d_model=32, num_layers=2, num_heads=4, ffn_dim=64,
                        layer_pattern="L", chunk_size=16, feature_dim=4, gate_rank=4,
                        short_conv=4),
    "tiny_hybrid": _preset(vocab_size=256, d_model=32, num_layers=4, num_heads=4,
                               num_kv_heads=2, ffn_dim=64, layer_pattern="LLLN", chunk_size=16,
                               feature_dim=4, gate_rank=4, short_conv=4),
    # tiny_hybrid with Gated DeltaNet linear layers (design §11; as Qwen3-Next's 3:1 hybrid).
    "tiny_gdn_hybrid": _preset(vocab_size=256, d_model=32, num_layers=4, num_heads=4,
                                   num_kv_heads=2, ffn_dim=64, layer_pattern="LLLN",
                                   linear_variant="gated_deltanet", chunk_size=16, feature_dim=4,
                                   gate_rank=4, short_conv=4),
    # tiny_hybrid with Mixture-of-Memories linear layers (lasp_jax.models.mom): 4 memories, each
    # token routed to 2, plus the shared memory; Switch's 0.01 on the load-balancing loss.
    "tiny_mom_hybrid": _preset(vocab_size=256, d_model=32, num_layers=4, num_heads=4,
                                   num_kv_heads=2, ffn_dim=64, layer_pattern="LLLN", chunk_size=16,
                                   feature_dim=4, gate_rank=4, short_conv=4,
                                   linear={"memories": 4, "memory_top_k": 2,
                                           "shared_memory": True, "router_aux_coef": 0.01}),
    # The paper's Linear-Llama3-1B (Llama-3.2-1B shapes: tied embeddings, vocab 128256, GQA 8);
    # no short conv, as in the published models.
    "linear_llama3_1b": _preset(vocab_size=128256, d_model=2048, num_layers=16, num_heads=16,
                                    num_kv_heads=8, head_dim=128, ffn_dim=8192, layer_pattern="L",
                                    tie_embeddings=True, compute_dtype="bfloat16", chunk_size=64),
    "linear_llama3_1b_hybrid": _preset(vocab_size=128256, d_model=2048, num_layers=16,
                                           num_heads=16, num_kv_heads=8, head_dim=128,
                                           ffn_dim=8192, layer_pattern="LLLN",
                                           tie_embeddings=True, compute_dtype="bfloat16",
                                           chunk_size=64),
    # The 1/4 hybrid at Linear-Llama3-1B scale with Gated DeltaNet linear layers and the kernel-4
    # short conv that Gated DeltaNet is defined with.
    "gated_deltanet_1b_hybrid": _preset(vocab_size=128256, d_model=2048, num_layers=16,
                                            num_heads=16, num_kv_heads=8, head_dim=128,
                                            ffn_dim=8192, layer_pattern="LLLN",
                                            linear_variant="gated_deltanet", short_conv=4,
                                            tie_embeddings=True, compute_dtype="bfloat16",
                                            chunk_size=64),
    # gated_deltanet_1b_hybrid with Mixture-of-Memories linear layers (MoM's 4 memories, top 2,
    # plus the shared memory): 5 Gated DeltaNet states per linear layer.
    "mom_1b_hybrid": _preset(vocab_size=128256, d_model=2048, num_layers=16, num_heads=16,
                                 num_kv_heads=8, head_dim=128, ffn_dim=8192, layer_pattern="LLLN",
                                 linear_variant="gated_deltanet", short_conv=4,
                                 linear={"memories": 4, "memory_top_k": 2, "shared_memory": True,
                                         "router_aux_coef": 0.01},
                                 tie_embeddings=True, compute_dtype="bfloat16", chunk_size=64),
}


def _qwen3_5(vocab, d, layers, ffn, heads, kv_heads, head_dim, k_heads, v_heads, k_dim, v_dim,
             rope_base, **extra) -> ModelConfig:
  """A Qwen3.5 dense text model (what ``models.hf.config_from_hf`` makes of its config.json):
  Gated DeltaNet layers with grouped value heads and every fourth layer gated softmax attention
  with q/k norm and a quarter of each head rotary; zero-centred norms, eps 1e-6."""
  return _preset(
      vocab_size=vocab, d_model=d, num_layers=layers, num_heads=k_heads, head_dim=k_dim,
      ffn_dim=ffn, layer_types=["softmax" if (i + 1) % 4 == 0 else "linear" for i in range(layers)],
      norm={"eps": 1e-6, "zero_centered": True},
      linear={"variant": "gated_deltanet", "short_conv": 4, "num_value_heads": v_heads,
              "key_dim": k_dim, "value_dim": v_dim},
      softmax={"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
               "rope_base": rope_base, "rotary_fraction": 0.25, "qk_norm": True,
               "output_gate": True}, **extra)


_PRESETS.update({
    # The tests' Qwen3.5 (tests/fixtures/qwen3_5_tiny: 2 key heads, 4 value heads, Dk 16, Dv 32).
    "qwen3_5_tiny": _qwen3_5(256, 64, 4, 128, 4, 2, 32, 2, 4, 16, 32, 10000.0,
                             runtime={"chunk_size": 8}),
    # Qwen3.5-9B's text model: transformers' Qwen3_5TextConfig defaults (D 4096, 32 layers, 16/4
    # attention heads of 256, 16 key / 32 value linear heads of 128, vocab 248320) and the
    # released rope_theta 1e7; bfloat16 compute for training.
    "qwen3_5_9b": _qwen3_5(248320, 4096, 32, 12288, 16, 4, 256, 16, 32, 128, 128, 1e7,
                           runtime={"compute_dtype": "bfloat16"}),
})

PRESETS = tuple(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
  """A named preset (``PRESETS``), optionally with fields replaced."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; presets are {PRESETS}")
  cfg = _PRESETS[name]
  return cfg.replace(**overrides) if overrides else cfg
