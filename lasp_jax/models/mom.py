"""Mixture-of-Memories linear layers (design §16; Du et al. 2025, "MoM: Linear Sequence Modeling
with Mixture-of-Memories"), sequence parallel through the same LASP-2 op as every linear layer.

A MoM layer (``cfg.linear.memories = M >= 2``) keeps M memories, each a recurrence of the variant
``cfg.linear.variant`` with its own key/value projections (and its own gates and ``beta``), plus
with ``cfg.linear.shared_memory`` one more memory that every token writes and reads with weight 1.
For ``x (B, N, d)``, memory ``m`` and token ``t``:

    p_t      = softmax(x_t W_r)                       (M,) router probabilities (float32)
    R_t      = top-k indices of p_t                   k = cfg.linear.memory_top_k, no gradient
    w_tm     = p_tm / sum_{j in R_t} p_tj  for m in R_t, else 0      renormalised weights
    q_t      = phi(conv(x W_q))_t                     one query, shared by every memory
    k_tm, v_tm, g_tm, beta_tm                          the variant's, from memory m's weights
    S^m_t    = A^m_t S^m_{t-1} + B^m_t   if m in R_t (or m is the shared memory), else S^m_{t-1}
    o_t      = sum_m w_tm scale q_t S^m_t  (+ scale q_t S^shared_t)
    y_t      = (RMSNorm_head(o_t) * swish(x_t W_og)) W_o          the usual output of the layer

with ``A, B`` the variant's transition and write (design §10). The short conv runs over positions
on each memory's projections (a token's ``k_tm`` sees the ``K-1`` tokens before it whatever their
routing; fla's MoM convolves each memory's routed subsequence instead, which under sequence
parallelism would need a halo of variable reach).

Exact by construction through the existing op: a memory skips a token that is not routed to it
by an identity transition and no write, ``g = 0`` and ``k = v = 0`` for the diagonal variants,
``g = 0`` and ``beta = 0`` for the delta rule. So the ``M' = M (+1)`` memories are ``M'`` times
the layer's heads in ONE ``core_attention`` call (q repeated to them; memory ``m``'s head ``h`` is
head ``m * H + h``), and LASP-2 with either exchange, the zigzag layout, packed documents, final
states and decoding (a cache of ``M' H`` states) work unchanged. The cost is that of the masked
form: every memory's projections and recurrence run for every token (``llama.flops_per_token``).

Load balancing (Switch Transformer's loss): ``L_aux = M sum_m f_m P_m`` over the tokens of the
batch, ``f_m`` the fraction of the ``k N B`` routed slots that went to memory ``m`` (no gradient)
and ``P_m`` the mean router probability of ``m``; it is 1 for perfectly even routing (Hugging
Face's ``load_balancing_loss_func``, as in fla's MoM, gives ``k`` times this). A layer sows it
(``nnx.Intermediate`` named ``AUX_NAME``) only inside ``nnx.capture`` and only when
``cfg.linear.router_aux_coef > 0``; ``forward_with_router_aux_loss`` runs the model so and
returns the mean over the MoM layers, which the training loss adds times the coefficient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.models.layers import param
from lasp_jax.models.linear_attention import LinearAttention
from lasp_jax.models.sharding_rules import Context

# The name of the sown load-balancing loss.
AUX_NAME = "router_aux_loss"
# The parameters that each memory has its own of (those the layer has): keys, values, their convs,
# the gates (GLA's and KDA's low-rank down-projection ``w_g1`` stays shared) and beta. Each is
# the plain layer's parameter with its head axis (``q_heads``) repeated per memory, memory-major.
PER_MEMORY = ("w_k", "w_v", "conv_k", "conv_v", "w_g", "w_g2", "b_g", "a_log", "w_b")


def memory_count(cfg) -> int:
  """``M'``: the routed memories plus the shared one."""
  return cfg.linear.memories + int(cfg.linear.shared_memory)


