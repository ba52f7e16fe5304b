"""The softmax-attention layer of a hybrid: Llama-3 style, RoPE at true global positions (or
positions within packed documents), GQA; Qwen3.5's options (q/k norm, partial rotary, output gate).

    q = RoPE(norm(x W_q)), k = RoPE(norm(x W_k))      (B, N, H, D), (B, N, Hkv, D)
    v = x W_v                                           (B, N, Hkv, D)
    o = softmax(q k^T / sqrt(D) + causal mask) v       LASP-2H over the mesh, or one device
    o = o * sigmoid(x W_gate)                           with softmax.output_gate
    y = o W_o

``norm`` is a per-head RMSNorm with ``softmax.qk_norm`` (else the identity); RoPE rotates the
first ``softmax.rotary_fraction`` of each head's dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.kernels.attention.decode import decode_attention
from lasp_jax.models.cache import AttentionCache
from lasp_jax.models.layers import apply_rope, param, rms_norm
from lasp_jax.models.sharding_rules import Context


def core_softmax(q, k, v, *, cfg, ctx: Context, segment_ids=None, return_kv=False):
  """Causal GQA attention: LASP-2H when the mesh has the sequence axis, else one device. With
  ``segment_ids (B, N)`` a query sees only keys of its own document (equal ids). ``return_kv``
  (inference): also ``(k, v)`` of the whole sequence in the layout's order; under LASP-2H they
  come replicated from its one all-gather."""
  scale = q.shape[-1] ** -0.5
  if ctx.sequence_parallel:
    from lasp_jax.sequence_parallel.lasp2h import lasp2h_attention
    out = lasp2h_attention(q, k, v, seq_axis=cfg.runtime.seq_axis, batch_axis=ctx.batch_axis,
                           causal=True, scale=scale, segment_ids=segment_ids, layout=cfg.runtime.layout,
                           return_kv=return_kv)
    return (out[0], (out[1][0], out[1][1])) if return_kv else out
  # One device: positions are 0..N-1 in storage order (zigzag over one shard is the identity).
  # The same flash kernel as LASP-2H, not jax.nn.dot_product_attention: on CPU the latter builds
  # the (B, H, N, N) scores (8192 tokens: 3.0 GiB of temporaries for the 1/4 hybrid's prefill,
  # 64K: 192 GiB), and with segment ids it would need a dense mask as well.
  from lasp_jax.kernels.attention import flash
  o = flash.flash_attention(q, k, v, causal=True, scale=scale, q_segment_ids=segment_ids,
                            kv_segment_ids=segment_ids)
  return (o, (k, v)) if return_kv else o


class SoftmaxAttention(nnx.Module):
  """Llama-3 attention block (see the module docstring): ``cfg.softmax_heads`` query heads,
  ``cfg.kv_heads`` key/value heads of ``cfg.softmax_head_dim``."""

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layer_idx = layer_idx
    d, h, hkv, dh = cfg.d_model, cfg.softmax_heads, cfg.kv_heads, cfg.softmax_head_dim
    dt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    self.w_q = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt, std=std)
    self.w_k = param(rngs, (d, hkv, dh), ("embed", "kv_heads", "head_dim"), dt, std=std)
    self.w_v = param(rngs, (d, hkv, dh), ("embed", "kv_heads", "head_dim"), dt, std=std)
    self.w_o = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), dt, std=std)
    if cfg.softmax.output_gate:
      self.w_gate = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dt, std=std)
    if cfg.softmax.qk_norm:
      gain = 0.0 if cfg.norm.zero_centered else 1.0
      self.q_norm = param(None, (dh,), ("norm",), dt, value=gain)
      self.k_norm = param(None, (dh,), ("norm",), dt, value=gain)

  def _project(self, x_BxNxD, ctx: Context, positions):
    """q ``(B, N, H, D)``, k, v ``(B, N, Hkv, D)``; the q/k norm, then RoPE on q and k at
    ``positions``."""
    cfg = self.cfg
    heads = ("act_batch", "act_seq", "act_heads", None)
    q = ctx.einsum("bnd,dhk->bnhk", x_BxNxD,
                   ctx.weight(self.w_q, ("embed", "q_heads", "head_dim")), heads)
    k = ctx.einsum("bnd,dhk->bnhk", x_BxNxD,
                   ctx.weight(self.w_k, ("embed", "kv_heads", "head_dim")), heads)
    v = ctx.einsum("bnd,dhk->bnhk", x_BxNxD,
                   ctx.weight(self.w_v, ("embed", "kv_heads", "head_dim")), heads)
    if cfg.softmax.qk_norm:
      eps, zc = cfg.norm.eps, cfg.norm.zero_centered
      q = rms_norm(q, self.q_norm[...], eps, zc)
      k = rms_norm(k, self.k_norm[...], eps, zc)
    rotary = int(cfg.softmax_head_dim * cfg.softmax.rotary_fraction)
    return (apply_rope(q, positions, cfg.softmax.rope_base, rotary),
            apply_rope(k, positions, cfg.softmax.rope_base, rotary), v)

  def _output(self, o, x_BxNxD, ctx: Context):
    o = ctx.constrain(o, ("act_batch", "act_seq", "act_heads", None))
    if self.cfg.softmax.output_gate:
      gate = ctx.einsum("bnd,dhk->bnhk", x_BxNxD,
                        ctx.weight(self.w_gate, ("embed", "q_heads", "head_dim")),
                        ("act_batch", "act_seq", "act_heads", None))
      o = o * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(o.dtype)
    return ctx.einsum("bnhk,hkd->bnd", o, ctx.weight(self.w_o, ("q_heads", "head_dim", "embed")),
                      ("act_batch", "act_seq", "act_embed"))

  def __call__(self, x_BxNxD, ctx: Context, positions, segment_ids_BxN=None, *,
               return_cache=False):
    """``positions``: RoPE positions, ``(N,)`` or ``(B, N)`` (within packed documents).
    ``return_cache``: also ``(k, v)`` (B, N, Hkv, D) of the whole sequence, in the layout of x,
    for a decode cache (under sequence parallelism: replicated, from LASP-2H's gather)."""
    with jax.named_scope("softmax_attention"):
      q, k, v = self._project(x_BxNxD, ctx, positions)
      out = core_softmax(q, k, v, cfg=self.cfg, ctx=ctx, segment_ids=segment_ids_BxN,
                         return_kv=return_cache)
      o, kv = out if return_cache else (out, None)
      y = self._output(o, x_BxNxD, ctx)
    return (y, kv) if return_cache else y

  def decode(self, x_Bx1xD, cache: AttentionCache, ctx: Context, position):
    """One token at ``position`` (int32 scalar, the number of cached tokens): its K, V go into
    slot ``position`` and its query reads slots ``0 .. position``. ``(y (B, 1, D), cache)``."""
    with jax.named_scope("softmax_attention_decode"):
      q, k, v = self._project(x_Bx1xD, ctx, position[None])
      k_cache = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), position, 1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), position, 1)
      o = decode_attention(q[:, 0], k_cache, v_cache, position + 1)
      return self._output(o[:, None], x_Bx1xD, ctx), AttentionCache(k_cache, v_cache)
