"""A stand-in for ``lasp_jax.models`` with the same interface, used while the real models change.

One linear-attention block (LASP-2 over the ``sp`` axis) and an MLP; enough to check the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import lasp_jax
from lasp_jax.models.config import ModelConfig, get_config  # noqa: F401  (re-exported)


class StandIn(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    self.embed = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.mlp = nnx.Linear(d, d, rngs=rngs)
    self.head = nnx.Linear(d, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens_BxN):
    cfg = self.cfg
    x = jax.nn.one_hot(tokens_BxN, cfg.vocab_size) @ self.embed.embedding[...]
    B, N, D = x.shape
    H = cfg.num_heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    q, k, v = (jax.nn.silu(t).reshape(B, N, H, D // H) for t in (q, k, v))
    o = lasp_jax.lasp2_attention(q, k, v, seq_axis=cfg.seq_axis, batch_axis=cfg.batch_axes[0],
                                 causal=True, scale=(D // H) ** -0.5, chunk_size=cfg.chunk_size,
                                 layout=cfg.layout)
    x = x + self.out(o.reshape(B, N, D))
    x = x + self.mlp(jax.nn.gelu(x))
    return self.head(x).astype(jnp.float32)


def create_model(config: ModelConfig, *, mesh=None, seed: int = 0):
  return StandIn(config, rngs=nnx.Rngs(seed))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  d, v = config.d_model, config.vocab_size
  return 6.0 * (4 * d * d + d * d + d * v)
