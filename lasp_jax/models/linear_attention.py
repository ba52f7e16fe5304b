"""The linear-attention layer block and its variants (design §7, the paper's Table 2; the delta
rule of design §11).

Block (as in the reference models), for ``x (B, N, d_model)``:

    q, k, v = x W_q, x W_k, x W_v                       (B, N, H, Dk) / (B, N, H, Dv)
    q, k, v = SiLU(conv(q)), SiLU(conv(k)), SiLU(conv(v))  short causal conv, when cfg.linear.short_conv
    q, k    = phi(q), phi(k)                             feature map of the variant
    o       = core(q, k, v, g[, beta])                   LASP-2 over the mesh, or one device
    o       = RMSNorm_head(o) * swish(x W_og)            per-head norm, output gate
    y       = o W_o

``core`` is the causal linear recurrence with ``scale = Dk**-0.5``: for the diagonal-decay variants
``S_i = diag(exp g_i) S_{i-1} + k_i^T v_i``, for the delta-rule variants (``deltanet``,
``gated_deltanet``, ``kda``)
``S_i = (I - beta_i k_i^T k_i) diag(exp g_i) S_{i-1} + beta_i k_i^T v_i``; both
``o_i = scale * q_i S_i``. Variants differ in ``g``, ``beta`` and ``phi``; ``LinearAttention``
gives each one's formula.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.kernels.linear_attention.reference import square_features
from lasp_jax.kernels.linear_attention.step import recurrent_step
from lasp_jax.models.cache import LinearCache
from lasp_jax.models.layers import param, rms_norm
from lasp_jax.models.sharding_rules import Context
from lasp_jax.sequence_parallel.conv import causal_conv1d_step, conv_state

_HEADS = ("act_batch", "act_seq", "act_heads", None)
# Denominator guard of the normalised (Based, ReBased) variants.
NORMALISER_EPS = 1e-6
# Guard of the delta rule's L2 norm of q and k (fla's l2norm).
L2_NORM_EPS = 1e-6



def feature_map(x, name: str):
  """Elementwise feature map of the non-Based variants: identity, swish, relu or elu(x)+1."""
  if name == "identity":
    return x
  if name == "swish":
    return jax.nn.silu(x)
  if name == "relu":
    return jax.nn.relu(x)
  if name == "elu_plus_one":
    return jax.nn.elu(x) + 1.0
  raise ValueError(f"unknown feature_map {name!r}")


def alibi_slopes(num_heads: int) -> jnp.ndarray:
  """ALiBi head slopes: ``2**(-8 (h+1) / H)`` for ``H`` a power of two; otherwise those of the
  nearest smaller power of two followed by every other slope of twice that many heads."""
  def pow2(n):
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
  if num_heads & (num_heads - 1) == 0:
    return jnp.asarray(pow2(num_heads), jnp.float32)
  base = 2 ** int(math.floor(math.log2(num_heads)))
  extra = pow2(2 * base)[0::2][: num_heads - base]
  return jnp.asarray(pow2(base) + extra, jnp.float32)


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int):
  """Lightning Attention / TransNormerLLM: ``g_h = -s_h * (1 - l / (L - 1) + 1e-5)`` with ``s_h``
  the ALiBi slopes and ``l`` the layer index among ``L``: deep layers decay less. Shape (H,)."""
  depth = 1.0 - (layer_idx / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
  return -alibi_slopes(num_heads) * depth


def retention_log_decay(num_heads: int):
  """RetNet: ``g_h = log(1 - 2**(-5 - h))`` for head ``h = 0 .. H-1``. Shape (H,)."""
  h = jnp.arange(num_heads, dtype=jnp.float32)
  return jnp.log1p(-jnp.exp2(-5.0 - h))


def taylor_features(x_BxNxHxF):
  """Based's 2nd-order Taylor map ``phi(x) = [1, x, vec(x x^T) / sqrt(2)]`` (size 1 + F + F^2), so
  ``phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2``, the Taylor expansion of ``exp(q.k)``."""
  outer = (x_BxNxHxF[..., :, None] * x_BxNxHxF[..., None, :]).reshape(
      *x_BxNxHxF.shape[:-1], -1)
  ones = jnp.ones_like(x_BxNxHxF[..., :1])  # _like: keeps the sharding on explicit meshes
  return jnp.concatenate([ones, x_BxNxHxF, outer * (1.0 / math.sqrt(2.0))], axis=-1)


def rebased_norm(x_BxNxHxF, gamma_HxF, beta_HxF):
  """ReBased's ``x~ = gamma * LayerNorm(x) + beta`` (norm without affine over F, learnable per
  head and channel), computed in float32 and returned in ``x``'s dtype."""
  x = x_BxNxHxF.astype(jnp.float32)
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  x = (x - mu) * jax.lax.rsqrt(var + 1e-5)
  return (x * gamma_HxF.astype(jnp.float32) + beta_HxF.astype(jnp.float32)).astype(x_BxNxHxF.dtype)


