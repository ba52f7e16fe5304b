"""What the TPU and GPU Pallas kernels share: per-chunk math, decay handling, the custom_vjp.

The kernels never sum log-decays themselves. Once per call, XLA turns the clamped per-token
log-decay ``g`` (``reference.clamp_log_decay``) into two per-token arrays (:func:`chunk_prefix`),
design §15:

    b_i   = sum of g_l over (the last reset at or before i, i] within i's chunk   (a direct sum)
    seg_i = number of resets in i's chunk up to and including i

A *reset* is a gate whose ``exp`` underflows float32 (``g <= RESET_LOG_DECAY``: ``-inf``, the
clamp floor, ``-1e9`` and every gate for which ``exp`` of any sum containing it is 0 in float32).
Every factor of a chunk of ``c`` tokens is then a difference of two such sums inside one segment,
a select across segments (:func:`chunk_decay`):

    W_ij = e^{b_i - b_j} [i >= j, seg_i = seg_j]      qd_i = e^{b_i} [seg_i = 0]
    kd_j = e^{b_c - b_j} [seg_j = seg_c]               a = e^{b_c} [seg_c = 0]

So a reset is an exact zero, ``-inf`` never meets ``-inf`` (sums restart instead of cancelling
a huge gate), and no float32 matmul builds the factors: everything inside the hot loop is an
elementwise select, ``exp`` and the bf16 (or float32-input) tensor-core dots below. Per chunk,
with incoming state ``S``:

    o     = scale * ([(q k^T) * W] v + (q * qd) S)
    S_new = a S + (k * kd)^T v

The triangular mask is a selection inside every tile (a non-finite later key or value never reaches
an earlier row through a zero weight; a non-finite ``v`` is kept out of the ``[...] v`` matmul and
marked NaN from its position on, ``reference.mask_nonfinite_values``).

Non-finite inputs (the semantics of ``reference``'s module docstring: nothing crosses a reset, in
either direction; gradients of the op on the finite inputs). The hot loops stay as they are: the
forward kernel also reports whether any output it wrote is non-finite (every non-finite ``q, k,
v`` or gate shows in its own token's output), and only then (``lax.cond``, so at no cost
otherwise) the forward runs again on the inputs with non-finite entries replaced by 0 and marks
the outputs they reach (``reference.nonfinite_marks``), and the backward runs on those inputs. A
non-finite cotangent counts as 0.

Backward (two kernels, both recompute rather than store per-chunk states):
- ``dq`` runs forward over chunks re-building ``S``:  dq = scale ([(dO v^T) * W] k + qd (dO S^T)).
- ``dk, dv`` run backward over chunks carrying ``dS`` (the cotangent of the state after a chunk):
      dv = scale [(q k^T) * W]^T dO + (k * kd) dS
      dk = scale [(dO v^T) * W]^T q + kd (v dS^T)
      dS <- a dS + scale (q * qd)^T dO          (dS after chunk 0 is d initial_state)
- The decay gradient: the op depends on the global cumulative log-decay ``B`` only through
  ``q_i e^{B_i}``, ``k_j e^{-B_j}`` and the factor ``e^{B_N}`` of the final state, so
  ``dL/dB_i = q_i.dq_i - k_i.dk_i (+ <S_N, dS_N> at i = N)`` and ``dg_t = sum_{i >= t} dL/dB_i``
  (an identity of the exact function; nothing here is exponentiated). Summed over a whole row
  from bf16 operands that suffix sum cancels badly (the q and k sides of one pair carry different
  roundings: an ``(H,)`` decay's dg was 16% off on an H200), so the GPU kernels sum ``dg_t`` over
  the pairs ``j < t <= i`` chunk by chunk instead (:func:`decay_grad_flux`; the dq pass stores the
  state before each chunk, in the input dtype, for the dkv pass's ``<a S_n, dS_{n+1}>``), and dq,
  dk leave in the input dtype. The TPU kernels take the same chunk-local sums from the column
  sums of ``P`` and the flux (:func:`dkv_chunk_lanes`) and the row sums ``q.dq``, ``k.dk`` of
  their float32 gradients. Below the floor the clamp makes the gradient 0 (-inf included), the
  exact value.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lasp_jax.kernels._pallas_util import matmul
from lasp_jax.kernels.linear_attention import reference as ref

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
    chunk_parallel_backward: GPU only, with a decay: two light sequential passes write the state
      before and the state cotangent after every chunk to HBM, then one kernel per chunk (grid
      ``(B, H, NC)``) computes dq, dk, dv and the decay rows (:func:`parallel_bwd_chunk`): the
      decay's elementwise work and reductions leave the latency-bound sequential loops, for
      ``2 B H NC Dk Dv`` stored floats (fla's layout of the backward).
    chunk_parallel_forward: GPU only, with a decay: the forward likewise, a sequential pass
      writing the state before every chunk, then one program per chunk for the output
      (:func:`output_chunk`).
  """
  chunk_size: int = 64
  block_k: int | None = None
  block_v: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  split_backward: bool = False
  chunk_parallel_backward: bool = False
  chunk_parallel_forward: bool = False


