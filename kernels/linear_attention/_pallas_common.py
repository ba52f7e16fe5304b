"""What the TPU and GPU Pallas kernels share: per-chunk math, decay handling, the custom_vjp.

The kernels see the clamped per-token log-decay ``g`` (``reference.clamp_log_decay``: finite, in
``[LOG_DECAY_FLOOR, 0]``, NaN passed through) and build every decay factor of a chunk of ``c``
tokens from *direct* sums of its log-decays (:func:`chunk_decay`; SPEC sections 3 and 10):

    W_ij = e^{sum_{j<l<=i} g_l} [i >= j]     qd_i = e^{b_i}, b_i = sum_{l<=i} g_l
    kd_j = e^{sum_{l>j} g_l}                 a = e^{sum_l g_l}

``sum_{j<l<=i} g_l`` is the matmul ``(L * g) @ U`` of exact 0/1 triangles (``L_il = [l <= i]``,
``U_lj = [l > j]``) at float32 HIGHEST precision, never ``b_i - b_j``: that difference cancels once
one gate is very negative (``-1e9`` swamps the mild gates around it) and is NaN for ``-inf``.
Per chunk, with incoming state ``S``:

    o     = scale * ([(q k^T) * W] v + (q * qd) S)
    S_new = a S + (k * kd)^T v

The triangular mask is a selection inside every tile (a non-finite later key or value never reaches
an earlier row through a zero weight; a non-finite ``v`` is kept out of the ``[...] v`` matmul and
marked NaN from its position on, ``reference.mask_nonfinite_values``).

Backward (two kernels, both recompute rather than store per-chunk states):
- ``dq`` runs forward over chunks re-building ``S``:  dq = scale ([(dO v^T) * W] k + qd (dO S^T)).
- ``dk, dv`` run backward over chunks carrying ``dS`` (the cotangent of the state after a chunk):
      dv = scale [(q k^T) * W]^T dO + (k * kd) dS
      dk = scale [(dO v^T) * W]^T q + kd (v dS^T)
      dS <- a dS + scale (q * qd)^T dO          (dS after chunk 0 is d initial_state)
- The decay gradient needs no kernel: the op depends on the global cumulative log-decay ``B`` only
  through ``q_i e^{B_i}``, ``k_j e^{-B_j}`` and the factor ``e^{B_N}`` of the final state, so
  ``dL/dB_i = q_i.dq_i - k_i.dk_i (+ <S_N, dS_N> at i = N)`` and ``dg_t = sum_{i >= t} dL/dB_i``
  (an identity of the exact function; nothing here is exponentiated). Below the floor the clamp
  makes it 0 (-inf included), the exact value.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kernels.linear_attention import reference as ref

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the kernels.

  Attributes:
    chunk_size: tokens per chunk (the sequential step; ``c`` above).
    block_k: key channels per program of the GPU ``dq`` kernel (None: all of Dk).
    block_v: value channels per program of the GPU forward kernel (None: all of Dv).
    num_warps, num_stages: Triton launch parameters (GPU only; None lets the backend choose).
    split_backward: GPU only: compute dk (grid over Dk blocks) and dv (grid over Dv blocks) in
      two kernels with a slice of ``dS`` each, instead of one kernel holding all of ``dS``: more
      programs and fewer registers per program, for more re-reads of the inputs.
  """
  chunk_size: int = 64
  block_k: int | None = None
  block_v: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  split_backward: bool = False


class Decay(NamedTuple):
  """Decay factors of one chunk, each ``exp`` of a direct sum of its log-decays (module docstring).

  ``weights``: ``(c, c)``, ``W_ij`` (exact 0 above the diagonal); ``q_scale``: ``(c, 1)``,
  ``e^{b_i}``; ``k_scale``: ``(c, 1)``, ``e^{sum_{l>j} g_l}``; ``chunk``: ``(1, 1)``, ``e^{sum g}``.
  """
  weights: jax.Array
  q_scale: jax.Array
  k_scale: jax.Array
  chunk: jax.Array


def chunk_decay(g_row):
  """:class:`Decay` of a chunk from its clamped log-decays ``g_row (1, c)`` float32 (lanes).

  Masks from iota, sums along lanes and one 0/1 matmul: no cumsum, no relayout, no unaligned
  slice (what Mosaic and Triton both lower). Each factor is exact to float32 for any gates.
  """
  c = g_row.shape[-1]
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  upto = jnp.where(cols <= rows, g_row, 0.0)          # [i, l] = g_l for l <= i
  after = jnp.where(cols > rows, g_row, 0.0)          # [j, l] = g_l for l > j
  # [i, j] = sum_l [l <= i] g_l [l > j]: exact 0/1 operand, HIGHEST (TPU would round g to bf16).
  log_w = jax.lax.dot_general(upto, (rows > cols).astype(F32), (((1,), (0,)), ((), ())),
                              precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)
  mask = rows >= cols
  return Decay(weights=jnp.where(mask, jnp.exp(jnp.where(mask, log_w, 0.0)), 0.0),
               q_scale=jnp.exp(jnp.sum(upto, axis=1, keepdims=True)),
               k_scale=jnp.exp(jnp.sum(after, axis=1, keepdims=True)),
               chunk=jnp.exp(jnp.sum(g_row, axis=1, keepdims=True)))