def rebased_features(x_BxNxHxF, gamma_HxF, beta_HxF):
  """ReBased's map ``phi(x) = vec(x~ x~^T)`` (size F^2) of ``x~ = rebased_norm(x)``, so
  ``phi(q) . phi(k) = (q~ . k~)^2``. The layer hands the op ``q~, k~`` with ``scores="square"``
  instead: the op forms these features for the state and squares ``q~ . k~`` for the scores."""
  return square_features(rebased_norm(x_BxNxHxF, gamma_HxF, beta_HxF))


def l2_normalize(x_BxNxHxD, eps: float = L2_NORM_EPS):
  """``x / sqrt(sum(x^2) + eps)`` over the last axis (per head, over Dk), computed in float32 and
  returned in ``x``'s dtype: the delta rule's q and k, so that ``|k| <= 1`` and the transition
  ``I - beta k^T k`` has eigenvalues in ``[1 - beta, 1]``."""
  x = x_BxNxHxD.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
  return y.astype(x_BxNxHxD.dtype)


def mamba_a_log_init(key, shape, low: float = 1.0, high: float = 16.0):
  """Mamba2 / Gated DeltaNet: ``A_log = log A`` with ``A ~ U[low, high]`` (float32)."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high))


def mamba_dt_bias_init(key, shape, dt_min: float = 1e-3, dt_max: float = 1e-1,
                       dt_floor: float = 1e-4):
  """Mamba2 / Gated DeltaNet: ``dt_bias = softplus^{-1}(dt) = dt + log(1 - exp(-dt))`` with ``dt``
  log-uniform in ``[dt_min, dt_max]`` (floored at ``dt_floor``), so that at init the gate
  ``softplus(x W_a + dt_bias)`` is about ``dt`` (float32)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, dt_floor)
  return dt + jnp.log(-jnp.expm1(-dt))


def short_conv(x_BxNxHxD, weight_KxHxD, *, cfg, ctx: Context, segment_ids=None):
  """``SiLU(causal_conv1d(x))`` over the ``H * D`` channels of a projection (design §12), with
  the halo exchange when the mesh has the sequence axis; no taps across a document start of
  ``segment_ids (B, N)``."""
  import lasp_jax
  bsz, n, h, d = x_BxNxHxD.shape
  y = lasp_jax.causal_conv1d(x_BxNxHxD.reshape(bsz, n, h * d), weight_KxHxD.reshape(-1, h * d),
                             activation="silu", segment_ids=segment_ids, seq_axis=cfg.runtime.seq_axis,
                             batch_axis=ctx.batch_axis, layout=cfg.runtime.layout)
  return y.reshape(bsz, n, h, d)


