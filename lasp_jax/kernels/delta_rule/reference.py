"""The chunked delta rule in pure jnp: the XLA path, and the stages the Pallas kernels plug into.

``S_i = (I - beta_i k_i^T k_i) diag(exp g_i) S_{i-1} + beta_i k_i^T v_i``, ``o_i = scale q_i S_i``
(design §11). Write ``P_i = diag(exp g_i) S_{i-1}`` and ``u_i = beta_i (v_i - k_i P_i)``
(fla's ``v_new``): then ``S_i = diag(exp g_i) S_{i-1} + k_i^T u_i``, a *diagonal-decay* recurrence
with values ``u``. So the delta rule is three stages per chunk of ``c`` tokens, with the chunk's
incoming state ``S``, ``b_i`` the in-chunk inclusive log-decay sums and ``K_b = K * e^{b}``:

1. :func:`prepare_chunks` (per chunk, parallel): the WY/UT form (the solve by :func:`unit_lower_inverse`). ``u_i`` depends on earlier
   ``u_j`` of the chunk through ``A_ij = beta_i <k_i * e^{b_i - b_j}, k_j>`` (``j < i``), so
   ``(I + A) U = diag(beta) (V - K_b S)``: one unit lower-triangular solve per chunk gives
   ``W = (I + A)^{-1} diag(beta) K_b`` and ``U0 = (I + A)^{-1} diag(beta) V``, and ``U = U0 - W S``.
2. :func:`delta_state_pass_xla` (sequential over chunks; Pallas kernels in ``pallas_tpu`` /
   ``pallas_gpu``): ``U_n = U0_n - W_n S``, ``S <- e^{gamma_n} S + K_end_n^T U_n`` with
   ``K_end = K * e^{sum_{l>j} g_l}`` and ``gamma_n`` the chunk's total log-decay.
3. the output is diagonal-decay linear attention of ``(q, k, U, g)`` from the same initial state:
   ``lasp_jax.kernels.linear_attention`` (XLA or its Pallas kernels, forward and backward).

Stage 3 rebuilds the chunk states from ``U`` instead of reading them from stage 2: per-chunk states
are never stored (design §3). A chunk also has an affine summary ``S_out = M S + E`` with
``M = diag(e^{gamma}) - K_end^T W`` (``Dk x Dk``) and ``E = K_end^T U0``: :func:`segment_summary`
folds them into a segment's ``DeltaSummary`` for the sequence-parallel exchange (design §10).

Numerics as ``lasp_jax.kernels.linear_attention.reference``: log-decays clamped to ``LOG_DECAY_FLOOR`` (a
reset, ``-inf``, is an exact zero transition), every decay factor ``exp`` of a direct sum
(``pairwise_log_decay`` for ``b_i - b_j``), masks are selections; transitions composed in float32
at HIGHEST precision (fla saw bf16 chains drift). A NaN reaches only later tokens: the triangular
solve and the state pass only read earlier rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lasp_jax.kernels.linear_attention import reference as la_ref

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
# Per-channel (KDA) decays make A a (c, c, Dk) tensor per chunk: keep c small there, as for GLA.
PER_CHANNEL_SUBCHUNK = la_ref.PER_CHANNEL_SUBCHUNK


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaChunks:
  """Stage 1's per-chunk operands, float32, in the layout ``x_BxHxNCxCxD``.

  ``w``, ``k_end``: ``(B, H, NC, C, Dk)``; ``u0``: ``(B, H, NC, C, Dv)``; ``gamma``:
  ``(B, H, NC, Dg)``, each chunk's total (clamped) log-decay, ``Dg`` in {1, Dk}.
  """
  w: jax.Array
  u0: jax.Array
  k_end: jax.Array
  gamma: jax.Array


def chunk_len(chunk_size: int, log_decay) -> int:
  """The chunk the delta rule uses: ``chunk_size``, or its largest divisor <= 16 for a per-channel
  decay (``log_decay`` in the per-token ``(B, N, H, Dg)`` form, or None)."""
  if log_decay is not None and log_decay.shape[-1] > 1:
    return max(d for d in range(1, min(chunk_size, PER_CHANNEL_SUBCHUNK) + 1) if chunk_size % d == 0)
  return chunk_size


def prepare_chunks(k, v, beta, g, chunk) -> DeltaChunks:
  """Stage 1 (module docstring): ``W``, ``U0``, ``K_end`` and ``gamma`` of every chunk.

  Args:
    k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; beta: ``(B, N, H)``; any float dtype.
    g: None or the per-token clamped log-decay ``(B, N, H, Dg)`` (``la_ref.per_token_log_decay``).
    chunk: tokens per chunk, dividing N.
  """
  bsz, n, h, dk = k.shape
  k_c = la_ref._to_chunks(k.astype(F32), chunk)                       # (B, H, NC, C, Dk)
  v_c = la_ref._to_chunks(v.astype(F32), chunk)
  beta_c = la_ref._to_chunks(beta.astype(F32)[..., None], chunk)      # (B, H, NC, C, 1)
  strict = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  if g is None:
    kk = jnp.einsum("bhnid,bhnjd->bhnij", k_c, k_c)
    k_in, k_end = k_c, k_c
    gamma = jnp.zeros((bsz, h, n // chunk, 1), F32)
  else:
    g_c = la_ref._to_chunks(g, chunk)                                 # (B, H, NC, C, Dg)
    log_w = la_ref.pairwise_log_decay(g_c, axis=3)                    # sum_{j<l<=i} g_l
    if g.shape[-1] == 1:
      kk = jnp.einsum("bhnid,bhnjd->bhnij", k_c, k_c) * la_ref.masked_exp(log_w[..., 0], strict)
    else:
      kk = jnp.einsum("bhnid,bhnjd,bhnijd->bhnij", k_c, k_c,
                      la_ref.masked_exp(log_w, strict[..., None]))
    k_in = k_c * jnp.exp(la_ref.cumsum_inclusive(g_c, axis=3))
    k_end = k_c * jnp.exp(la_ref.cumsum_reverse_exclusive(g_c, axis=3))
    gamma = jnp.sum(g_c, axis=3)
  a = jnp.where(strict, beta_c * kk, 0.0)                             # A_ij, i > j
  rhs = beta_c * jnp.concatenate([k_in, v_c], axis=-1)                # diag(beta) [K_b | V]
  sol = solve_unit_lower(a, rhs)
  return DeltaChunks(w=sol[..., :dk], u0=sol[..., dk:], k_end=k_end, gamma=gamma)


def unit_lower_inverse(a):
  """``(I + a)^{-1}`` for a strictly lower-triangular ``a (..., c, c)`` (finite), float32.

  Block elimination, bottom up: the inverse of ``[[L11, 0], [L21, L22]]`` is
  ``[[T11, 0], [-T22 L21 T11, T22]]``, so ``log2 c`` levels of batched matmuls turn the inverses
  of the ``s x s`` diagonal blocks into those of the ``2s x 2s`` ones (``c`` is padded to a power
  of two with identity rows). Only matmuls: no LAPACK call, which on CPU would be OpenBLAS, whose
  threads deadlock when several simulated devices call it at once, and no powers of ``a``
  (a Neumann product would cancel huge terms when keys repeat).
  """
  c = a.shape[-1]
  p = 1 << max(c - 1, 0).bit_length()
  if p != c:
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, p - c), (0, p - c)])
  batch = a.shape[:-2]
  t = jnp.ones((*batch, p, 1, 1), F32)             # the 1 x 1 diagonal blocks: unit diagonal
  s = 1
  while s < p:
    nb = p // (2 * s)
    blocks = a.reshape(*batch, nb, 2 * s, nb, 2 * s)
    blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)   # (..., nb, 2s, 2s)
    t11, t22 = t[..., 0::2, :, :], t[..., 1::2, :, :]
    mm = lambda x, y: jnp.matmul(x, y, precision=HIGHEST)  # noqa: E731
    t21 = -mm(mm(t22, blocks[..., s:, :s]), t11)
    t = jnp.concatenate([jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1),
                         jnp.concatenate([t21, t22], axis=-1)], axis=-2)
    s *= 2
  return t[..., 0, :c, :c]


def solve_unit_lower(a, rhs):
  """``(I + a)^{-1} rhs`` for strictly lower ``a (..., c, c)`` and ``rhs (..., c, F)``.

  Row ``i`` of the solution depends on rows ``<= i`` only, and so does a non-finite input: the
  inverse and the matmul run on the finite part (a zero weight times a later NaN would otherwise
  reach earlier rows), then every row from the first one holding a non-finite ``a`` or ``rhs``
  entry on is NaN, as the recurrence would make it.
  """
  ok_a, ok_r = la_ref.is_finite(a), la_ref.is_finite(rhs)
  sol = jnp.matmul(unit_lower_inverse(jnp.where(ok_a, a, 0.0)), jnp.where(ok_r, rhs, 0.0),
                   precision=HIGHEST)
  bad = ~(jnp.all(ok_a, axis=-1) & jnp.all(ok_r, axis=-1))            # (..., c)
  rows = jnp.arange(a.shape[-1])
  first_bad = jnp.min(jnp.where(bad, rows, a.shape[-1]), axis=-1, keepdims=True)
  return jnp.where((rows >= first_bad)[..., None], jnp.nan, sol)


def delta_state_pass_xla(w, u0, k_end, gamma, s0):
  """Stage 2 (module docstring) by ``lax.scan``: returns ``(u (B, H, NC, C, Dv), s_final)``.

  Shapes as :class:`DeltaChunks`; ``s0 (B, H, Dk, Dv)``; all float32.
  """
  def step(s, xs):
    w_n, u0_n, k_n, lg_n = xs
    u_n = u0_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s, precision=HIGHEST)
    s = jnp.exp(lg_n)[..., None] * s + jnp.einsum("bhck,bhcv->bhkv", k_n, u_n, precision=HIGHEST)
    return s, u_n

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (w, u0, k_end, gamma))
  s_final, u = jax.lax.scan(step, la_ref.match_vma(s0.astype(F32), w), xs)
  return jnp.moveaxis(u, 0, 2), s_final


def segment_summary(chunks: DeltaChunks):
  """The affine summary ``(M, E)`` of all chunks of each row: ``M (B, H, Dk, Dk)``, the product
  of the chunk transitions ``diag(e^{gamma_n}) - K_end_n^T W_n``, and ``E (B, H, Dk, Dv)``, the
  state from zero; float32, composed at HIGHEST precision."""
  dk = chunks.w.shape[-1]
  mm = lambda a, b: jnp.einsum("bhij,bhjk->bhik", a, b, precision=HIGHEST)  # noqa: E731
  eye = jnp.eye(dk, dtype=F32)

  def step(carry, xs):
    m, e = carry
    w_n, u0_n, k_n, lg_n = xs
    m_n = eye * jnp.exp(lg_n)[..., None, :] - jnp.einsum("bhci,bhcj->bhij", k_n, w_n,
                                                         precision=HIGHEST)
    e_n = jnp.einsum("bhck,bhcv->bhkv", k_n, u0_n, precision=HIGHEST)
    return (mm(m_n, m), mm(m_n, e) + e_n), None

  bsz, h, _, _, dv = chunks.u0.shape
  init = (jnp.broadcast_to(eye, (bsz, h, dk, dk)), jnp.zeros((bsz, h, dk, dv), F32))
  init = jax.tree.map(lambda x: la_ref.match_vma(x, chunks.w), init)
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (chunks.w, chunks.u0, chunks.k_end, chunks.gamma))
  (m, e), _ = jax.lax.scan(step, init, xs)
  return m, e


def values_to_tokens(u):
  """``(B, H, NC, C, Dv)`` -> ``(B, N, H, Dv)``."""
  return la_ref._from_chunks(u)
