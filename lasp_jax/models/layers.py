"""Building blocks shared by the blocks: parameters with logical axes, RMSNorm, SwiGLU, RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lasp_jax.models.sharding_rules import Context


def param(rngs: nnx.Rngs, shape, logical_axes, dtype, *, std=None, value=None) -> nnx.Param:
  """A parameter: normal(0, std) (or a constant ``value``), tagged with its logical axis names."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical_axes {logical_axes} do not match shape {shape}")
  if value is not None:
    x = jnp.full(shape, value, dtype)
  else:
    x = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(x, logical_axes=tuple(logical_axes))


def rms_norm(x, weight, eps):
  """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learnable gain (ones at init)."""

  def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.weight = param(None, (dim,), ("norm",), dtype, value=1.0)

  def __call__(self, x, ctx: Context):
    return rms_norm(x, self.weight[...], self.eps)


class SwiGLU(nnx.Module):
  """Llama FFN: ``(swish(x W_gate) * (x W_up)) W_down``."""

  def __init__(self, d_model: int, ffn_dim: int, *, std: float, dtype, rngs: nnx.Rngs):
    self.w_gate = param(rngs, (d_model, ffn_dim), ("embed", "ffn"), dtype, std=std)
    self.w_up = param(rngs, (d_model, ffn_dim), ("embed", "ffn"), dtype, std=std)
    self.w_down = param(rngs, (ffn_dim, d_model), ("ffn", "embed"), dtype, std=std)

  def __call__(self, x_BxNxD, ctx: Context):
    with jax.named_scope("swiglu"):
      act = ("act_batch", "act_seq", "act_ffn")
      gate = ctx.einsum("bnd,df->bnf", x_BxNxD, ctx.weight(self.w_gate, ("embed", "ffn")), act)
      up = ctx.einsum("bnd,df->bnf", x_BxNxD, ctx.weight(self.w_up, ("embed", "ffn")), act)
      h_BxNxF = jax.nn.silu(gate) * up
      return ctx.einsum("bnf,fd->bnd", h_BxNxF, ctx.weight(self.w_down, ("ffn", "embed")),
                        ("act_batch", "act_seq", "act_embed"))


def rope_positions(n: int, ctx: Context, layout: str):
  """True global positions ``(N,)`` of the tokens of a global array in the model's layout.

  In zigzag order over ``W`` sequence shards these are ``zigzag(arange(N), W)``; with one shard
  the zigzag order is the natural one.
  """
  pos = jnp.arange(n, dtype=jnp.int32)
  if layout == "zigzag" and ctx.seq_shards > 1:
    from lasp_jax.sequence_parallel.layout import zigzag
    pos = zigzag(pos, ctx.seq_shards, axis=0)
  return pos


def apply_rope(x_BxNxHxD, positions_N, base: float):
  """Rotary embedding (Llama-3 convention, half-split pairs): pair ``(x_i, x_{i+D/2})`` is
  rotated by angle ``p * base**(-2i/D)`` at true global position ``p``. Computed in float32."""
  d = x_BxNxHxD.shape[-1]
  if d % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {d}")
  inv_freq = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  ang_NxF = positions_N.astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(ang_NxF)[None, :, None, :]
  sin = jnp.sin(ang_NxF)[None, :, None, :]
  x = x_BxNxHxD.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxNxHxD.dtype)
