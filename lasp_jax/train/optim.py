"""The optimiser: AdamW, linear warmup then cosine decay, global-norm clipping (paper defaults)."""

from __future__ import annotations

import jax
import optax

from lasp_jax.train.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """0 -> ``lr`` linearly over ``warmup_steps``, then cosine to ``lr * end_lr_ratio`` at the end."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices only: not on norms' scales, biases or other vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def build(cfg: OptimConfig, total_steps: int
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(tx, lr_schedule)``; ``tx`` takes the mean gradient of one optimiser step."""
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), lr
