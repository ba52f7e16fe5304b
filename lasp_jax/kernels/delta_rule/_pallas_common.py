"""What the TPU and GPU Pallas state-pass kernels share: per-chunk math, input checks, custom_vjp.

Stage 2 of the chunked delta rule (``reference.delta_state_pass_xla``), per (batch, head), all
float32, with ``S`` the state before chunk ``n`` and ``a_n = exp(gamma_n)`` (``(Dk,)``):

    u_n = u0_n - w_n S                    (C, Dv)
    S  <- a_n[:, None] * S + k_end_n^T u_n

Backward (the transpose of one chunk step), carrying ``dS``, the cotangent of the state *after*
chunk ``n``, from ``ds_final`` down to chunk 0:

    du_tot      = du_n + k_end_n dS        (C, Dv)   (u_n feeds the output and the next state)
    d k_end_n   = u_n dS^T                 (C, Dk)
    d log_gam_n = a_n * sum_v(S * dS)      (Dk,)     (summed over Dk outside for Dg = 1)
    d w_n       = -du_tot S^T              (C, Dk)
    d u0_n      = du_tot
    dS         <- a_n[:, None] * dS - w_n^T du_tot    (after chunk 0: d s0)

It needs ``S`` before every chunk in reverse order. Those states are not residuals of the forward:
the backward first rebuilds them with a ``states`` kernel, ``S <- a S + k_end^T u`` from the saved
``u`` (no ``w`` matmul; the same expression as the forward, so the same states), written to HBM as
``(B, H, NC, Dk, Dv)``, then runs the ``reverse`` kernel. Residuals are the inputs and ``u``.

A reset chunk (``gamma = -1e4`` after the caller's clamp) has ``a = 0`` exactly: the state
restarts and ``d gamma = 0 * ... = 0``, both exact. The kernels always see a per-channel
``(B, H, NC, Dk)`` log-decay: a ``Dg = 1`` one is broadcast before the custom_vjp (a few floats
per chunk), so autodiff sums its gradient over Dk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from lasp_jax.kernels._checks import check_float_array
from lasp_jax.kernels._pallas_util import matmul, matmul_split

F32 = jnp.float32


def state_step(s, k_end, u, a_col, dtype=F32):
  """``a S + k_end^T u``: ``s (Dk, Dv')``, ``k_end (C, Dk)``, ``u (C, Dv')``, ``a_col (Dk, 1)``."""
  return a_col * s + matmul(k_end, u, "tn", dtype)


def forward_chunk(w, u0, k_end, a_col, s, dtype=F32):
  """One chunk forward: ``(u (C, Dv'), S after the chunk (Dk, Dv'))``; ``Dv'`` may be a slice.
  ``dtype``: the dot operands' (the state itself stays float32)."""
  u = u0 - matmul(w, s, "nn", dtype)
  return u, state_step(s, k_end, u, a_col, dtype)


def reverse_chunk(w, k_end, u, du, a_col, s, ds, emit, dtype=F32):
  """One chunk of the reverse pass (module docstring): returns ``dS`` before the chunk.

  Args: ``w, k_end (C, Dk)``; ``u, du (C, Dv')``; ``a_col (Dk, 1)``; ``s`` the state before the
  chunk and ``ds`` the cotangent of the state after it, ``(Dk, Dv')``. With a Dv slice ``Dv'``,
  ``d k_end``, ``d w`` and ``d gamma`` are that slice's partial sums (summed over slices by
  the caller); ``du_tot`` and ``dS`` are exact per slice (columns of ``dS`` do not mix).

  ``emit(name, value)`` takes each result as soon as it is final, so the kernel stores it and its
  tile is dead: ``"du0" (C, Dv')``, ``"dk_end" (C, Dk)``, ``"dlg" (Dk, 1)``, ``"dw" (C, Dk)``.
  The GPU kernel's spills on sm_90 (B8 N8192 H16 D128) went 1452 -> 352 B so, shared memory
  unchanged (emitting ``dk_end`` first instead also cut spills but took 245760 B of shared memory
  at C=64, Dk=256: over the limit).
  """
  s = s.astype(F32)
  du_tot = du + matmul(k_end, ds, "nn", dtype)
  emit("du0", du_tot)
  emit("dk_end", matmul(u, ds, "nt", dtype))
  emit("dlg", a_col * jnp.sum(s * ds, axis=1, keepdims=True))
  emit("dw", -matmul(du_tot, s, "nt", dtype))
  return a_col * ds - matmul(w, du_tot, "tn", dtype)