def core_attention(q, k, v, log_decay, *, scale, cfg, ctx: Context, segment_ids=None, beta=None,
                   return_final_state=False, scores="dot"):
  """The causal linear op: LASP-2 when the mesh has the sequence axis, else one device; the
  state restarts at every document start of ``segment_ids (B, N)``. ``beta (B, N, H)`` (None: the
  diagonal family) makes it the delta rule (design §11). ``return_final_state``: also the
  float32 state after the last token, ``(o, state)``. ``scores``: the op's (``"square"``:
  ReBased's ``(q . k)^2`` on ``Dk``-wide q, k, a state over their ``vec(k k^T)``)."""
  import lasp_jax
  delta = {} if beta is None else {"beta": beta}
  if scores != "dot":
    delta["scores"] = scores
  delta["return_final_state"] = return_final_state
  if ctx.sequence_parallel:
    return lasp_jax.lasp2_attention(
        q, k, v, log_decay, seq_axis=cfg.runtime.seq_axis, batch_axis=ctx.batch_axis, causal=True,
        scale=scale, segment_ids=segment_ids, chunk_size=cfg.runtime.chunk_size, layout=cfg.runtime.layout,
        exchange=cfg.runtime.exchange, backend=cfg.runtime.kernel_backend, **delta)
  return lasp_jax.linear_attention(q, k, v, log_decay, causal=True, scale=scale,
                                   segment_ids=segment_ids, chunk_size=cfg.runtime.chunk_size,
                                   backend=cfg.runtime.kernel_backend, **delta)