def causal_mask(c):
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return rows >= cols


def _mm(a, b, contract, dtype):
  """Matmul on the MXU / tensor cores: operands in ``dtype``, float32 accumulation.

  ``contract`` names the contracted dims: "nn" a @ b, "nt" a @ b^T, "tn" a^T @ b. Float32 operands
  ask for full precision (TPU would use bf16 passes, Triton TF32, by default).
  """
  dims = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}[contract]
  precision = jax.lax.Precision.HIGHEST if dtype == F32 else None
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                             precision=precision, preferred_element_type=F32)


def _weights(scores, decay, mask):
  """``scores * W``, masked by selection (a NaN above the diagonal must not survive as 0 * NaN)."""
  return jnp.where(mask, scores if decay is None else scores * decay.weights, 0.0)


def _scaled_rows(x, scale_col):
  return x.astype(F32) if scale_col is None else x.astype(F32) * scale_col


def _decayed_keys(k, decay):
  return _scaled_rows(k, None if decay is None else decay.k_scale)


def _decayed_queries(q, decay):
  return _scaled_rows(q, None if decay is None else decay.q_scale)


def _decay_state(s, decay):
  return s if decay is None else decay.chunk * s


def _state_step(s, k, v, decay, dtype):
  """``S_new = a S + (k * kd)^T v``."""
  return _mm(_decayed_keys(k, decay), v, "tn", dtype) + _decay_state(s, decay)


def forward_chunk(q, k, v, s, decay, *, scale, dtype):
  """One chunk forward: returns ``(o (c, Dv') f32, S_new)``; ``v``/``s`` may be a Dv slice."""
  c = q.shape[0]
  mask = causal_mask(c)
  a = _weights(_mm(q, k, "nt", dtype), decay, mask)
  o = scale * (_mm(a, ref.finite_values(v), "nn", dtype)
               + _mm(_decayed_queries(q, decay), s, "nn", dtype))
  return ref.mask_nonfinite_values(o, v, axis=0), _state_step(s, k, v, decay, dtype)


def dq_chunk(k, v, do, s, decay, *, scale, dtype):
  """One chunk of the ``dq`` pass: ``(dq (c, Dk') f32, S_new)``; ``k``/``s`` may be a Dk slice."""
  c = do.shape[0]
  mask = causal_mask(c)
  da = _weights(_mm(do, v, "nt", dtype), decay, mask)
  inter = _mm(do, s, "nt", dtype)
  if decay is not None:
    inter = inter * decay.q_scale
  dq = scale * (_mm(da, k, "nn", dtype) + inter)
  return dq, _state_step(s, k, v, decay, dtype)


def _dk_and_ds(q, v, do, ds, da, decay, *, scale, dtype):
  """``dk = scale da^T q + kd (v dS^T)`` and ``dS`` before the chunk: ``a dS + scale (q qd)^T dO``.
  """
  dk_state = _mm(v, ds, "nt", dtype)
  if decay is not None:
    dk_state = dk_state * decay.k_scale
  dk = scale * _mm(da, q, "tn", dtype) + dk_state
  ds_prev = scale * _mm(_decayed_queries(q, decay), do, "tn", dtype) + _decay_state(ds, decay)
  return dk, ds_prev


def dkv_chunk(q, k, v, do, ds, decay, *, scale, dtype):
  """One chunk of the reverse ``dk, dv`` pass: returns ``(dk, dv, dS before the chunk)``."""
  c = q.shape[0]
  mask = causal_mask(c)
  a = _weights(_mm(q, k, "nt", dtype), decay, mask)
  da = _weights(_mm(do, v, "nt", dtype), decay, mask)
  dv = scale * _mm(a, do, "tn", dtype) + _mm(_decayed_keys(k, decay), ds, "nn", dtype)
  dk, ds_prev = _dk_and_ds(q, v, do, ds, da, decay, scale=scale, dtype=dtype)
  return dk, dv, ds_prev


def dk_chunk(q, v, do, ds, decay, *, scale, dtype):
  """Reverse pass for a Dk slice: ``q``/``ds`` hold channels ``kb`` (``ds (bk, Dv)``, its rows).

  Returns ``(dk[:, kb], dS[kb, :] before the chunk)``; k is not needed.
  """
  mask = causal_mask(q.shape[0])
  da = _weights(_mm(do, v, "nt", dtype), decay, mask)
  return _dk_and_ds(q, v, do, ds, da, decay, scale=scale, dtype=dtype)