# ------------------------------------------------------------ stage 1: the WY prepare, per chunk
#
# With ``A = strict_tril(diag(beta) (K K^T) * Wd)`` (``Wd_ij = e^{b_i - b_j}`` inside a segment,
# ``linear_attention._pallas_common.chunk_decay``), ``T = (I + A)^{-1}``, ``R_K = diag(beta qd) K``
# and ``R_V = diag(beta) V``: ``W = T R_K``, ``U0 = T R_V``, ``K_end = diag(kd) K`` (``reference``
# module docstring). Backward, with ``dR = T^T dSol`` and ``dA = -strict_tril(dR Sol^T)``:
#     dK  = dKK K + dKK^T K + diag(beta qd) dR_K + diag(kd) dK_end,  dKK = dA * beta * Wd
#     dV  = diag(beta) dR_V
#     dbeta_i = sum_j dA_ij (KK^T Wd)_ij + qd_i <k_i, dR_K_i> + <v_i, dR_V_i>
#     db_i = sum_j dA_ij A_ij - sum_j dA_ji A_ji + beta_i qd_i <k_i, dR_K_i> - kd_i <k_i, dK_end_i>
#            (+ sum_j kd_j <k_j, dK_end_j> at the chunk's last token)
# ``db`` is the cotangent of the chunk prefix sums ``b``; XLA's autodiff of ``chunk_prefix`` turns
# it into the gates' gradient.


def unit_lower_inverse(a):
  """``(I + a)^{-1}`` of a strictly lower-triangular float32 ``a (C, C)`` by forward substitution.

  Row ``r`` of the inverse is ``e_r - sum_{j<r} a_rj T_j``: ``C - 1`` steps of selects and sums on
  the tile, in float32 (no matmul whose operands would round the inverse). A row reads only
  earlier rows, as the recurrence does.
  """
  c = a.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  a_t = a.T                                                     # column r: row r of a

  def body(r, t):
    a_r = jnp.sum(jnp.where(cols == r, a_t, 0.0), axis=1, keepdims=True)      # (C, 1)
    return jnp.where(rows == r, t - jnp.sum(a_r * t, axis=0, keepdims=True), t)

  return jax.lax.fori_loop(1, c, body, jnp.where(rows == cols, 1.0, 0.0).astype(F32))


def _prepare_terms(k, decay, dtype):
  """``(K K^T (C, C), the strict mask times Wd (C, C), qd (C, 1), kd (C, 1))``."""
  c = k.shape[0]
  kk = matmul(k, k, "nt", dtype)
  strict = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) > jax.lax.broadcasted_iota(
      jnp.int32, (c, c), 1)
  wd = jnp.where(strict, decay.weights, 0.0)
  return kk, wd, decay.q_scale, decay.k_scale


def prepare_chunk(k, v, beta_col, decay, dtype=F32):
  """One chunk of stage 1: ``(w (C, Dk), u0 (C, Dv), k_end (C, Dk), t (C, C))``, float32.

  ``k (C, Dk)``, ``v (C, Dv)`` in the inputs' dtype; ``beta_col (C, 1)`` float32; ``decay`` the
  chunk's ``linear_attention._pallas_common.Decay``. ``dtype`` bf16: the solve's dots take split
  bf16 operands (``matmul_split``: the inverse is not bf16-representable), ``K K^T`` plain bf16
  (exact products of bf16 inputs, float32 sums).
  """
  kk, wd, qd, kd = _prepare_terms(k, decay, dtype)
  t = unit_lower_inverse(beta_col * kk * wd)
  kf = k.astype(F32)
  w = matmul_split(t, beta_col * qd * kf, "nn", dtype)
  u0 = matmul_split(t, beta_col * v.astype(F32), "nn", dtype)
  return w, u0, kd * kf, t


