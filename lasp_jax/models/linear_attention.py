"""The linear-attention layer block and its seven variants (SPEC section 7, the paper's Table 2).

Block (as in the reference models), for ``x (B, N, d_model)``:

    q, k, v = x W_q, x W_k, x W_v                       (B, N, H, Dk) / (B, N, H, Dv)
    q, k, v = SiLU(conv(q)), SiLU(conv(k)), SiLU(conv(v))  short causal conv, when cfg.short_conv
    q, k    = phi(q), phi(k)                             feature map of the variant
    o       = core(q, k, v, g)                           LASP-2 over the mesh, or one device
    o       = RMSNorm_head(o) * swish(x W_og)            per-head norm, output gate
    y       = o W_o

``core`` is the causal linear recurrence ``S_i = diag(exp g_i) S_{i-1} + k_i^T v_i``,
``o_i = scale * q_i S_i`` with ``scale = Dk**-0.5``. Variants differ in ``g`` and ``phi``; each
function below gives its formula.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.models.layers import param, rms_norm
from lasp_jax.models.sharding_rules import Context

# Denominator guard of the normalised (Based, ReBased) variants.
NORMALISER_EPS = 1e-6


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


def rebased_features(x_BxNxHxF, gamma_HxF, beta_HxF):
  """ReBased: ``x~ = gamma * LayerNorm(x) + beta`` (norm without affine over F, learnable per head
  and channel), then ``phi(x) = vec(x~ x~^T)`` (size F^2), so ``phi(q) . phi(k) = (q~ . k~)^2``."""
  x = x_BxNxHxF.astype(jnp.float32)
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  x = (x - mu) * jax.lax.rsqrt(var + 1e-5)
  x = (x * gamma_HxF.astype(jnp.float32) + beta_HxF.astype(jnp.float32)).astype(x_BxNxHxF.dtype)
  return (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)


def short_conv(x_BxNxHxD, weight_KxHxD, *, cfg, ctx: Context, segment_ids=None):
  """``SiLU(causal_conv1d(x))`` over the ``H * D`` channels of a projection (SPEC section 12), with
  the halo exchange when the mesh has the sequence axis; no taps across a document start of
  ``segment_ids (B, N)``."""
  import lasp_jax
  bsz, n, h, d = x_BxNxHxD.shape
  y = lasp_jax.causal_conv1d(x_BxNxHxD.reshape(bsz, n, h * d), weight_KxHxD.reshape(-1, h * d),
                             activation="silu", segment_ids=segment_ids, seq_axis=cfg.seq_axis,
                             batch_axis=ctx.batch_axis, layout=cfg.layout)
  return y.reshape(bsz, n, h, d)


def core_attention(q, k, v, log_decay, *, scale, cfg, ctx: Context, segment_ids=None):
  """The causal linear op: LASP-2 when the mesh has the sequence axis, else one device; the
  state restarts at every document start of ``segment_ids (B, N)``."""
  import lasp_jax
  if ctx.sequence_parallel:
    return lasp_jax.lasp2_attention(
        q, k, v, log_decay, seq_axis=cfg.seq_axis, batch_axis=ctx.batch_axis, causal=True,
        scale=scale, segment_ids=segment_ids, chunk_size=cfg.chunk_size, layout=cfg.layout)
  return lasp_jax.linear_attention(q, k, v, log_decay, causal=True, scale=scale,
                                   segment_ids=segment_ids, chunk_size=cfg.chunk_size)


class LinearAttention(nnx.Module):
  """One linear-attention layer of variant ``cfg.linear_variant`` (see the module docstring).

  Variants (``g`` is the log-decay, all <= 0):
  - ``basic``: ``g = 0``; ``phi = cfg.feature_map``.
  - ``lightning``: ``g_h = -s_h (1 - l/(L-1) + 1e-5)``, ALiBi slopes ``s_h`` (``lightning_log_decay``).
  - ``retention``: ``g_h = log(1 - 2**(-5-h))``.
  - ``gla``: ``g = logsigmoid(x W_g1 W_g2 + b_g) / 16`` per token, head and key channel, with
    low-rank ``W_g1 (d, r)``, ``W_g2 (r, H Dk)`` (``r = cfg.gate_rank``, 16 in the paper).
  - ``simple_gla``: ``g_h = logsigmoid(x w_h + b_h) / 16`` per token and head.
  - ``based``: q, k projected to ``F = cfg.feature_dim`` per head, ``q <- q F**-0.5``, then
    ``o = phi(q) S / (phi(q) z + eps)`` with the Taylor map (``taylor_features``) and
    ``z_i = sum_{j<=i} phi(k_j)``.
  - ``rebased``: as Based with the ReBased map (``rebased_features``), kernel ``(q~ . k~)^2``.
  Based/ReBased's normaliser comes from the same op run on ``[v, 1]``: the last output column is
  ``phi(q_i) z_i`` and LASP-2 carries ``z`` with the state.
  """

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layer_idx = layer_idx
    d, h, dh = cfg.d_model, cfg.num_heads, cfg.dim_per_head
    dt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    variant = cfg.linear_variant
    dqk = cfg.feature_dim if variant in ("based", "rebased") else dh
    self.w_q = param(rngs, (d, h, dqk), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_k = param(rngs, (d, h, dqk), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_v = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_og = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_o = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), dt, std=std)
    self.o_norm = param(None, (dh,), ("norm",), dt, value=1.0)
    if cfg.short_conv:
      # PyTorch's default conv init (uniform, bound K**-0.5) in its normal form: unlike the
      # projections' 0.02 it keeps q, k, v at the scale of the projections at init.
      conv_std = (3 * cfg.short_conv) ** -0.5
      conv_axes = ("conv", "q_heads", "head_dim")
      self.conv_q = param(rngs, (cfg.short_conv, h, dqk), conv_axes, dt, std=conv_std)
      self.conv_k = param(rngs, (cfg.short_conv, h, dqk), conv_axes, dt, std=conv_std)
      self.conv_v = param(rngs, (cfg.short_conv, h, dh), conv_axes, dt, std=conv_std)
    if variant == "gla":
      r = cfg.gate_rank
      self.w_g1 = param(rngs, (d, r), ("embed", "rank"), dt, std=std)
      self.w_g2 = param(rngs, (r, h, dh), ("rank", "q_heads", "head_dim"), dt, std=std)
      self.b_g = param(None, (h, dh), ("q_heads", "head_dim"), dt, value=0.0)
    elif variant == "simple_gla":
      self.w_g = param(rngs, (d, h), ("embed", "q_heads"), dt, std=std)
      self.b_g = param(None, (h,), ("q_heads",), dt, value=0.0)
    elif variant == "rebased":
      self.fm_gamma = param(None, (h, dqk), ("q_heads", "feature"), dt, value=1.0)
      self.fm_beta = param(None, (h, dqk), ("q_heads", "feature"), dt, value=0.0)

  def _log_decay(self, x_BxNxD, ctx: Context):
    cfg, variant = self.cfg, self.cfg.linear_variant
    if variant == "lightning":
      return lightning_log_decay(cfg.num_heads, self.layer_idx, cfg.num_layers)
    if variant == "retention":
      return retention_log_decay(cfg.num_heads)
    # Gates in float32: they are summed over the whole sequence.
    x32 = x_BxNxD.astype(jnp.float32)
    c32 = dataclasses.replace(ctx, compute_dtype=jnp.float32)
    if variant == "gla":
      low = c32.einsum("bnd,dr->bnr", x32, c32.weight(self.w_g1, ("embed", "rank")),
                       ("act_batch", "act_seq", None))
      logit = c32.einsum("bnr,rhk->bnhk", low,
                         c32.weight(self.w_g2, ("rank", "q_heads", "head_dim")),
                         ("act_batch", "act_seq", "act_heads", None))
      return jax.nn.log_sigmoid(logit + self.b_g[...].astype(jnp.float32)) / cfg.gate_normalizer
    if variant == "simple_gla":
      logit = c32.einsum("bnd,dh->bnh", x32, c32.weight(self.w_g, ("embed", "q_heads")),
                         ("act_batch", "act_seq", "act_heads"))
      return jax.nn.log_sigmoid(logit + self.b_g[...].astype(jnp.float32)) / cfg.gate_normalizer
    return None

  def __call__(self, x_BxNxD, ctx: Context, segment_ids_BxN=None):
    cfg, variant = self.cfg, self.cfg.linear_variant
    heads = ("act_batch", "act_seq", "act_heads", None)
    wspec = ("embed", "q_heads", "head_dim")
    with jax.named_scope(f"linear_attention_{variant}"):
      q = ctx.einsum("bnd,dhk->bnhk", x_BxNxD, ctx.weight(self.w_q, wspec), heads)
      k = ctx.einsum("bnd,dhk->bnhk", x_BxNxD, ctx.weight(self.w_k, wspec), heads)
      v = ctx.einsum("bnd,dhk->bnhk", x_BxNxD, ctx.weight(self.w_v, wspec), heads)
      if cfg.short_conv:
        cspec = ("conv", "q_heads", "head_dim")
        q, k, v = (ctx.constrain(short_conv(x, ctx.weight(w, cspec), cfg=cfg, ctx=ctx,
                                            segment_ids=segment_ids_BxN), heads)
                   for x, w in ((q, self.conv_q), (k, self.conv_k), (v, self.conv_v)))
      dv = v.shape[-1]
      if variant in ("based", "rebased"):
        q = q * (q.shape[-1] ** -0.5)  # the published references scale q before the map
        if variant == "based":
          q, k = taylor_features(q), taylor_features(k)
        else:
          gamma, beta = self.fm_gamma[...], self.fm_beta[...]
          q, k = rebased_features(q, gamma, beta), rebased_features(k, gamma, beta)
        v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
        o1 = core_attention(q, k, v1, None, scale=1.0, cfg=cfg, ctx=ctx,
                            segment_ids=segment_ids_BxN)
        o32 = o1.astype(jnp.float32)
        o = (o32[..., :dv] / (o32[..., dv:] + NORMALISER_EPS)).astype(v.dtype)
      else:
        q, k = feature_map(q, cfg.feature_map), feature_map(k, cfg.feature_map)
        o = core_attention(q, k, v, self._log_decay(x_BxNxD, ctx), scale=q.shape[-1] ** -0.5,
                           cfg=cfg, ctx=ctx, segment_ids=segment_ids_BxN)
      o = ctx.constrain(o, heads)
      o = rms_norm(o, self.o_norm[...], cfg.norm_eps)
      gate = ctx.einsum("bnd,dhk->bnhk", x_BxNxD, ctx.weight(self.w_og, wspec), heads)
      o = o * jax.nn.silu(gate)
      return ctx.einsum("bnhk,hkd->bnd", o, ctx.weight(self.w_o, ("q_heads", "head_dim", "embed")),
                        ("act_batch", "act_seq", "act_embed"))
