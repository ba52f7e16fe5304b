"""One token of the linear recurrence: the decode step of every linear layer (design §14).

Diagonal family:  ``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t``;  delta rule (design §11):
``S_t = (I - beta_t k_t^T k_t) diag(exp g_t) S_{t-1} + beta_t k_t^T v_t``;  both ``o_t = scale q_t S_t``.

The delta step is the diagonal step with the values replaced by ``u_t = beta_t (v_t - k_t S')``,
``S' = diag(exp g_t) S_{t-1}`` (the same identity as the chunked WY form), so one function serves
both. Everything is computed in float32 at HIGHEST matmul precision: a decode loop compounds any
rounding of the state over every generated token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.kernels._checks import check_float_array
from lasp_jax.kernels.linear_attention.api import check_scale

_HIGHEST = jax.lax.Precision.HIGHEST


def _decay_factor(log_decay, bsz, h, dk):
  """``exp(g)`` broadcastable against the state ``(B, H, Dk, Dv)``."""
  allowed = {1: (h,), 2: (bsz, h), 3: (bsz, h, dk)}
  if allowed.get(log_decay.ndim) != tuple(log_decay.shape):
    raise ValueError(f"log_decay must have shape (H,)={(h,)}, (B, H)={(bsz, h)} or "
                     f"(B, H, Dk)={(bsz, h, dk)}, got {tuple(log_decay.shape)}")
  if not jnp.issubdtype(log_decay.dtype, jnp.floating):
    raise TypeError(f"log_decay must be a float array, got dtype {log_decay.dtype}")
  a = jnp.exp(log_decay.astype(jnp.float32))
  if a.ndim == 1:
    return a[None, :, None, None]
  return a[:, :, None, None] if a.ndim == 2 else a[..., None]


def recurrent_step(state_BxHxKxV, q_BxHxK, k_BxHxK, v_BxHxV, log_decay=None, *, beta=None,
                   scale=1.0):
  """One step of the causal recurrence for one token per row.

  Args:
    state_BxHxKxV: the state before the token, ``(B, H, Dk, Dv)`` (float32 is kept float32).
    q_BxHxK, k_BxHxK: ``(B, H, Dk)``; v_BxHxV: ``(B, H, Dv)``; float.
    log_decay: None, ``(H,)``, ``(B, H)`` or ``(B, H, Dk)``, entries in ``[-inf, 0]``.
    beta: None (diagonal family) or ``(B, H)``: the delta rule.
    scale: multiplies q; None means ``Dk ** -0.5``.

  Returns:
    ``(o (B, H, Dv) in q's dtype, new state (B, H, Dk, Dv) float32)``.
  """
  for name, x, rank in (("state", state_BxHxKxV, 4), ("q", q_BxHxK, 3), ("k", k_BxHxK, 3),
                        ("v", v_BxHxV, 3)):
    check_float_array(name, x, "(B, H, Dk, Dv)" if rank == 4 else "(B, H, D)")
  bsz, h, dk, dv = state_BxHxKxV.shape
  for name, x, want in (("q", q_BxHxK, (bsz, h, dk)), ("k", k_BxHxK, (bsz, h, dk)),
                        ("v", v_BxHxV, (bsz, h, dv))):
    if tuple(x.shape) != want:
      raise ValueError(f"{name} must have shape {want} to match the state "
                       f"{tuple(state_BxHxKxV.shape)}, got {tuple(x.shape)}")
  check_scale(scale)
  scale = dk ** -0.5 if scale is None else scale
  s = state_BxHxKxV.astype(jnp.float32)
  if log_decay is not None:
    s = _decay_factor(log_decay, bsz, h, dk) * s
  k32, v32 = k_BxHxK.astype(jnp.float32), v_BxHxV.astype(jnp.float32)
  if beta is not None:
    if tuple(beta.shape) != (bsz, h):
      raise ValueError(f"beta must have shape (B, H)={(bsz, h)}, got {tuple(beta.shape)}")
    recalled = jnp.einsum("bhk,bhkv->bhv", k32, s, precision=_HIGHEST)
    v32 = beta.astype(jnp.float32)[..., None] * (v32 - recalled)
  s = s + k32[..., :, None] * v32[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q_BxHxK.astype(jnp.float32), s, precision=_HIGHEST)
  return o.astype(q_BxHxK.dtype), s