def prepare_chunk_bwd_values(v, beta_col, t, du0, dtype=F32):
  """The value side of one chunk's stage-1 backward: ``(dv (C, Dv), its part of dbeta (C,),
  dR_V R_V^T (C, C))``, float32. The kernel stores ``dv`` before the key side runs: one
  ``C x Dv`` tile fewer held in registers."""
  vf = v.astype(F32)
  dr = matmul(t, du0, "tn", dtype)                                 # dR_V
  return beta_col * dr, jnp.sum(vf * dr, axis=1), matmul(dr, beta_col * vf, "nt", dtype)


def prepare_chunk_bwd_keys(k, beta_col, decay, t, dw, dk_end, dbeta, x, dtype=F32):
  """The rest of one chunk's stage-1 backward (formulas above) from
  :func:`prepare_chunk_bwd_values`' ``dbeta`` and ``x``: ``(dk (C, Dk), dbeta (C,), db (C,))``,
  float32; ``t`` as :func:`prepare_chunk` returned it.

  ``dR Sol^T = (dR R^T) T^T``: ``C x C`` products instead of re-forming ``W`` and ``U0`` (two
  ``C x D`` tiles that spill registers on sm_90).
  """
  c = k.shape[0]
  kf = k.astype(F32)
  dr = matmul(t, dw, "tn", dtype)                                  # dR_K
  qd, kd = decay.q_scale, decay.k_scale
  x = x + matmul(dr, beta_col * qd * kf, "nt", dtype)
  s_k = jnp.sum(kf * dr, axis=1)                                   # <k_i, dR_K_i>
  dk = beta_col * qd * dr + kd * dk_end
  end = kd[:, 0] * jnp.sum(kf * dk_end, axis=1)                    # kd_i <k_i, dK_end_i>
  # dA on every pair; each use below multiplies it by Wd, zero off the strict lower triangle.
  da = -matmul(x, t, "nt", dtype)
  kk, wd, _, _ = _prepare_terms(k, decay, dtype)
  kk_wd = kk * wd
  dkk = da * beta_col * wd
  pa = da * beta_col * kk_wd                                       # dA_ij A_ij
  last = jax.lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1
  dk = dk + matmul(dkk, k, "nn", dtype) + matmul(dkk, k, "tn", dtype)
  dbeta = dbeta + jnp.sum(da * kk_wd, axis=1) + qd[:, 0] * s_k
  db = (jnp.sum(pa, axis=1) - jnp.sum(pa, axis=0) + beta_col[:, 0] * qd[:, 0] * s_k - end
        + jnp.where(last, jnp.sum(end), 0.0))
  return dk, dbeta, db


# ---------------------------------------------------------------- XLA-side glue around the kernels


def check_inputs(backend, w, u0, k_end, gamma, s0=None):
  """Ranks, dtypes and matching dims of the state-pass inputs; returns ``(B, H, NC, C, Dk, Dv)``.

  ValueError (TypeError for a non-float) naming the offending input and value.
  """
  check_float_array("w", w, "(B, H, NC, C, Dk)")
  check_float_array("u0", u0, "(B, H, NC, C, Dv)")
  check_float_array("k_end", k_end, "(B, H, NC, C, Dk)")
  check_float_array("gamma", gamma, "(B, H, NC, Dg)")
  bsz, h, nc, c, dk = w.shape
  dv = u0.shape[-1]
  if k_end.shape != w.shape:
    raise ValueError(f"backend {backend!r}: k_end must have w's shape {tuple(w.shape)}, got "
                     f"{tuple(k_end.shape)}")
  if u0.shape[:4] != w.shape[:4]:
    raise ValueError(f"backend {backend!r}: u0 must have shape (B, H, NC, C, Dv) = "
                     f"{(bsz, h, nc, c, 'Dv')}, got {tuple(u0.shape)}")
  if gamma.shape[:3] != (bsz, h, nc) or gamma.shape[-1] not in (1, dk):
    raise ValueError(f"backend {backend!r}: gamma must have shape (B, H, NC, Dg) with Dg in "
                     f"{{1, Dk={dk}}}, i.e. {(bsz, h, nc)} + (1,) or ({dk},), got "
                     f"{tuple(gamma.shape)}")
  if s0 is not None:
    check_float_array("s0", s0, "(B, H, Dk, Dv)")
    if s0.shape != (bsz, h, dk, dv):
      raise ValueError(f"backend {backend!r}: s0 must have shape (B, H, Dk, Dv) = "
                       f"{(bsz, h, dk, dv)}, got {tuple(s0.shape)}")
  for name, val in (("NC (number of chunks)", nc), ("C (chunk size)", c), ("Dk", dk),
                    ("Dv", dv)):
    if val < 1:
      raise ValueError(f"backend {backend!r} needs {name} >= 1, got {val}")
  return bsz, h, nc, c, dk, dv