class MoMAttention(LinearAttention):
  """A Mixture-of-Memories linear layer (the module docstring): ``LinearAttention``'s pieces
  (projections, conv, feature maps, gates, ``beta``, the op, the output) on ``M'`` memories.

  Memory ``m``'s parameters are drawn as a plain layer's are (one more ``LinearAttention`` per
  memory, of which only the ``PER_MEMORY`` parameters are kept); the router ``w_router (d, M)``
  is normal(0, ``init_std``).
  """

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, layer_idx, rngs=rngs)
    mp = memory_count(cfg)
    others = [LinearAttention(cfg, layer_idx, rngs=rngs) for _ in range(mp - 1)]
    for name in PER_MEMORY:
      if not hasattr(self, name):
        continue
      mine = getattr(self, name)
      axes = mine.get_metadata()["logical_axes"]
      at = axes.index("q_heads")
      value = jnp.concatenate([mine[...]] + [getattr(o, name)[...] for o in others], axis=at)
      setattr(self, name, nnx.Param(value, logical_axes=axes))
    self.w_router = param(rngs, (cfg.d_model, cfg.linear.memories), ("embed", "memories"),
                          jnp.dtype(cfg.param_dtype), std=cfg.init_std)

  def route(self, x_BxNxD, ctx: Context):
    """``(weights (B, N, M'), written (B, N, M') bool, probs (B, N, M))`` float32: the mixing
    weights (renormalised top-k, 0 elsewhere; 1 for the shared memory), which memories each token
    writes, and the router's softmax. The top-k indices carry no gradient; the weights do."""
    lin = self.cfg.linear
    c32 = dataclasses.replace(ctx, compute_dtype=jnp.float32)
    logits = c32.einsum("bnd,dm->bnm", x_BxNxD.astype(jnp.float32),
                        c32.weight(self.w_router, ("embed", "memories")),
                        ("act_batch", "act_seq", None))
    probs = jax.nn.softmax(logits, axis=-1)
    top, idx = jax.lax.top_k(probs, lin.memory_top_k)
    idx = jax.lax.stop_gradient(idx)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(idx, lin.memories, dtype=jnp.float32)      # (B, N, k, M)
    weights = jnp.einsum("bnk,bnkm->bnm", top, onehot)
    written = jnp.sum(onehot, axis=2) > 0
    if lin.shared_memory:
      weights = jnp.concatenate([weights, jnp.ones_like(weights[..., :1])], axis=-1)
      written = jnp.concatenate([written, jnp.ones_like(written[..., :1])], axis=-1)
    return weights, written, probs

  def _core_inputs(self, q, k, v, x_BxNxD, ctx: Context):
    """The plain layer's op inputs on ``M' H`` heads, a memory's transition the identity and its
    write zero at the tokens not routed to it (the module docstring)."""
    q, k, v, g, beta, scale = super()._core_inputs(q, k, v, x_BxNxD, ctx)
    mp = memory_count(self.cfg)
    h = v.shape[2] // mp
    _, written, _ = self.route(x_BxNxD, ctx)
    on = jnp.repeat(written, h, axis=2)                                 # (B, N, M' H)
    q = jnp.tile(q, (1, 1, mp, 1))
    if g is not None:
      if g.ndim == 1:                                                   # constant per head
        g = jnp.broadcast_to(jnp.tile(g, mp), on.shape)
      g = jnp.where(on if g.ndim == 3 else on[..., None], g, 0.0)
    if beta is not None:
      beta = jnp.where(on, beta, 0.0)
    else:
      k = jnp.where(on[..., None], k, 0.0)
      v = jnp.where(on[..., None], v, 0.0)
    return q, k, v, g, beta, scale

  def _output(self, o, x_BxNxD, ctx: Context):
    """Every memory's read ``(B, N, M' H, Dv)`` mixed by the router weights, then the plain
    layer's norm, gate and projection."""
    weights, _, _ = self.route(x_BxNxD, ctx)
    bsz, n, mh, dv = o.shape
    mp = weights.shape[-1]
    o = o.reshape(bsz, n, mp, mh // mp, dv)
    o = jnp.einsum("bnmhv,bnm->bnhv", o.astype(jnp.float32), weights).astype(o.dtype)
    return super()._output(o, x_BxNxD, ctx)

  def __call__(self, x_BxNxD, ctx: Context, segment_ids_BxN=None, *, return_cache=False):
    """As ``LinearAttention.__call__``; inside ``nnx.capture`` with ``router_aux_coef > 0`` it
    also sows the load-balancing loss (``AUX_NAME``)."""
    out = super().__call__(x_BxNxD, ctx, segment_ids_BxN, return_cache=return_cache)
    # Only when captured: a plain call (a test, prefill, a jitted forward) keeps no intermediates.
    if self.cfg.linear.router_aux_coef > 0 and not return_cache and hasattr(self, "__captures__"):
      _, written, probs = self.route(x_BxNxD, ctx)
      self.sow(nnx.Intermediate, AUX_NAME,
               load_balancing_loss(probs, written[..., :self.cfg.linear.memories]))
    return out


def load_balancing_loss(probs_BxNxM, written_BxNxM):
  """Switch's ``M sum_m f_m P_m``: ``f_m`` the fraction of the routed slots (of all tokens) that
  went to memory ``m`` (no gradient), ``P_m`` the mean probability of ``m``; float32 scalar, 1
  when routing is even."""
  m = probs_BxNxM.shape[-1]
  slots = written_BxNxM.astype(jnp.float32)
  f = jnp.sum(slots, axis=(0, 1)) / jnp.maximum(jnp.sum(slots), 1.0)
  p = jnp.mean(probs_BxNxM.astype(jnp.float32), axis=(0, 1))
  return m * jnp.sum(jax.lax.stop_gradient(f) * p)


def forward_with_router_aux_loss(model, tokens_BxN, segment_ids=None):
  """``(logits, aux)``: ``model(tokens_BxN, segment_ids)`` and the mean over its MoM layers of
  their load-balancing losses (float32 scalar), or None when no layer sowed one (no MoM layer, or
  ``router_aux_coef`` 0): then it is exactly the plain forward."""
  logits, sown = nnx.capture(lambda m, t, s: m(t, s), nnx.Intermediate)(model, tokens_BxN,
                                                                        segment_ids)
  losses = [x for path, var in nnx.to_flat_state(sown) if path[-1] == AUX_NAME
            for x in jax.tree.leaves(var.get_value())]   # a tuple of the sown values
  if not losses:
    return logits, None
  return logits, sum(losses) / len(losses)


def masked_flops(cfg, mm: float, core: float) -> tuple[float, float]:
  """A MoM layer's ``(matmul weights, core FLOPs)`` per token from the plain layer's (``mm``,
  ``core`` of ``llama.flops_per_token``), in the masked form that runs: every one of the ``M'``
  memories' key/value projections, gates, ``beta``, convs and recurrences for every token (not
  the ``k + 1`` a token is routed to), plus the router ``d M`` and the mixing ``M' H Dv``."""
  variant, lin = cfg.variant, cfg.linear
  d, hk, h = cfg.d_model, cfg.num_heads, cfg.linear_value_heads
  dqk, dh = variant.qk_dim(cfg), cfg.linear_value_dim
  mp = memory_count(cfg)
  shared_low_rank = d * lin.gate_rank if variant.gate == "per_channel" else 0
  per_memory = (d * hk * dqk + d * h * dh + variant.gate_weights(cfg) - shared_low_rank
                + lin.short_conv * (hk * dqk + h * dh))
  _, dv = variant.state_dims(cfg)
  return mm + (mp - 1) * per_memory + d * lin.memories, mp * core + 2.0 * mp * h * dv
