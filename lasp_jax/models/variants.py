"""The linear variants, one entry each: everything that differs between them, in one place.

The config check, the layer (``linear_attention.LinearAttention``), ``count_params`` (through the
layer's parameters) and ``flops_per_token`` all read this table; adding a variant is one entry here
and its test. Design §7 (the diagonal decays) and §11 (the delta rule).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LinearVariant:
  """What a linear variant is.

  Attributes:
    name: ``ModelConfig.linear.variant``.
    gate: the log-decay: None; ``"lightning"`` or ``"retention"`` (constant per head, ``(H,)``);
      ``"per_head"`` (a projection per token and head, ``(B, N, H)``) or ``"per_channel"`` (a
      low-rank projection per token and key channel, ``(B, N, H, Dk)``).
    mamba_gate: a data-dependent gate is Mamba2's ``-exp(A_log) softplus(logit + dt_bias)``
      (else GLA's ``logsigmoid(logit) / gate_normalizer``).
    features: q, k feature maps: ``"map"`` (``ModelConfig.linear.feature_map``), ``"taylor"`` (Based's
      second-order Taylor map on ``feature_dim``) or ``"rebased"`` (ReBased's learnable affine and
      squared kernel on ``feature_dim``); the last two are normalised.
    delta: the delta rule (SiLU then L2-normalised q and k, a ``beta`` per token and head).
  """
  name: str
  gate: str | None = None
  mamba_gate: bool = False
  features: str = "map"
  delta: bool = False

  @property
  def normalised(self) -> bool:
    """Based/ReBased: the output is divided by ``phi(q) . sum phi(k)`` (a column of ones in v)."""
    return self.features != "map"

  @property
  def scores(self) -> str:
    """The op's ``scores`` (``kernels.chunk_linear_attention``): ``"square"`` for ReBased, whose
    q, k reach the op at ``feature_dim`` and its kernel ``(q~ . k~)^2`` is squared there (so
    that a tiny normaliser, at a document's first tokens, stays accurate), else ``"dot"``."""
    return "square" if self.features == "rebased" else "dot"

  @property
  def data_dependent_gate(self) -> bool:
    return self.gate in ("per_head", "per_channel")

  def qk_dim(self, cfg) -> int:
    """Width of the q, k projections per head."""
    return cfg.linear_key_dim

  def state_dims(self, cfg) -> tuple[int, int]:
    """``(Dk, Dv)`` of the recurrence's state after the feature maps."""
    f, dv = self.qk_dim(cfg), cfg.linear_value_dim
    dk = {"taylor": 1 + f + f * f, "rebased": f * f}.get(self.features, f)
    return dk, dv + 1 if self.normalised else dv

  def gate_weights(self, cfg) -> int:
    """Matmul weights of the gate's and beta's projections (for FLOPs); gates and beta are per
    value head."""
    d, h, r = cfg.d_model, cfg.linear_value_heads, cfg.linear.gate_rank
    n = {"per_channel": d * r + r * h * self.qk_dim(cfg), "per_head": d * h}.get(self.gate, 0)
    return n + (d * h if self.delta else 0)


VARIANTS = {v.name: v for v in (
    LinearVariant("basic"),
    LinearVariant("lightning", gate="lightning"),
    LinearVariant("retention", gate="retention"),
    LinearVariant("gla", gate="per_channel"),
    LinearVariant("simple_gla", gate="per_head"),
    LinearVariant("based", features="taylor"),
    LinearVariant("rebased", features="rebased"),
    LinearVariant("deltanet", delta=True),
    LinearVariant("gated_deltanet", gate="per_head", mamba_gate=True, delta=True),
    LinearVariant("kda", gate="per_channel", mamba_gate=True, delta=True),
)}

LINEAR_VARIANTS = tuple(VARIANTS)
DIAGONAL_VARIANTS = tuple(n for n, v in VARIANTS.items() if not v.delta)
DELTA_VARIANTS = tuple(n for n, v in VARIANTS.items() if v.delta)


def get(name: str) -> LinearVariant:
  """The entry for ``name``; ValueError naming the valid ones otherwise."""
  if name not in VARIANTS:
    raise ValueError(f"linear.variant must be one of {LINEAR_VARIANTS}, got {name!r}")
  return VARIANTS[name]