@dataclasses.dataclass(frozen=True)
class Config:
  """A backend's three pallas_call builders and their static parameters (hashable).

  ``forward(w, u0, k_end, gamma, s0, cfg) -> (u, s_final)``;
  ``states(k_end, u, gamma, s0, cfg) -> (B, H, NC, Dk, Dv)``, the state before each chunk;
  ``reverse(w, k_end, u, du, gamma, states, ds_final, cfg) -> (dw, du0, dk_end, dgamma, ds0)``.
  ``gamma`` is the per-channel ``(B, H, NC, Dk)`` float32 log-decay; everything is float32.
  """
  forward: Callable
  states: Callable
  reverse: Callable
  interpret: object           # bool, or pltpu.InterpretParams (hashable) for the TPU kernels
  block_v: int | None = None  # GPU: value channels per program (None: all of Dv)
  # Dot operands (GPU): float32 (IEEE, CUDA cores) or bfloat16 (tensor cores; the chunk states
  # the backward re-reads are then stored in bf16 too). States and sums stay float32.
  dtype: object = F32
  num_warps: int | None = None
  num_stages: int | None = None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def state_pass_vjp(w, u0, k_end, gamma, s0, cfg: Config):
  """``(u, s_final)`` through ``cfg``'s kernels; float32 inputs, ``gamma (B, H, NC, Dk)``."""
  return cfg.forward(w, u0, k_end, gamma, s0, cfg)


def _fwd(w, u0, k_end, gamma, s0, cfg):
  u, s_final = cfg.forward(w, u0, k_end, gamma, s0, cfg)
  return (u, s_final), (w, k_end, gamma, s0, u)     # u0 is not needed by the backward


def _bwd(cfg, res, cotangents):
  w, k_end, gamma, s0, u = res
  du, ds_final = (x.astype(F32) for x in cotangents)
  states = cfg.states(k_end, u, gamma, s0, cfg)
  return cfg.reverse(w, k_end, u, du, gamma, states, ds_final, cfg)


state_pass_vjp.defvjp(_fwd, _bwd)


def run(w, u0, k_end, gamma, s0, cfg: Config, pad_to=None):
  """Shared entry of both backends: float32, the per-channel log-decay, optional zero padding.

  ``pad_to``: None, or a multiple that Dk and Dv are zero-padded up to around the kernels (exact:
  zero key channels of ``w``/``k_end`` and zero rows of ``s0`` keep the padded state rows zero
  whatever their decay; zero value channels give zero ``u`` columns; both are cut off again, and
  autodiff of pad and slice gives the gradients).
  """
  dk, dv = w.shape[-1], u0.shape[-1]
  w, u0, k_end, s0 = (x.astype(F32) for x in (w, u0, k_end, s0))
  gamma = jnp.broadcast_to(gamma.astype(F32), gamma.shape[:-1] + (dk,))
  if pad_to is not None:
    pk, pv = -dk % pad_to, -dv % pad_to
    if pk or pv:
      def pad(x, p, axis=-1):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, p)
        return jnp.pad(x, widths)
      w, k_end, gamma = pad(w, pk), pad(k_end, pk), pad(gamma, pk)
      u0 = pad(u0, pv)
      s0 = pad(pad(s0, pk, -2), pv)
  u, s_final = state_pass_vjp(w, u0, k_end, gamma, s0, cfg)
  return u[..., :dv], s_final[..., :dk, :dv]
