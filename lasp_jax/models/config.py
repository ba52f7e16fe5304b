"""Model configuration: one frozen, validated dataclass and the named presets (design §7)."""

from __future__ import annotations

import dataclasses
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
# Lowering of the linear layers' kernels (``lasp_jax.kernels.chunk_linear_attention``, the delta rule):
# "auto" is the kernels' own per-device choice; the others force one path (benchmarks, A/B runs).
KERNEL_BACKENDS = ("auto",) + dispatch.BACKENDS
LAYER_KINDS = {"L": "linear", "N": "softmax"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Linear-Llama3 decoder or one of its hybrids.

  ``layer_pattern`` is repeated (and cut) to ``num_layers``: ``"L"`` is a linear-attention layer,
  ``"N"`` a normal (softmax) one; ``"LLLN"`` is the paper's 1/4 hybrid. ``num_kv_heads`` applies to
  softmax layers (grouped-query attention); linear layers have ``num_heads`` heads for q, k and v.
  ``head_dim`` None means ``d_model // num_heads``. ``feature_map`` applies to every variant but
  ``based``/``rebased``, whose maps are part of their definition on a ``feature_dim``-wide
  projection, and the delta-rule variants (``DELTA_VARIANTS``: SiLU then L2 norm on q and k).
  ``gate_rank``/``gate_normalizer``: the rank of GLA's (and KDA's) low-rank gate and the divisor of
  GLA's and simple GLA's logsigmoid. ``allow_neg_eigval`` (delta-rule variants only): ``beta`` in
  ``[0, 2]`` instead of ``[0, 1]``, so the transition ``I - beta k^T k`` can have the eigenvalue
  ``-1`` that state tracking (e.g. parity) needs (design §11). ``short_conv``: kernel size of
  the depthwise causal conv + SiLU on q, k and v of every linear layer, after their projections
  (design §12; 0: none). ``exchange``: how LASP-2 combines the linear layers' segment
  summaries, ``"allgather"`` (one step, W summaries held), ``"scan"`` (log-depth ppermutes, O(1)
  held) or ``"auto"`` (``exchange.choose_exchange``). ``kernel_backend``: the lowering of the
  linear layers' kernels, passed as ``backend=`` to ``lasp_jax.linear_attention`` /
  ``lasp2_attention``: ``"auto"`` (the kernels' choice for the device), ``"xla"``, ``"gpu"`` or
  ``"tpu"`` (Pallas); it changes speed, not the parameters or the maths (the softmax layers' flash
  attention has a single XLA path). Sharding: the sequence is split over mesh axis ``seq_axis``, the
  batch over ``batch_axes``; weights over ``fsdp_axis``/``tensor_axis`` where the mesh has them.
  """

  vocab_size: int = 256
  d_model: int = 32
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  ffn_dim: int = 64
  layer_pattern: str = "L"
  linear_variant: str = "basic"
  feature_map: str = "swish"
  feature_dim: int = 16
  gate_rank: int = 16
  gate_normalizer: float = 16.0
  allow_neg_eigval: bool = False
  short_conv: int = 0
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  chunk_size: int = 64
  rope_base: float = 500000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  remat: bool = False
  seq_axis: str = "sp"
  batch_axes: tuple[str, ...] = ("data",)
  fsdp_axis: str | None = "fsdp"
  tensor_axis: str | None = "tensor"
  layout: str = "contiguous"
  exchange: str = "allgather"
  kernel_backend: str = "auto"

  @property
  def variant(self) -> variants.LinearVariant:
    """The linear layers' entry of ``models/variants.py``."""
    return variants.get(self.linear_variant)

  def __post_init__(self):
    if isinstance(self.batch_axes, (list, str)):
      object.__setattr__(self, "batch_axes",
                         (self.batch_axes,) if isinstance(self.batch_axes, str)
                         else tuple(self.batch_axes))
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim", "chunk_size",
                 "feature_dim", "gate_rank"):
      val = getattr(self, name)
      if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not isinstance(self.short_conv, int) or isinstance(self.short_conv, bool) or (
        self.short_conv < 0):
      raise ValueError(f"short_conv must be a kernel size >= 0 (0: no conv), "
                       f"got {self.short_conv!r}")
    for name in ("num_kv_heads", "head_dim"):
      val = getattr(self, name)
      if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
        raise ValueError(f"{name} must be a positive int or None, got {val!r}")
    variants.get(self.linear_variant)   # ValueError naming the variants
    if not isinstance(self.allow_neg_eigval, bool):
      raise ValueError(f"allow_neg_eigval must be a bool, got {self.allow_neg_eigval!r}")
    if self.allow_neg_eigval and not self.variant.delta:
      raise ValueError(f"allow_neg_eigval=True widens the delta rule's beta to [0, 2]: it needs a "
                       f"linear_variant in {DELTA_VARIANTS}, got {self.linear_variant!r}")
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
    if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
      raise ValueError(f"layer_pattern must be a non-empty string of 'L'/'N', "
                       f"got {self.layer_pattern!r}")
    bad = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
    if bad:
      raise ValueError(f"layer_pattern {self.layer_pattern!r} has letters {bad}; "
                       f"only 'L' (linear) and 'N' (softmax) are allowed")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide d_model={self.d_model} "
                       f"(set head_dim explicitly or change one of them)")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} does not divide "
                       f"num_heads={self.num_heads}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.exchange not in EXCHANGES:
      raise ValueError(f"exchange must be one of {EXCHANGES}, got {self.exchange!r}")
    if self.kernel_backend not in KERNEL_BACKENDS:
      raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, "
                       f"got {self.kernel_backend!r}")
    for name in ("rope_base", "norm_eps", "init_std", "gate_normalizer"):
      val = getattr(self, name)
      if not isinstance(val, (int, float)) or isinstance(val, bool) or val <= 0:
        raise ValueError(f"{name} must be a positive number, got {val!r}")
    if not isinstance(self.seq_axis, str) or not self.seq_axis:
      raise ValueError(f"seq_axis must be a mesh axis name, got {self.seq_axis!r}")
    if not all(isinstance(a, str) for a in self.batch_axes):
      raise ValueError(f"batch_axes must be mesh axis names, got {self.batch_axes!r}")
    if self.seq_axis in self.batch_axes:
      raise ValueError(f"seq_axis {self.seq_axis!r} cannot also be a batch axis "
                       f"{self.batch_axes!r}")

  # Derived sizes.
  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim_per_head(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    """``"linear"`` or ``"softmax"`` for each layer, the pattern repeated to the depth."""
    pat = self.layer_pattern
    return tuple(LAYER_KINDS[pat[i % len(pat)]] for i in range(self.num_layers))

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["batch_axes"] = list(self.batch_axes)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a mapping (e.g. parsed YAML); unknown keys are a ValueError."""
    if not isinstance(d, Mapping):
      raise TypeError(f"ModelConfig.from_dict needs a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig keys {unknown}; known keys are {sorted(known)}")
    return cls(**dict(d))


_PRESETS: dict[str, ModelConfig] = {
    # Tests and CPU runs: 2 layers, d_model 32, 4 heads of 8, the kernel-4 short conv of fla.
    "tiny": ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, ffn_dim=64,
                        layer_pattern="L", chunk_size=16, feature_dim=4, gate_rank=4,
                        short_conv=4),
    "tiny_hybrid": ModelConfig(vocab_size=256, d_model=32, num_layers=4, num_heads=4,
                               num_kv_heads=2, ffn_dim=64, layer_pattern="LLLN", chunk_size=16,
                               feature_dim=4, gate_rank=4, short_conv=4),
    # tiny_hybrid with Gated DeltaNet linear layers (design §11; as Qwen3-Next's 3:1 hybrid).
    "tiny_gdn_hybrid": ModelConfig(vocab_size=256, d_model=32, num_layers=4, num_heads=4,
                                   num_kv_heads=2, ffn_dim=64, layer_pattern="LLLN",
                                   linear_variant="gated_deltanet", chunk_size=16, feature_dim=4,
                                   gate_rank=4, short_conv=4),
    # The paper's Linear-Llama3-1B (Llama-3.2-1B shapes: tied embeddings, vocab 128256, GQA 8);
    # no short conv, as in the published models.
    "linear_llama3_1b": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=16,
                                    num_kv_heads=8, head_dim=128, ffn_dim=8192, layer_pattern="L",
                                    tie_embeddings=True, compute_dtype="bfloat16", chunk_size=64),
    "linear_llama3_1b_hybrid": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16,
                                           num_heads=16, num_kv_heads=8, head_dim=128,
                                           ffn_dim=8192, layer_pattern="LLLN",
                                           tie_embeddings=True, compute_dtype="bfloat16",
                                           chunk_size=64),
    # The 1/4 hybrid at Linear-Llama3-1B scale with Gated DeltaNet linear layers and the kernel-4
    # short conv that Gated DeltaNet is defined with.
    "gated_deltanet_1b_hybrid": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16,
                                            num_heads=16, num_kv_heads=8, head_dim=128,
                                            ffn_dim=8192, layer_pattern="LLLN",
                                            linear_variant="gated_deltanet", short_conv=4,
                                            tie_embeddings=True, compute_dtype="bfloat16",
                                            chunk_size=64),
}

PRESETS = tuple(_PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
  """A named preset (``PRESETS``), optionally with fields replaced."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; presets are {PRESETS}")
  cfg = _PRESETS[name]
  return cfg.replace(**overrides) if overrides else cfg