def dv_chunk(q, k, do, ds, decay, *, scale, dtype):
  """Reverse pass for a Dv slice: ``do``/``ds`` hold channels ``vb`` (``ds (Dk, bv)``, its columns).

  Returns ``(dv[:, vb], dS[:, vb] before the chunk)``; v is not needed.
  """
  mask = causal_mask(q.shape[0])
  a = _weights(_mm(q, k, "nt", dtype), decay, mask)
  dv = scale * _mm(a, do, "tn", dtype) + _mm(_decayed_keys(k, decay), ds, "nn", dtype)
  ds_prev = scale * _mm(_decayed_queries(q, decay), do, "tn", dtype) + _decay_state(ds, decay)
  return dv, ds_prev


# ---------------------------------------------------------------- XLA-side glue around the kernels


def per_token_decay(log_decay, batch, seq_len, heads):
  """None, ``(H,)`` or ``(B, N, H)`` -> None or float32 ``(B, N, H)``, clamped to
  ``reference.LOG_DECAY_FLOOR`` (so -inf, a reset, is finite inside the kernels)."""
  if log_decay is None:
    return None
  g = ref.clamp_log_decay(log_decay)
  if g.ndim == 1:
    g = jnp.broadcast_to(g[None, None, :], (batch, seq_len, heads))
  return g


def decay_grad(q, k, dq, dk, s_final, ds_final):
  """``dg (B, N, H)`` from the gradients of q and k (see the module docstring)."""
  db = (jnp.sum(q.astype(F32) * dq.astype(F32), axis=-1)
        - jnp.sum(k.astype(F32) * dk.astype(F32), axis=-1))                 # (B, N, H)
  db = db.at[:, -1].add(jnp.sum(s_final * ds_final, axis=(-2, -1)))
  return jnp.flip(jnp.cumsum(jnp.flip(db, 1), axis=1), 1)


@dataclasses.dataclass(frozen=True)
class Config:
  """A backend's three pallas_call builders and their static parameters (hashable).

  ``forward(q, k, v, g, s0, cfg) -> (o, s_final)``; ``dq(k, v, do, g, s0, cfg) -> dq``;
  ``dkv(q, k, v, do, g, ds_final, cfg) -> (dk, dv, ds0)``. ``g`` is None or the clamped per-token
  ``(B, N, H)`` float32 log-decay (each kernel sums it per chunk, :func:`chunk_decay`). Gradients
  of q, k come back in float32 when there is a decay (the decay gradient is built from them), else
  in the input dtype.
  """
  forward: Callable
  dq: Callable
  dkv: Callable
  block_sizes: BlockSizes
  scale: float
  interpret: object   # bool, or pltpu.InterpretParams (hashable) for the TPU kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def linear_attention_vjp(q, k, v, g, s0, cfg: Config):
  """``(o, s_final)`` through ``cfg``'s kernels; ``g`` None or clamped per-token ``(B, N, H)``
  float32 log-decays."""
  return _fwd(q, k, v, g, s0, cfg)[0]


def _fwd(q, k, v, g, s0, cfg):
  o, s_final = cfg.forward(q, k, v, g, s0, cfg)
  return (o, s_final), (q, k, v, g, s0, s_final)


def _bwd(cfg, res, cotangents):
  q, k, v, g, s0, s_final = res
  do, ds_final = cotangents
  do = do.astype(q.dtype)
  ds_final = ds_final.astype(F32)
  dq = cfg.dq(k, v, do, g, s0, cfg)
  dk, dv, ds0 = cfg.dkv(q, k, v, do, g, ds_final, cfg)
  dg = None if g is None else decay_grad(q, k, dq, dk, s_final, ds_final)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0)


linear_attention_vjp.defvjp(_fwd, _bwd)


def run(q, k, v, log_decay, initial_state, cfg: Config):
  """Shared entry of both backends: brings decay and state to kernel form, calls the custom_vjp."""
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"the Pallas kernels take q, k, v all float32 or all bfloat16, got "
                    f"{q.dtype}, {k.dtype}, {v.dtype}")
  if log_decay is not None and log_decay.ndim == 4:
    raise ValueError("the Pallas kernels take a decay of shape (H,) or (B, N, H); the per-channel "
                     f"form {tuple(log_decay.shape)} goes to the XLA path (api.py does that)")
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  if n % cfg.block_sizes.chunk_size:
    raise ValueError(f"sequence length N={n} is not a multiple of "
                     f"chunk_size={cfg.block_sizes.chunk_size}")
  g = per_token_decay(log_decay, bsz, n, h)
  s0 = (jnp.zeros((bsz, h, dk, dv), F32) if initial_state is None
        else initial_state.astype(F32))
  return linear_attention_vjp(q, k, v, g, s0, cfg)
