"""Independent float64 references, one per semantics, shared by every test of that semantics.

- ``linear_recurrence``: design §2, token by token (the ground truth of every linear op).
- ``softmax_attention``: dense float64 softmax attention with GQA, causal and segment masks.

Both are written in jnp so that gradients come from float64 autodiff; call them under
``jax.enable_x64(True)`` (``f64`` does that and converts inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def f64(fn, *args, **kwargs):
  """Runs ``fn`` in float64 on float64 copies of the array arguments; returns numpy arrays."""
  def conv(a):
    return a if a is None or not hasattr(a, "shape") else jnp.asarray(np.asarray(a, np.float64))

  with jax.enable_x64(True):
    out = fn(*map(conv, args), **{key: conv(a) for key, a in kwargs.items()})
    return jax.tree.map(np.asarray, out)


def linear_recurrence(q, k, v, log_decay=None, *, scale=1.0, initial_state=None, causal=True,
                      segment_ids=None):
  """``S_i = diag(exp g_i) S_{i-1} + k_i^T v_i``, ``o_i = scale * q_i S_i`` (design §2).

  Shapes as design §1. Returns ``(o, final_state)``. Bidirectional: ``o_i = scale q_i sum_j k_j^T v_j``.
  ``segment_ids (B, N)`` (design §13): at a token whose id differs from the previous token's
  the state before it is dropped, ``S_i = k_i^T v_i`` (a select, so nothing of it survives).
  """
  if not causal:
    s = jnp.einsum("bnhk,bnhv->bhkv", k, v)
    return scale * jnp.einsum("bnhk,bhkv->bnhv", q, s), s
  a, starts, s0 = _recurrence_inputs(q, v, log_decay, initial_state, segment_ids)

  def step(s, xs):
    a_i, q_i, k_i, v_i, start_i = xs
    s = jnp.where(start_i[:, None, None, None], 0.0, a_i[..., None] * s)
    s = s + k_i[..., :, None] * v_i[..., None, :]
    return s, scale * jnp.einsum("bhk,bhkv->bhv", q_i, s)

  s_final, o = jax.lax.scan(
      step, s0, (a, *(jnp.moveaxis(x, 1, 0) for x in (q, k, v)), jnp.asarray(starts)))
  return jnp.moveaxis(o, 0, 1), s_final


def _recurrence_inputs(q, v, log_decay, initial_state, segment_ids):
  """Token-major decays ``a (N, B, H, Dk)`` = exp(g), document starts ``(N, B)`` (a plain
  comparison of neighbouring ids) and the initial state, for the token-by-token references."""
  bsz, n, h, dk = q.shape
  if log_decay is None:
    a = jnp.ones((n, bsz, h, dk), q.dtype)
  elif log_decay.ndim == 1:
    a = jnp.broadcast_to(jnp.exp(log_decay)[None, None, :, None], (n, bsz, h, dk))
  elif log_decay.ndim == 3:
    a = jnp.broadcast_to(jnp.exp(jnp.moveaxis(log_decay, 1, 0))[..., None], (n, bsz, h, dk))
  else:
    a = jnp.exp(jnp.moveaxis(log_decay, 1, 0))
  s0 = (jnp.zeros((bsz, h, dk, v.shape[-1]), q.dtype) if initial_state is None
        else initial_state)
  starts = np.zeros((n, bsz), bool)
  if segment_ids is not None:
    ids = np.asarray(segment_ids)
    starts[1:] = (ids[:, 1:] != ids[:, :-1]).T
  return a, starts, s0


def softmax_attention(q, k, v, *, causal=True, scale=None, segment_ids=None, q_positions=None,
                      kv_positions=None):
  """Dense softmax attention. ``q: (B, N, H, D)``, ``k, v: (B, M, Hkv, D)`` with ``H % Hkv == 0``.

  Positions default to ``arange``; a query at position i sees keys at positions <= i (causal) in
  the same segment. Rows with no visible key give 0.
  """
  bsz, n, h, d = q.shape
  m, hkv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  rep = h // hkv
  k = jnp.repeat(k, rep, axis=2)
  v = jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale
  mask = jnp.ones((bsz, 1, n, m), bool)
  qp = jnp.arange(n) if q_positions is None else q_positions
  kp = jnp.arange(m) if kv_positions is None else kv_positions
  if causal:
    mask = mask & (qp[:, None] >= kp[None, :])[None, None]
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  s = jnp.where(mask, s, -jnp.inf)
  smax = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(smax), smax, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhnm,bmhd->bnhd", p, v)


def rel_err(x, ref):
  """max |x - ref| / max |ref| (a scalar), in float64."""
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def causal_conv1d(x, weight, bias=None, *, activation=None, segment_ids=None):
  """Depthwise causal conv1d, ``y_t = act(bias + sum_j w[j] x_{t-(K-1)+j})`` (design §12).

  ``x (B, N, C)`` in natural order, ``weight (K, C)``. A tap reaching before token 0 or before the
  start of token t's document (the last position <= t whose id differs from its predecessor's,
  found by a plain scan of ``segment_ids``) is zero. jnp, so gradients come from autodiff.
  """
  bsz, n, _ = x.shape
  k = weight.shape[0]
  ids = None if segment_ids is None else np.asarray(segment_ids)
  doc_start = np.zeros((bsz, n), np.int64)
  for b in range(bsz):
    start = 0
    for t in range(n):
      if ids is not None and t > 0 and ids[b, t] != ids[b, t - 1]:
        start = t
      doc_start[b, t] = start
  y = jnp.zeros(x.shape, x.dtype) if bias is None else jnp.broadcast_to(bias, x.shape)
  t = np.arange(n)
  for j in range(k):
    src = t - (k - 1) + j                                         # the token tap j reads
    ok = (src[None, :] >= doc_start) & (src[None, :] >= 0)        # (B, N)
    tap = jnp.take(x, np.clip(src, 0, n - 1), axis=1)
    y = y + jnp.where(ok[..., None], tap, 0.0) * weight[j]
  return jax.nn.silu(y) if activation == "silu" else y


def delta_recurrence(q, k, v, beta, log_decay=None, *, scale=1.0, initial_state=None,
                     segment_ids=None):
  """``S_i = (I - beta_i k_i^T k_i) diag(exp g_i) S_{i-1} + beta_i k_i^T v_i``, ``o_i = scale q_i S_i``
  (design §11), token by token; ``beta (B, N, H)``, decays and ``segment_ids`` as
  :func:`linear_recurrence`. Returns ``(o, final_state)``.

  Written as fla's naive recurrence: decay the state, then the delta update
  ``v'_i = beta_i (v_i - S^T k_i)``, ``S += k_i v'_i^T``.
  """
  a, starts, s0 = _recurrence_inputs(q, v, log_decay, initial_state, segment_ids)

  def step(s, xs):
    a_i, q_i, k_i, v_i, b_i, start_i = xs
    s = jnp.where(start_i[:, None, None, None], 0.0, a_i[..., None] * s)
    v_new = b_i[..., None] * (v_i - jnp.einsum("bhkv,bhk->bhv", s, k_i))
    s = s + k_i[..., :, None] * v_new[..., None, :]
    return s, scale * jnp.einsum("bhk,bhkv->bhv", q_i, s)

  s_final, o = jax.lax.scan(
      step, s0, (a, *(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta)), jnp.asarray(starts)))
  return jnp.moveaxis(o, 0, 1), s_final