# A gate at or below this is a reset (``reference.RESET_LOG_DECAY``: its exp underflows float32).
RESET_LOG_DECAY = ref.RESET_LOG_DECAY


class Decay(NamedTuple):
  """Decay factors of one chunk (module docstring).

  ``weights``: ``(c, c)``, ``W_ij`` (exact 0 above the diagonal and across resets); ``q_scale``:
  ``(c, 1)``, ``qd_i``; ``k_scale``: ``(c, 1)``, ``kd_j``; ``chunk``: ``(1, 1)``, ``a``.
  """
  weights: jax.Array
  q_scale: jax.Array
  k_scale: jax.Array
  chunk: jax.Array


def chunk_prefix(g, chunk_size):
  """``(b, seg)``, both float32 ``(B, N, H)``, from the clamped per-token log-decay ``g``.

  One XLA pass per call (module docstring). ``b`` is a segmented scan, so each entry is a direct
  sum of the gates since the last reset; ``seg`` counts resets (small integers, exact in float32).
  A NaN gate is no reset: it reaches ``b`` from its token on, as the recurrence would.
  """
  bsz, n, h = g.shape
  g = g.reshape(bsz, n // chunk_size, chunk_size, h)
  reset = g <= RESET_LOG_DECAY

  def combine(x, y):
    (rx, bx), (ry, by) = x, y
    return rx | ry, jnp.where(ry, by, bx + by)

  _, b = jax.lax.associative_scan(combine, (reset, jnp.where(reset, 0.0, g)), axis=2)
  seg = jnp.cumsum(reset.astype(jnp.int32), axis=2).astype(F32)
  return b.reshape(bsz, n, h), seg.reshape(bsz, n, h)


def _column(row):
  """A ``(1, c)`` row as a ``(c, 1)`` column: a masked lane sum (exact; no transpose, which
  Mosaic would need a relayout for)."""
  c = row.shape[-1]
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return jnp.sum(jnp.where(rows == cols, row, 0.0), axis=1, keepdims=True)


def _last(row):
  """``row[:, -1:]`` as ``(1, 1)``, by a masked lane sum (no unaligned slice)."""
  cols = jax.lax.broadcasted_iota(jnp.int32, row.shape, 1)
  return jnp.sum(jnp.where(cols == row.shape[-1] - 1, row, 0.0), axis=1, keepdims=True)


def chunk_decay(b_row, seg_row, columns=None):
  """:class:`Decay` of a chunk from its ``(1, c)`` rows of :func:`chunk_prefix` (lanes).

  ``columns``: None, or ``(b_col, seg_col, b_last, seg_last)`` as ``(c, 1)``, ``(c, 1)``,
  ``(1, 1)``, ``(1, 1)`` where the kernel can load them so (Triton); else they come from masked
  lane sums (Mosaic, which would need a relayout for a transpose). Iota masks, selects, sums and
  ``exp``: no matmul.
  """
  c = b_row.shape[-1]
  if columns is None:
    columns = _column(b_row), _column(seg_row), _last(b_row), _last(seg_row)
  b_col, seg_col, b_last, seg_last = columns
  same = causal_mask(c) & (seg_col == seg_row)
  weights = jnp.where(same, jnp.exp(jnp.where(same, b_col - b_row, 0.0)), 0.0)
  zero = jnp.zeros_like(b_col)
  q_scale = jnp.where(seg_col == 0.0, jnp.exp(b_col), zero)
  k_ok = seg_col == seg_last
  k_scale = jnp.where(k_ok, jnp.exp(jnp.where(k_ok, b_last - b_col, 0.0)), zero)
  chunk = jnp.where(seg_last == 0.0, jnp.exp(b_last), jnp.zeros_like(b_last))
  return Decay(weights=weights, q_scale=q_scale, k_scale=k_scale, chunk=chunk)


def causal_mask(c):
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return rows >= cols


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


def state_step(s, k, v, decay, dtype):
  """``S_new = a S + (k * kd)^T v``."""
  return matmul(_decayed_keys(k, decay), v, "tn", dtype) + _decay_state(s, decay)


def state_cotangent_step(q, do, ds, decay, *, scale, dtype):
  """``dS`` before a chunk from ``dS`` after it: ``a dS + scale (q qd)^T dO``."""
  return scale * matmul(_decayed_queries(q, decay), do, "tn", dtype) + _decay_state(ds, decay)


def nonfinite_flag(o):
  """``(1, 1)`` float32: 1 where the tile ``o`` holds a non-finite entry, else 0 (lane then
  sublane reductions, which Mosaic and Triton both lower)."""
  bad = jnp.where(ref.is_finite(o), 0.0, 1.0)
  return jnp.max(jnp.max(bad, axis=1, keepdims=True), axis=0, keepdims=True)


def output_chunk(q, k, v, s, decay, *, scale, dtype):
  """One chunk's output ``(c, Dv')`` float32 from the state ``s`` before it; ``v``/``s`` may be
  a Dv slice."""
  c = q.shape[0]
  mask = causal_mask(c)
  a = _weights(matmul(q, k, "nt", dtype), decay, mask)
  o = scale * (matmul(a, ref.finite_values(v), "nn", dtype)
               + matmul(_decayed_queries(q, decay), s, "nn", dtype))
  return ref.mask_nonfinite_values(o, v, axis=0)


def forward_chunk(q, k, v, s, decay, *, scale, dtype):
  """One chunk forward: returns ``(o (c, Dv') f32, S_new)``; ``v``/``s`` may be a Dv slice."""
  return (output_chunk(q, k, v, s, decay, scale=scale, dtype=dtype),
          state_step(s, k, v, decay, dtype))


def _dq_state(do, s, decay, *, scale, dtype):
  """dq's state part ``scale qd (dO S^T)``."""
  inter = matmul(do, s, "nt", dtype)
  return scale * (inter if decay is None else inter * decay.q_scale)


def _dk_state(v, ds, decay, dtype):
  """dk's state part ``kd (v dS^T)``."""
  dk_state = matmul(v, ds, "nt", dtype)
  return dk_state if decay is None else dk_state * decay.k_scale


def _dv(scores, k, do, ds, decay, mask, *, scale, dtype):
  """``dv = scale [(q k^T) * W]^T dO + (k kd) dS`` from the chunk's ``scores = q k^T``."""
  return (scale * matmul(_weights(scores, decay, mask), do, "tn", dtype)
          + matmul(_decayed_keys(k, decay), ds, "nn", dtype))


def _flux(decay, s_before, ds_after):
  """``<a S_n, dS_{n+1}>`` as ``(1, 1)`` (lane then sublane sums, which Mosaic and Triton both
  lower)."""
  total = jnp.sum(jnp.sum(s_before.astype(F32) * ds_after, axis=1, keepdims=True), axis=0,
                  keepdims=True)
  return decay.chunk * total


def dq_chunk(k, v, do, s, decay, *, scale, dtype):
  """One chunk of the ``dq`` pass: ``(dq (c, Dk') f32, dq's state part, S_new)``; ``k``/``s``
  may be a Dk slice. With a decay, ``q_i . (state part)_i`` feeds the decay gradient."""
  c = do.shape[0]
  mask = causal_mask(c)
  da = _weights(matmul(do, v, "nt", dtype), decay, mask)
  inter = _dq_state(do, s, decay, scale=scale, dtype=dtype)
  dq = scale * matmul(da, k, "nn", dtype) + inter
  return dq, inter, state_step(s, k, v, decay, dtype)


def _dk_and_ds(q, v, do, ds, da, decay, *, scale, dtype):
  """``dk = scale da^T q + kd (v dS^T)``, its state part ``kd (v dS^T)``, and ``dS`` before the
  chunk: ``a dS + scale (q qd)^T dO``."""
  dk_state = _dk_state(v, ds, decay, dtype)
  dk = scale * matmul(da, q, "tn", dtype) + dk_state
  ds_prev = state_cotangent_step(q, do, ds, decay, scale=scale, dtype=dtype)
  return dk, dk_state, ds_prev


class DecayRows(NamedTuple):
  """One chunk's float32 parts of the decay gradient (module docstring), ``(c,)`` each."""
  in_chunk: jax.Array   # row sum minus column sum of P
  k_state: jax.Array    # k_j . kd_j (v_j dS^T)
  flux: jax.Array       # <a S_n, dS_{n+1}>, the same at every token of the chunk


def decay_rows(scores, dp, decay, k, dk_state, s_before, ds_after, *, scale):
  """:class:`DecayRows` of a chunk. ``scores`` may be a Dk slice's partial ``q k^T`` (P is
  linear in it), ``k``, ``dk_state``, ``s_before`` (the state before the chunk, any float dtype)
  and ``ds_after`` (the cotangent of the state after it) the same slice's; slices add up."""
  c = scores.shape[0]
  p = jnp.where(causal_mask(c), scale * scores * dp * decay.weights, 0.0)
  return DecayRows(in_chunk=jnp.sum(p, axis=1) - jnp.sum(p, axis=0),
                   k_state=jnp.sum(k.astype(F32) * dk_state, axis=1),
                   flux=jnp.broadcast_to(_flux(decay, s_before, ds_after)[0], (c,)))


def _dkv(q, k, v, do, ds, decay, mask, *, scale, dtype):
  """The reverse pass's chunk: ``(dk, dk's state part, dv, dS before the chunk, scores, dp,
  da)``."""
  scores, dp = matmul(q, k, "nt", dtype), matmul(do, v, "nt", dtype)
  da = _weights(dp, decay, mask)
  dv = _dv(scores, k, do, ds, decay, mask, scale=scale, dtype=dtype)
  dk, dk_state, ds_prev = _dk_and_ds(q, v, do, ds, da, decay, scale=scale, dtype=dtype)
  return dk, dk_state, dv, ds_prev, scores, dp, da


def dkv_chunk(q, k, v, do, ds, decay, *, scale, dtype, s_before=None):
  """One chunk of the reverse ``dk, dv`` pass: returns ``(dk, dv, dS before the chunk, rows)``;
  ``rows``: :class:`DecayRows` when ``s_before`` (the state before the chunk) is given, else
  None."""
  dk, dk_state, dv, ds_prev, scores, dp, _ = _dkv(q, k, v, do, ds, decay, causal_mask(q.shape[0]),
                                                  scale=scale, dtype=dtype)
  rows = None
  if decay is not None and s_before is not None:
    rows = decay_rows(scores, dp, decay, k, dk_state, s_before, ds, scale=scale)
  return dk, dv, ds_prev, rows


def dkv_chunk_lanes(q, k, v, do, ds, decay, s_before, *, scale, dtype):
  """:func:`dkv_chunk` with a decay, its decay parts in the forms a Mosaic kernel stores without
  a relayout: ``(dk, dv, dS before the chunk, col_p (1, c), flux (1, 1))``, ``col_p`` the column
  sums of ``P`` (a sublane reduction, so lanes) and ``flux`` as in :class:`DecayRows`. With the
  row sums ``q.dq`` and ``k.dk`` of the float32 gradients (XLA), they give the chunk-local sums of
  :func:`decay_grad_flux`: ``in_chunk + q_state = q.dq - col_p`` and ``k_state = k.dk - col_p``,
  since ``q_i.dq_i = rowsum(P)_i + q_state_i`` and ``k_j.dk_j = colsum(P)_j + k_state_j``."""
  mask = causal_mask(q.shape[0])
  dk, _, dv, ds_prev, scores, _, da = _dkv(q, k, v, do, ds, decay, mask, scale=scale, dtype=dtype)
  col_p = jnp.sum(jnp.where(mask, scale * scores * da, 0.0), axis=0, keepdims=True)
  return dk, dv, ds_prev, col_p, _flux(decay, s_before, ds)


def dk_chunk(q, k, v, do, ds, decay, *, scale, dtype, s_before=None):
  """Reverse pass for a Dk slice: ``q``/``k``/``ds``/``s_before`` hold channels ``kb``.

  Returns ``(dk[:, kb], dS[kb, :] before the chunk, rows)``, ``rows`` this slice's part of the
  chunk's :class:`DecayRows` (None without ``s_before``; k is only read for it).
  """
  mask = causal_mask(q.shape[0])
  dp = matmul(do, v, "nt", dtype)
  da = _weights(dp, decay, mask)
  dk, dk_state, ds_prev = _dk_and_ds(q, v, do, ds, da, decay, scale=scale, dtype=dtype)
  rows = None
  if decay is not None and s_before is not None:
    rows = decay_rows(matmul(q, k, "nt", dtype), dp, decay, k, dk_state, s_before, ds, scale=scale)
  return dk, ds_prev, rows


def dv_chunk(q, k, do, ds, decay, *, scale, dtype):
  """Reverse pass for a Dv slice: ``do``/``ds`` hold channels ``vb`` (``ds (Dk, bv)``, its columns).

  Returns ``(dv[:, vb], dS[:, vb] before the chunk)``; v is not needed.
  """
  mask = causal_mask(q.shape[0])
  dv = _dv(matmul(q, k, "nt", dtype), k, do, ds, decay, mask, scale=scale, dtype=dtype)
  ds_prev = state_cotangent_step(q, do, ds, decay, scale=scale, dtype=dtype)
  return dv, ds_prev


def parallel_bwd_chunk(q, k, v, do, s_before, ds_after, decay, emit, *, scale, dtype):
  """One chunk of the chunk-parallel backward from its stored states (the formulas of the module
  docstring with ``S`` the state before the chunk and ``dS`` the cotangent of the one after it).

  ``s_before``/``ds_after`` may be refs: they are read (``[...]``) where first needed, and
  ``emit(name, value)`` receives each result as soon as it is final, so the kernel stores it and
  its tile is dead (spills on sm_90 at 8 warps: 856 B with every tile loaded up front, 60 B so):
  ``"dv"``, ``"dk"``, ``"dq"`` (float32 ``(c, D)``), ``"in_chunk"``,
  ``"k_state"``, ``"flux"``, ``"q_state"`` (float32 ``(c,)``: :class:`DecayRows` and
  ``q_i . (dq's state part)_i``).
  """
  c = q.shape[0]
  mask = causal_mask(c)
  scores = matmul(q, k, "nt", dtype)
  ds_after = ds_after[...]
  emit("dv", _dv(scores, k, do, ds_after, decay, mask, scale=scale, dtype=dtype))
  dp = matmul(do, v, "nt", dtype)
  da = _weights(dp, decay, mask)
  dk_state = _dk_state(v, ds_after, decay, dtype)
  emit("dk", scale * matmul(da, q, "tn", dtype) + dk_state)
  s_before = s_before[...]
  rows = decay_rows(scores, dp, decay, k, dk_state, s_before, ds_after, scale=scale)
  for name, value in zip(rows._fields, rows):
    emit(name, value)
  inter = _dq_state(do, s_before, decay, scale=scale, dtype=dtype)
  emit("dq", scale * matmul(da, k, "nn", dtype) + inter)
  emit("q_state", row_dot(q, inter))


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


def row_dot(x, y_f32):
  """``sum_d x_d y_d`` per row, float32: ``(c, D) x (c, D) -> (c,)``."""
  return jnp.sum(x.astype(F32) * y_f32, axis=1)


def decay_grad_flux(chunk_size, q_state, rows: DecayRows):
  """``dg (B, N, H)`` from per-token ``(B, N, H)`` parts, each summed within its chunk only.

  ``dg_t`` sums ``P_ij`` over the pairs ``j < t <= i`` (the pairs whose weight holds ``g_t``; the
  final state is a query after the last token). For ``t`` in chunk ``n`` they are: in-chunk pairs
  (a suffix sum of ``rows.in_chunk``), queries of chunk n at or after t with earlier chunks' keys
  (a suffix sum of ``q_state``), keys of chunk n before t with later queries (a prefix sum of
  ``rows.k_state``), and earlier chunks' keys with later chunks' queries (``rows.flux``). No sum
  runs past a chunk, so bf16 rounding in one term is never cancelled against another's.
  """
  bsz, n, h = q_state.shape
  split = lambda x: x.reshape(bsz, n // chunk_size, chunk_size, h)  # noqa: E731
  suffix = lambda x: jnp.flip(jnp.cumsum(jnp.flip(split(x), 2), axis=2), 2)  # noqa: E731
  k_prefix = jnp.cumsum(split(rows.k_state), axis=2) - split(rows.k_state)
  dg = suffix(rows.in_chunk + q_state) + k_prefix + split(rows.flux)
  return dg.reshape(bsz, n, h)


@dataclasses.dataclass(frozen=True)
class Config:
  """A backend's three pallas_call builders and their static parameters (hashable).

  ``decay`` below is None or ``(b, seg)`` of :func:`chunk_prefix`, float32 ``(B, N, H)`` each.

  ``forward(q, k, v, decay, s0, cfg) -> (o, s_final, flag)``, ``flag`` float32 of any shape,
  > 0 somewhere iff an entry of ``o`` is non-finite (:func:`nonfinite_flag`);
  ``dq(q, k, v, do, decay, s0, cfg) -> (dq, aux)``;
  ``dkv(q, k, v, do, decay, ds_final, s_final, aux, cfg) -> (dk, dv, ds0, dg)``.
  ``aux`` is whatever the backend's dq pass hands its dkv pass for the decay gradient ``dg``
  (float32 ``(B, N, H)``; None without a decay). dq, dk, dv come back in the input dtype.
  """
  forward: Callable
  dq: Callable
  dkv: Callable
  block_sizes: BlockSizes
  scale: float
  interpret: object   # bool, or pltpu.InterpretParams (hashable) for the TPU kernels
  # With a decay, instead of ``forward`` / dq then dkv when set:
  # ``decay_forward(q, k, v, decay, s0, cfg) -> (o, s_final, flag)``;
  # ``decay_backward(q, k, v, do, decay, s0, ds_final, cfg) -> (dq, dk, dv, ds0, dg)``.
  decay_forward: Callable | None = None
  decay_backward: Callable | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def linear_attention_vjp(q, k, v, g, s0, cfg: Config):
  """``(o, s_final)`` through ``cfg``'s kernels; ``g`` None or clamped per-token ``(B, N, H)``
  float32 log-decays."""
  return _fwd(q, k, v, g, s0, cfg)[0]


def _forward(q, k, v, g, s0, cfg):
  decay = None if g is None else chunk_prefix(g, cfg.block_sizes.chunk_size)
  if decay is not None and cfg.decay_forward is not None:
    return cfg.decay_forward(q, k, v, decay, s0, cfg)
  return cfg.forward(q, k, v, decay, s0, cfg)


def _finite_inputs(q, k, v, g, s0):
  """The inputs with every non-finite entry (of the decay: NaN) replaced by 0."""
  return (*(ref.finite_values(x) for x in (q, k, v)), ref.finite_log_decay(g),
          ref.finite_values(s0))


def _fwd(q, k, v, g, s0, cfg):
  o, s_final, flag = _forward(q, k, v, g, s0, cfg)
  bad = jnp.any(flag > 0) | jnp.any(~ref.is_finite(s_final))

  def marked():   # some input is non-finite (module docstring); never runs otherwise
    o_mask, s_mask = ref.nonfinite_marks(q, k, v, None if g is None else g[..., None], s0)
    o_fin, s_fin, _ = _forward(*_finite_inputs(q, k, v, g, s0), cfg)
    return (ref.add_nan(o_fin.astype(F32), o_mask).astype(o.dtype), ref.add_nan(s_fin, s_mask),
            s_fin)

  o, s_final, s_res = jax.lax.cond(bad, marked, lambda: (o, s_final, s_final))
  return (o, s_final), (q, k, v, g, s0, s_res, bad)


def _bwd(cfg, res, cotangents):
  q, k, v, g, s0, s_final, bad = res    # s_final: that of the finite inputs
  do, ds_final = cotangents
  do = ref.finite_values(do.astype(q.dtype))
  ds_final = ref.finite_values(ds_final.astype(F32))
  q, k, v, g, s0 = jax.lax.cond(bad, _finite_inputs, lambda *a: a, q, k, v, g, s0)
  decay = None if g is None else chunk_prefix(g, cfg.block_sizes.chunk_size)
  if decay is not None and cfg.decay_backward is not None:
    dq, dk, dv, ds0, dg = cfg.decay_backward(q, k, v, do, decay, s0, ds_final, cfg)
  else:
    dq, aux = cfg.dq(q, k, v, do, decay, s0, cfg)
    dk, dv, ds0, dg = cfg.dkv(q, k, v, do, decay, ds_final, s_final, aux, cfg)
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