class LinearAttention(nnx.Module):
  """One linear-attention layer of variant ``cfg.linear.variant`` (see the module docstring).

  Diagonal-decay variants (``g`` is the log-decay, all <= 0):
  - ``basic``: ``g = 0``; ``phi = cfg.linear.feature_map``.
  - ``lightning``: ``g_h = -s_h (1 - l/(L-1) + 1e-5)``, ALiBi slopes ``s_h``
    (``lightning_log_decay``).
  - ``retention``: ``g_h = log(1 - 2**(-5-h))``.
  - ``gla``: ``g = logsigmoid(x W_g1 W_g2 + b_g) / 16`` per token, head and key channel, with
    low-rank ``W_g1 (d, r)``, ``W_g2 (r, H Dk)`` (``r = cfg.linear.gate_rank``, 16 in the paper).
  - ``simple_gla``: ``g_h = logsigmoid(x w_h + b_h) / 16`` per token and head.
  - ``based``: q, k projected to ``F = cfg.linear.feature_dim`` per head, ``q <- q F**-0.5``, then
    ``o = phi(q) S / (phi(q) z + eps)`` with the Taylor map (``taylor_features``) and
    ``z_i = sum_{j<=i} phi(k_j)``.
  - ``rebased``: as Based with the ReBased map (``rebased_features``), kernel ``(q~ . k~)^2``;
    the op gets ``q~, k~`` (``rebased_norm``) and ``scores="square"``: it scores ``(q~ . k~)^2``
    from the F-wide vectors, not by a dot of the F^2 features, whose float32 rounding error
    relative to a small score is ~eps / cos^2 and reaches the output through a tiny normaliser
    (a document's first tokens); the state stays over the features.
  Based/ReBased's normaliser comes from the same op run on ``[v, 1]``: the last output column is
  ``phi(q_i) z_i`` and LASP-2 carries ``z`` with the state.

  Delta-rule variants (design §11; as Gated DeltaNet / Qwen3-Next and Kimi Linear):
  ``q, k, v = SiLU(conv(.))`` (``SiLU(.)`` without ``cfg.linear.short_conv``), ``q, k = q / |q|, k / |k|``
  per head over Dk (``l2_normalize``, float32), ``beta_h = sigmoid(x w_b,h)`` per token and head,
  times 2 with ``cfg.linear.allow_neg_eigval`` (``beta`` in ``[0, 2]``: eigenvalues of the transition down
  to -1), and
  - ``deltanet``: no decay (``g = 0``).
  - ``gated_deltanet``: ``g_h = -exp(A_log_h) * softplus(x w_h + b_h)`` per token and head.
  - ``kda`` (Kimi Delta Attention): ``g = -exp(A_log_h) * softplus(x W_g1 W_g2 + b_g)`` per token,
    head and key channel, with the low-rank ``W_g1 (d, r)``, ``W_g2 (r, H Dk)`` of GLA (``r =
    cfg.linear.gate_rank``; Kimi Linear uses ``r = Dk``); ``A_log`` per head.
  Mamba2 init of these gates: ``A ~ U[1, 16]``, ``A_log = log A``; the bias ``b`` (Mamba's
  ``dt_bias``) is ``softplus^{-1}(dt)``, ``dt`` log-uniform in ``[1e-3, 1e-1]``.
  """

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layer_idx = layer_idx
    # q, k: hk heads of dqk; v, the state, gates, beta and the output: h value heads of dh.
    d, hk, h, dh = cfg.d_model, cfg.num_heads, cfg.linear_value_heads, cfg.linear_value_dim
    dt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    variant = cfg.variant
    dqk = variant.qk_dim(cfg)
    self.w_q = param(rngs, (d, hk, dqk), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_k = param(rngs, (d, hk, dqk), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_v = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_og = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_o = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), dt, std=std)
    self.o_norm = param(None, (dh,), ("norm",), dt, value=1.0)
    if cfg.linear.short_conv:
      # PyTorch's default conv init (uniform, bound K**-0.5) in its normal form: unlike the
      # projections' 0.02 it keeps q, k, v at the scale of the projections at init.
      conv_std = (3 * cfg.linear.short_conv) ** -0.5
      conv_axes = ("conv", "q_heads", "head_dim")
      self.conv_q = param(rngs, (cfg.linear.short_conv, hk, dqk), conv_axes, dt, std=conv_std)
      self.conv_k = param(rngs, (cfg.linear.short_conv, hk, dqk), conv_axes, dt, std=conv_std)
      self.conv_v = param(rngs, (cfg.linear.short_conv, h, dh), conv_axes, dt, std=conv_std)
    # The gate's bias is 0 for GLA-style gates, Mamba's dt_bias for Mamba-style ones.
    bias = dict(init=mamba_dt_bias_init) if variant.mamba_gate else dict(value=0.0)
    if variant.gate == "per_channel":
      r = cfg.linear.gate_rank
      self.w_g1 = param(rngs, (d, r), ("embed", "rank"), dt, std=std)
      self.w_g2 = param(rngs, (r, h, dqk), ("rank", "q_heads", "head_dim"), dt, std=std)
      self.b_g = param(rngs, (h, dqk), ("q_heads", "head_dim"), dt, **bias)
    elif variant.gate == "per_head":
      self.w_g = param(rngs, (d, h), ("embed", "q_heads"), dt, std=std)
      self.b_g = param(rngs, (h,), ("q_heads",), dt, **bias)
    elif variant.features == "rebased":
      self.fm_gamma = param(None, (hk, dqk), ("q_heads", "feature"), dt, value=1.0)
      self.fm_beta = param(None, (hk, dqk), ("q_heads", "feature"), dt, value=0.0)
    if variant.mamba_gate:
      self.a_log = param(rngs, (h,), ("q_heads",), dt, init=mamba_a_log_init)
    if variant.delta:
      self.w_b = param(rngs, (d, h), ("embed", "q_heads"), dt, std=std)

  def _log_decay(self, x_BxNxD, ctx: Context):
    """``g``: None, ``(H,)``, ``(B, N, H)`` or ``(B, N, H, Dk)`` float32 (class docstring)."""
    cfg, variant = self.cfg, self.cfg.variant
    if variant.gate == "lightning":
      return lightning_log_decay(cfg.linear_value_heads, self.layer_idx, cfg.num_layers)
    if variant.gate == "retention":
      return retention_log_decay(cfg.linear_value_heads)
    if not variant.data_dependent_gate:
      return None
    # Gates in float32: they are summed over the whole sequence.
    x32 = x_BxNxD.astype(jnp.float32)
    c32 = dataclasses.replace(ctx, compute_dtype=jnp.float32)
    if variant.gate == "per_channel":
      low = c32.einsum("bnd,dr->bnr", x32, c32.weight(self.w_g1, ("embed", "rank")),
                       ("act_batch", "act_seq", None))
      logit = c32.einsum("bnr,rhk->bnhk", low,
                         c32.weight(self.w_g2, ("rank", "q_heads", "head_dim")),
                         ("act_batch", "act_seq", "act_heads", None))
    else:
      logit = c32.einsum("bnd,dh->bnh", x32, c32.weight(self.w_g, ("embed", "q_heads")),
                         ("act_batch", "act_seq", "act_heads"))
    logit = logit + _replicated(self.b_g, c32)
    if variant.mamba_gate:
      a = jnp.exp(_replicated(self.a_log, c32))               # (H,)
      a = a[:, None] if logit.ndim == 4 else a
      return -a * jax.nn.softplus(logit)
    return jax.nn.log_sigmoid(logit) / cfg.linear.gate_normalizer

  def _beta(self, x_BxNxD, ctx: Context):
    """The delta rule's ``beta (B, N, H)`` float32: ``sigmoid(x w_b)``, in ``[0, 2]`` (twice
    that) with ``cfg.linear.allow_neg_eigval``."""
    c32 = dataclasses.replace(ctx, compute_dtype=jnp.float32)
    logit = c32.einsum("bnd,dh->bnh", x_BxNxD.astype(jnp.float32),
                       c32.weight(self.w_b, ("embed", "q_heads")),
                       ("act_batch", "act_seq", "act_heads"))
    beta = jax.nn.sigmoid(logit)
    return 2.0 * beta if self.cfg.linear.allow_neg_eigval else beta

  def _project(self, x_BxNxD, ctx: Context):
    """q, k, v ``(B, N, H, D)`` before the conv and the feature maps."""
    heads, wspec = _HEADS, ("embed", "q_heads", "head_dim")
    return tuple(ctx.einsum("bnd,dhk->bnhk", x_BxNxD, ctx.weight(w, wspec), heads)
                 for w in (self.w_q, self.w_k, self.w_v))

  def _conv_weights(self, ctx: Context):
    cspec = ("conv", "q_heads", "head_dim")
    return tuple(ctx.weight(w, cspec) for w in (self.conv_q, self.conv_k, self.conv_v))

  def _core_inputs(self, q, k, v, x_BxNxD, ctx: Context):
    """After the conv: the op's ``q, k, v, g, beta, scale`` for the variant (class docstring).
    Based/ReBased's values get the column of ones whose output is the normaliser; ReBased's q, k
    are ``q~, k~`` for ``scores="square"``."""
    cfg, variant = self.cfg, self.cfg.variant
    if variant.normalised:
      q = q * (q.shape[-1] ** -0.5)  # the published references scale q before the map
      if variant.features == "taylor":
        q, k = taylor_features(q), taylor_features(k)
      else:  # the op forms the features (variant.scores == "square")
        gamma, beta = self.fm_gamma[...], self.fm_beta[...]
        q, k = rebased_norm(q, gamma, beta), rebased_norm(k, gamma, beta)
      v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
      return self._share_qk(q), self._share_qk(k), v1, None, None, 1.0
    if variant.delta:
      q, k, beta = l2_normalize(q), l2_normalize(k), self._beta(x_BxNxD, ctx)
    else:
      q, k, beta = feature_map(q, cfg.linear.feature_map), feature_map(k, cfg.linear.feature_map), None
    q, k = self._share_qk(q), self._share_qk(k)
    return q, k, v, self._log_decay(x_BxNxD, ctx), beta, q.shape[-1] ** -0.5

  def _share_qk(self, x_BxNxHkxD):
    """q or k on the value heads: value head ``j`` reads head ``j // group`` (Qwen3.5's and fla's
    ``repeat_interleave``), so the op sees one q, k per value head."""
    group = self.cfg.linear_value_heads // self.cfg.num_heads
    return x_BxNxHkxD if group == 1 else jnp.repeat(x_BxNxHkxD, group, axis=2)

  def _output(self, o, x_BxNxD, ctx: Context):
    """The op's output ``(B, N, H, Dv)`` (Based: ``Dv + 1``) -> the layer's ``(B, N, D)``."""
    if self.cfg.variant.normalised:
      o32 = o.astype(jnp.float32)
      o = (o32[..., :-1] / (o32[..., -1:] + NORMALISER_EPS)).astype(o.dtype)
    o = ctx.constrain(o, _HEADS)
    o = rms_norm(o, self.o_norm[...], self.cfg.norm.eps)
    wspec = ("embed", "q_heads", "head_dim")
    gate = ctx.einsum("bnd,dhk->bnhk", x_BxNxD, ctx.weight(self.w_og, wspec), _HEADS)
    o = o * jax.nn.silu(gate)
    return ctx.einsum("bnhk,hkd->bnd", o, ctx.weight(self.w_o, ("q_heads", "head_dim", "embed")),
                      ("act_batch", "act_seq", "act_embed"))

  def __call__(self, x_BxNxD, ctx: Context, segment_ids_BxN=None, *, return_cache=False):
    """``y (B, N, D)``; with ``return_cache`` also the ``LinearCache`` after the last token (in
    natural order) of the last document of each row: the prefill of decoding."""
    cfg, variant = self.cfg, self.cfg.linear.variant
    with jax.named_scope(f"linear_attention_{variant}"):
      q, k, v = raw = self._project(x_BxNxD, ctx)
      conv = ()
      if cfg.linear.short_conv:
        q, k, v = (ctx.constrain(short_conv(x, w, cfg=cfg, ctx=ctx, segment_ids=segment_ids_BxN),
                                 _HEADS) for x, w in zip(raw, self._conv_weights(ctx)))
        if return_cache:
          conv = tuple(conv_state(x.reshape(*x.shape[:2], -1), cfg.linear.short_conv,
                                  segment_ids=segment_ids_BxN, layout=cfg.runtime.layout,
                                  num_shards=ctx.seq_shards) for x in raw)
      elif cfg.variant.delta:  # Gated DeltaNet's SiLU on q, k, v is part of the conv
        q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
      q, k, v, g, beta, scale = self._core_inputs(q, k, v, x_BxNxD, ctx)
      out = core_attention(q, k, v, g, scale=scale, cfg=cfg, ctx=ctx,
                           segment_ids=segment_ids_BxN, beta=beta,
                           return_final_state=return_cache, scores=cfg.variant.scores)
      o, state = out if return_cache else (out, None)
      y = self._output(o, x_BxNxD, ctx)
    return (y, LinearCache(state, conv)) if return_cache else y

  def decode(self, x_Bx1xD, cache: LinearCache, ctx: Context):
    """One token: ``(y (B, 1, D), the cache after it)``, one step of the recurrence (and of the
    conv), the same arithmetic as ``__call__`` at that position."""
    cfg, variant = self.cfg, self.cfg.linear.variant
    with jax.named_scope(f"linear_attention_{variant}_decode"):
      q, k, v = raw = self._project(x_Bx1xD, ctx)
      conv = ()
      if cfg.linear.short_conv:
        outs = []
        for x, w, st in zip(raw, self._conv_weights(ctx), cache.conv):
          b, _, h, d = x.shape
          y, st = causal_conv1d_step(x.reshape(b, h * d), st, w.reshape(-1, h * d),
                                     activation="silu")
          outs.append(y.reshape(b, 1, h, d))
          conv += (st,)
        q, k, v = outs
      elif cfg.variant.delta:
        q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
      q, k, v, g, beta, scale = self._core_inputs(q, k, v, x_Bx1xD, ctx)
      o_dtype = q.dtype
      if cfg.variant.scores == "square":  # the state's features, in float32 as the op forms them
        q, k = square_features(q.astype(jnp.float32)), square_features(k.astype(jnp.float32))
      g = g if g is None or g.ndim == 1 else g[:, 0]  # (H,) or this token's (B, H[, Dk])
      o, state = recurrent_step(cache.state, q[:, 0], k[:, 0], v[:, 0], g,
                                beta=None if beta is None else beta[:, 0], scale=scale)
      return self._output(o[:, None].astype(o_dtype), x_Bx1xD, ctx), LinearCache(state, conv)


def _replicated(p: nnx.Param, ctx: Context):
  """A small per-head parameter (a bias, ``A_log``) in the compute dtype, whole on every device:
  it meets activations whose heads are not split (``act_heads``)."""
  return ctx.weight(p, (None,) * p.ndim)
