"""What the TPU and GPU Pallas kernels share: per-chunk math, decay handling, the custom_vjp.

The kernels only ever see a *chunk-local* inclusive cumulative log-decay ``b`` (restarted at every
chunk, so every exponent is a sum of at most ``chunk_size`` log-decays) and compute, per chunk of
``c`` tokens with incoming state ``S`` (SPEC section 3):

    o     = scale * ([(q k^T) * D] v + (q * e^b) S)          D_ij = e^{b_i - b_j} [i >= j]
    S_new = e^{b_last} S + (k * e^{b_last - b})^T v

The triangular mask is applied inside every tile, before the exponent is taken (no inf * 0).

Backward (two kernels, both recompute rather than store per-chunk states):
- ``dq`` runs forward over chunks re-building ``S``:  dq = scale ([(dO v^T) * D] k + e^b (dO S^T)).
- ``dk, dv`` run backward over chunks carrying ``dS`` (the cotangent of the state after a chunk):
      dv = scale [(q k^T) * D]^T dO + (k * e^{b_last - b}) dS
      dk = scale [(dO v^T) * D]^T q + e^{b_last - b} (v dS^T)
      dS <- e^{b_last} dS + scale (q * e^b)^T dO          (dS after chunk 0 is d initial_state)
- The decay gradient needs no kernel: the op depends on the global cumulative log-decay ``B`` only
  through ``q_i e^{B_i}``, ``k_j e^{-B_j}`` and the factor ``e^{B_N}`` of the final state, so
  ``dL/dB_i = q_i.dq_i - k_i.dk_i (+ <S_N, dS_N> at i = N)`` and ``dg_t = sum_{i >= t} dL/dB_i``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

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
  """Chunk-local cumulative log-decay of one chunk, in the forms the math needs.

  ``col``: ``(c, 1)``; ``row``: broadcastable to ``(c, c)`` with ``row[.., j] = b_j``;
  ``last``: broadcastable to ``(1, 1)``, ``b`` at the chunk's last token.
  """
  col: jax.Array
  row: jax.Array
  last: jax.Array


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
  """``scores * D`` with the triangular mask applied before any exponent."""
  if decay is None:
    return jnp.where(mask, scores, 0.0)
  diff = jnp.where(mask, decay.col - decay.row, 0.0)
  return jnp.where(mask, scores * jnp.exp(diff), 0.0)


def _decayed_keys(k, decay):
  return k.astype(F32) if decay is None else k.astype(F32) * jnp.exp(decay.last - decay.col)


def _decay_state(s, decay):
  return s if decay is None else jnp.exp(decay.last) * s


def _state_step(s, k, v, decay, dtype):
  """``S_new = e^{b_last} S + (k * e^{b_last - b})^T v``."""
  return _mm(_decayed_keys(k, decay), v, "tn", dtype) + _decay_state(s, decay)


def forward_chunk(q, k, v, s, decay, *, scale, dtype):
  """One chunk forward: returns ``(o (c, Dv') f32, S_new)``; ``v``/``s`` may be a Dv slice."""
  c = q.shape[0]
  mask = causal_mask(c)
  a = _weights(_mm(q, k, "nt", dtype), decay, mask)
  q_dec = q.astype(F32) if decay is None else q.astype(F32) * jnp.exp(decay.col)
  o = scale * (_mm(a, v, "nn", dtype) + _mm(q_dec, s, "nn", dtype))
  return o, _state_step(s, k, v, decay, dtype)


def dq_chunk(k, v, do, s, decay, *, scale, dtype):
  """One chunk of the ``dq`` pass: ``(dq (c, Dk') f32, S_new)``; ``k``/``s`` may be a Dk slice."""
  c = do.shape[0]
  mask = causal_mask(c)
  da = _weights(_mm(do, v, "nt", dtype), decay, mask)
  inter = _mm(do, s, "nt", dtype)
  if decay is not None:
    inter = inter * jnp.exp(decay.col)
  dq = scale * (_mm(da, k, "nn", dtype) + inter)
  return dq, _state_step(s, k, v, decay, dtype)


def dkv_chunk(q, k, v, do, ds, decay, *, scale, dtype):
  """One chunk of the reverse ``dk, dv`` pass: returns ``(dk, dv, dS before the chunk)``."""
  c = q.shape[0]
  mask = causal_mask(c)
  a = _weights(_mm(q, k, "nt", dtype), decay, mask)
  da = _weights(_mm(do, v, "nt", dtype), decay, mask)
  k_dec = _decayed_keys(k, decay)
  dv = scale * _mm(a, do, "tn", dtype) + _mm(k_dec, ds, "nn", dtype)
  dk_state = _mm(v, ds, "nt", dtype)
  if decay is not None:
    dk_state = dk_state * jnp.exp(decay.last - decay.col)
  dk = scale * _mm(da, q, "tn", dtype) + dk_state
  q_dec = q.astype(F32) if decay is None else q.astype(F32) * jnp.exp(decay.col)
  ds_prev = scale * _mm(q_dec, do, "tn", dtype) + _decay_state(ds, decay)
  return dk, dv, ds_prev


def dk_chunk(q, v, do, ds, decay, *, scale, dtype):
  """Reverse pass for a Dk slice: ``q``/``ds`` hold channels ``kb`` (``ds (bk, Dv)``, its rows).

  Returns ``(dk[:, kb], dS[kb, :] before the chunk)``; k is not needed.
  """
  mask = causal_mask(q.shape[0])
  da = _weights(_mm(do, v, "nt", dtype), decay, mask)
  dk_state = _mm(v, ds, "nt", dtype)
  if decay is not None:
    dk_state = dk_state * jnp.exp(decay.last - decay.col)
  dk = scale * _mm(da, q, "tn", dtype) + dk_state
  q_dec = q.astype(F32) if decay is None else q.astype(F32) * jnp.exp(decay.col)
  ds_prev = scale * _mm(q_dec, do, "tn", dtype) + _decay_state(ds, decay)
  return dk, ds_prev


def dv_chunk(q, k, do, ds, decay, *, scale, dtype):
  """Reverse pass for a Dv slice: ``do``/``ds`` hold channels ``vb`` (``ds (Dk, bv)``, its columns).

  Returns ``(dv[:, vb], dS[:, vb] before the chunk)``; v is not needed.
  """
  mask = causal_mask(q.shape[0])
  a = _weights(_mm(q, k, "nt", dtype), decay, mask)
  dv = scale * _mm(a, do, "tn", dtype) + _mm(_decayed_keys(k, decay), ds, "nn", dtype)
  q_dec = q.astype(F32) if decay is None else q.astype(F32) * jnp.exp(decay.col)
  ds_prev = scale * _mm(q_dec, do, "tn", dtype) + _decay_state(ds, decay)
  return dv, ds_prev


# ---------------------------------------------------------------- XLA-side glue around the kernels


def per_token_decay(log_decay, batch, seq_len, heads):
  """None, ``(H,)`` or ``(B, N, H)`` -> None or float32 ``(B, N, H)``."""
  if log_decay is None:
    return None
  g = log_decay.astype(F32)
  if g.ndim == 1:
    g = jnp.broadcast_to(g[None, None, :], (batch, seq_len, heads))
  return g


def chunk_cumsum(g_BxNxH, chunk):
  """Inclusive cumulative sum restarted at every chunk: ``(B, N, H)`` float32."""
  b, n, h = g_BxNxH.shape
  return jnp.cumsum(g_BxNxH.reshape(b, n // chunk, chunk, h), axis=2).reshape(b, n, h)


def decay_grad(q, k, dq, dk, s_final, ds_final):
  """``dg (B, N, H)`` from the gradients of q and k (see the module docstring)."""
  db = (jnp.sum(q.astype(F32) * dq.astype(F32), axis=-1)
        - jnp.sum(k.astype(F32) * dk.astype(F32), axis=-1))                 # (B, N, H)
  db = db.at[:, -1].add(jnp.sum(s_final * ds_final, axis=(-2, -1)))
  return jnp.flip(jnp.cumsum(jnp.flip(db, 1), axis=1), 1)


@dataclasses.dataclass(frozen=True)
class Config:
  """A backend's three pallas_call builders and their static parameters (hashable).

  ``forward(q, k, v, b, s0, cfg) -> (o, s_final)``; ``dq(k, v, do, b, s0, cfg) -> dq``;
  ``dkv(q, k, v, do, b, ds_final, cfg) -> (dk, dv, ds0)``. ``b`` is None or the chunk-local
  ``(B, N, H)`` float32 cumulative log-decay. Gradients of q, k come back in float32 when there is
  a decay (the decay gradient is built from them), else in the input dtype.
  """
  forward: Callable
  dq: Callable
  dkv: Callable
  block_sizes: BlockSizes
  scale: float
  interpret: object   # bool, or pltpu.InterpretParams (hashable) for the TPU kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def linear_attention_vjp(q, k, v, g, s0, cfg: Config):
  """``(o, s_final)`` through ``cfg``'s kernels; ``g`` None or per-token ``(B, N, H)`` float32."""
  return _fwd(q, k, v, g, s0, cfg)[0]


def _fwd(q, k, v, g, s0, cfg):
  b = None if g is None else chunk_cumsum(g, cfg.block_sizes.chunk_size)
  o, s_final = cfg.forward(q, k, v, b, s0, cfg)
  return (o, s_final), (q, k, v, b, s0, s_final)


def _bwd(cfg, res, cotangents):
  q, k, v, b, s0, s_final = res
  do, ds_final = cotangents
  do = do.astype(q.dtype)
  ds_final = ds_final.astype(F32)
  dq = cfg.dq(k, v, do, b, s0, cfg)
  dk, dv, ds0 = cfg.dkv(q, k, v, do, b, ds_final, cfg)
  dg = None if b is None else decay_grad(q, k, dq, dk, s_final, ds_final)
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
