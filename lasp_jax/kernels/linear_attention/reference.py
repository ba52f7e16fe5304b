"""Chunked causal linear attention in pure jnp: the XLA path and the kernels' yardstick.

Shapes follow design §1 (batch-major, sequence second); internally everything runs per
(batch, head) in the layout ``x_BxHxNCxCxD`` (``NC`` chunks of ``C`` tokens).

Numerics (design §2-4, 10): every decay weight is ``exp`` of a *direct* sum of log-decays
(all <= 0), never a difference of two cumulative sums and never a division by a cumulative
product. A difference ``b_i - b_j`` of in-chunk prefix sums cancels catastrophically once one gate
is very negative (``-1e9`` leaves nothing of the mild gates around it) and is NaN at ``-inf``;
direct sums are exact to float32 for every log-decay in ``[-inf, 0]``:

- log-decays are first clamped to ``LOG_DECAY_FLOOR`` (``-1e4``): ``exp`` of any sum containing
  the floor is exactly 0 in float32 *and* float64, as it is for the unclamped value, so the clamp
  changes no output; it keeps every sum finite, so that a 0/1 mask times a log-decay is never
  ``0 * -inf`` and ``-inf`` never meets ``-inf`` in a subtraction. ``-inf`` is thus an exact reset
  (the state before it is dropped, its weights are exact zeros) and the gradient of the op with
  respect to a log-decay below the floor (``-inf`` included) is 0, which is also its exact value.
- the in-chunk ``c x c`` log-weights ``sum_{j<l<=i} g_l`` come from a cumulative sum over ``i``
  of ``where(l > j, g_l, 0)`` (:func:`pairwise_log_decay`); prefix and suffix sums from the chunk's
  ends (``cumsum``, a reversed ``cumsum``) are direct sums too.
- masks are selections (``jnp.where``), never multiplications by zero.

Non-finite inputs (NaN, inf; design §13: a NaN must not cross a reset, in either direction). The
op runs on the inputs with every non-finite entry replaced by 0 (:func:`finite_values`), and the
outputs that the non-finite entries reach are set to NaN afterwards (:func:`nonfinite_marks`,
added, so that autodiff sees the finite computation), exactly those of the recurrence: ``o_i`` if
``q_i`` is non-finite; ``o_i`` for ``i >= j`` in ``j``'s document if ``k_j`` or ``g_j`` is
(``o_i[d]`` only for ``v_j[d]``); the first document's ``o_i[d]`` for a non-finite column ``d`` of
the initial state. So nothing reaches earlier positions or other documents, and the gradients are
those of the op on the finite inputs: finite, exact wherever the loss does not depend on the
non-finite entries (e.g. when their outputs' cotangents are 0, or for every other document), with
0 at the non-finite entries themselves; a non-finite cotangent counts as 0
(:func:`zero_nonfinite_cotangent`). The Pallas kernels do the same (``_pallas_common``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# A per-channel (GLA) decay makes the intra-chunk weights a (C, C, Dk) tensor; keep C small there.
PER_CHANNEL_SUBCHUNK = 16

# Log-decays below this are clamped to it: exp of any sum that contains it is exactly 0 in float32
# and float64 (both underflow below about -745), so nothing changes but that sums stay finite.
LOG_DECAY_FLOOR = -1e4

# A gate at or below this is a reset: e^{-88} is under float32's smallest normal (1.18e-38), so
# every factor containing it is 0 in float32 (GPUs flush such subnormals anyway). A non-finite input
# never reaches past a reset (:func:`nonfinite_marks`; the Pallas kernels select on it).
RESET_LOG_DECAY = -88.0

# How the op scores a query against a key (``chunk_linear_attention``'s ``scores``): ``"dot"``,
# ``q . k`` with the state over k; ``"square"``, ``(q . k)^2`` with the state over
# ``square_features(k)`` (ReBased's kernel).
SCORES = ("dot", "square")


def check_scores(scores):
  """Raises ValueError unless ``scores`` is one of :data:`SCORES`."""
  if scores not in SCORES:
    raise ValueError(f"scores must be one of {SCORES}, got {scores!r}")


def square_features(x):
  """``vec(x x^T)`` over the last axis (``D -> D * D``, entry ``a * D + b`` is ``x_a x_b``): the
  feature map with ``square_features(q) . square_features(k) = (q . k)^2``."""
  return (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)


def state_key_dim(dk, scores):
  """The state's key dimension for q, k of width ``dk``: ``dk``, or ``dk * dk`` (``"square"``)."""
  return dk * dk if scores == "square" else dk


def clamp_log_decay(g):
  """``max(g, LOG_DECAY_FLOOR)`` in float32: -inf (a reset) becomes finite; NaN stays NaN.

  The gradient below the floor is 0: the op's exact derivative there (``exp(g) * ...`` underflows).
  """
  return jnp.maximum(g.astype(jnp.float32), LOG_DECAY_FLOOR)


def cumsum_inclusive(g, axis):
  """b_i = g_1 + ... + g_i along ``axis``."""
  return jnp.cumsum(g, axis=axis)


def cumsum_reverse_exclusive(g, axis):
  """r_j = sum_{u > j} g_u along ``axis``, summed from the end (no cancellation)."""
  rev = jnp.flip(g, axis)
  csum = jnp.cumsum(rev, axis=axis)
  csum = jnp.concatenate(
      [jnp.zeros_like(jax.lax.slice_in_dim(csum, 0, 1, axis=axis)),
       jax.lax.slice_in_dim(csum, 0, csum.shape[axis] - 1, axis=axis)], axis=axis)
  return jnp.flip(csum, axis)


def masked_exp(x, mask):
  """exp(x) where mask, else 0; gradient-safe (no inf * 0 in either direction)."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def pairwise_log_decay(g, axis):
  """``D[..., i, j, ...] = sum_{j < l <= i} g_l`` (0 for ``i <= j``), a direct sum per pair.

  ``g`` has the token axis at ``axis`` (length ``c``); the result has ``(c, c)`` (``i``, ``j``) in
  its place. A cumulative sum over ``i`` of ``where(i > j, g_i, 0)``: no difference of prefix
  sums, so a very negative ``g_l`` cannot swamp the mild ones of a pair that excludes it, and a
  NaN at ``l`` reaches only rows ``i >= l``.
  """
  g = jnp.moveaxis(g, axis, -1)                                   # (..., c)
  c = g.shape[-1]
  later = jnp.arange(c)[:, None] > jnp.arange(c)[None, :]        # (i, j): i > j
  d = jnp.cumsum(jnp.where(later, g[..., :, None], 0.0), axis=-2)   # (..., c_i, c_j)
  return jnp.moveaxis(d, (-2, -1), (axis, axis + 1))


def mask_nonfinite_values(o, v, axis):
  """Marks, as NaN, the outputs of a causal matmul that a non-finite value reaches.

  A masked (causal) score matrix times ``v`` multiplies the zero weights of earlier rows by later
  values, so one NaN in ``v`` would poison every row. Callers put :func:`finite_values` of ``v``
  into the matmul and then this sets ``o[i, d]`` to NaN where some ``v[j, d]`` with ``j <= i`` is
  non-finite (``o`` shaped like ``v``, tokens along ``axis``, channels last, other axes batch).
  Float32 iota, compare, ``min`` and ``where`` only: Mosaic and Triton lower them.
  """
  axis = axis % v.ndim
  rows = jax.lax.broadcasted_iota(jnp.int32, v.shape, axis).astype(jnp.float32)
  first_bad = jnp.min(jnp.where(is_finite(v), float(v.shape[axis]), rows), axis=axis,
                      keepdims=True)
  return jnp.where(rows >= first_bad, jnp.nan, o)


def finite_values(v):
  """``v`` with its non-finite entries replaced by 0 (see :func:`mask_nonfinite_values`)."""
  return jnp.where(is_finite(v), v, 0).astype(v.dtype)


def is_finite(x):
  # A comparison rather than jnp.isfinite, which Mosaic may not lower; NaN compares False.
  return jnp.abs(x.astype(jnp.float32)) <= jnp.finfo(jnp.float32).max


def _last_index(flags, axis=1):
  """Per position, the largest index ``<=`` it along ``axis`` where ``flags`` holds, else -1."""
  idx = jax.lax.broadcasted_iota(jnp.int32, flags.shape, axis)
  return jax.lax.cummax(jnp.where(flags, idx, -1), axis=axis)


def nonfinite_marks(q, k, v, g, initial_state, *, token_bad=None, state_mixes_rows=False):
  """Where a causal linear recurrence's outputs are non-finite because some input is.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; any float dtype, non-finite entries allowed.
    g: None or the clamped per-token log-decay ``(B, N, H, Dg)`` (:func:`per_token_log_decay`),
      document starts folded in; a token whose gates are all ``<= RESET_LOG_DECAY`` is a reset.
    initial_state: None or ``(B, H, Dk, Dv)``.
    token_bad: None or ``(B, N, H)`` bool, more tokens whose every state entry goes non-finite
      (the delta rule's ``beta``).
    state_mixes_rows: the transition mixes the state's rows (the delta rule): a non-finite key
      or initial-state column then reaches every row.

  Returns:
    ``(o_mask (B, N, H, Dv), state_mask (B, H, Dk, Dv))`` bool: ``o_i`` where ``q_i`` is
    non-finite; from token ``j`` to the end of its document where ``k_j``, ``g_j`` or
    ``token_bad_j`` is (column ``d`` only for ``v_j[d]``); the first document's column ``d``
    where the initial state's column ``d`` is; the final state likewise (row ``c`` for
    ``k_j[c]`` unless ``state_mixes_rows``).
  """
  bad_q = jnp.any(~is_finite(q), axis=-1)
  bad_k = ~is_finite(k)
  bad_v = ~is_finite(v)
  bad_tok = jnp.zeros(q.shape[:3], bool) if token_bad is None else token_bad
  reset = jnp.zeros(q.shape[:3], bool)
  if g is not None:
    bad_tok = bad_tok | jnp.any(jnp.isnan(g), axis=-1)
    reset = jnp.all(g <= RESET_LOG_DECAY, axis=-1)
  last_reset = _last_index(reset)                                    # (B, N, H)

  def since(flags):  # a flagged token at or after the last reset, at or before this one
    lr = last_reset.reshape(last_reset.shape + (1,) * (flags.ndim - 3))
    last = _last_index(flags)
    return (last >= 0) & (last >= lr)

  tok, col = since(bad_tok | jnp.any(bad_k, axis=-1)), since(bad_v)
  o_mask = bad_q[..., None] | tok[..., None] | col
  alive0 = last_reset[:, -1] < 0                                    # (B, H): no reset at all
  if state_mixes_rows:
    s_mask = tok[:, -1][..., None, None] | col[:, -1][..., None, :]
  else:
    s_mask = (since(bad_k)[:, -1][..., :, None] | since(bad_tok)[:, -1][..., None, None]
              | col[:, -1][..., None, :])
  if initial_state is not None:
    bad_s0 = ~is_finite(initial_state)                            # (B, H, Dk, Dv)
    bad_col = jnp.any(bad_s0, axis=-2)                              # (B, H, Dv)
    o_mask = o_mask | ((last_reset < 0)[..., None] & bad_col[:, None])
    s0_reach = bad_col[..., None, :] if state_mixes_rows else bad_s0
    s_mask = s_mask | (alive0[..., None, None] & s0_reach)
  s_mask = jnp.broadcast_to(s_mask, k.shape[:1] + k.shape[2:3] + (k.shape[-1], v.shape[-1]))
  return o_mask, s_mask


def add_nan(x, mask):
  """``x`` (float32) plus NaN where ``mask``: the marks of :func:`nonfinite_marks`. An addition, not
  a select, so that autodiff hands the cotangent to the finite computation unchanged."""
  return x + jnp.where(mask, jnp.nan, 0.0).astype(x.dtype)


def mark_nonfinite_outputs(o, s_final, q, k, v, g, initial_state, *, token_bad=None,
                           state_mixes_rows=False):
  """``(o, s_final)`` of the op on the finite inputs, with NaN added where the non-finite entries of
  the inputs (arguments as :func:`nonfinite_marks`) reach, and non-finite cotangents counted as 0.

  The marks (cumulative scans over the sequence) run under ``lax.cond``, only when some input is
  non-finite; otherwise this costs the finiteness check of the inputs.
  """
  def marked():
    o_mask, s_mask = nonfinite_marks(q, k, v, g, initial_state, token_bad=token_bad,
                                     state_mixes_rows=state_mixes_rows)
    return add_nan(o.astype(jnp.float32), o_mask).astype(o.dtype), add_nan(s_final, s_mask)

  flags = [jnp.any(~is_finite(x)) for x in (q, k, v, initial_state) if x is not None]
  flags += [jnp.any(x) for x in (token_bad, None if g is None else jnp.isnan(g)) if x is not None]
  bad = functools.reduce(jnp.logical_or, flags)
  return zero_nonfinite_cotangent(jax.lax.cond(bad, marked, lambda: (o, s_final)))


@jax.custom_vjp
def zero_nonfinite_cotangent(x):
  """The identity on a pytree of arrays whose backward replaces non-finite cotangents by 0: a
  cotangent of a NaN output (what a masked loss behind a normalisation hands back) must not reach
  the other positions' gradients through a 0 weight."""
  return x


def _zero_nonfinite_fwd(x):
  return x, None


def _zero_nonfinite_bwd(_, ct):
  return (jax.tree.map(lambda c: jnp.where(is_finite(c), c, jnp.zeros_like(c)), ct),)


zero_nonfinite_cotangent.defvjp(_zero_nonfinite_fwd, _zero_nonfinite_bwd)


def finite_log_decay(log_decay):
  """``log_decay`` with NaN replaced by 0 (None stays None): the finite computation's decay."""
  if log_decay is None:
    return None
  return jnp.where(jnp.isnan(log_decay), jnp.zeros_like(log_decay), log_decay)


def resolve_scale(scale, dk):
  """``scale`` as the ops use it: None means ``Dk ** -0.5`` (as in LASP-2H), else the number."""
  return dk ** -0.5 if scale is None else scale


def match_vma(x, like):
  """Marks ``x`` as varying over the same manual mesh axes as ``like`` (a no-op outside shard_map).

  Scan carries must agree in this type; kernels stay mesh-agnostic by copying it from the data.
  """
  missing = tuple(sorted(_varying_axes(like) - _varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; older releases call it `vma`
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def per_token_log_decay(log_decay, batch, seq_len, heads):
  """Brings a decay of any shape of design §1 to float32 ``(B, N, H, Dg)``, ``Dg`` in {1, Dk}, clamped to
  ``LOG_DECAY_FLOOR`` (module docstring); None stays None."""
  if log_decay is None:
    return None
  g = clamp_log_decay(log_decay)
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, None, :, None], (batch, seq_len, heads, 1))
  if g.ndim == 3:
    return g[..., None]
  return g


def _to_chunks(x_BxNxHxD, chunk):
  b, n, h, d = x_BxNxHxD.shape
  return x_BxNxHxD.reshape(b, n // chunk, chunk, h, d).transpose(0, 3, 1, 2, 4)


def _from_chunks(x_BxHxNCxCxD):
  b, h, nc, c, d = x_BxHxNCxCxD.shape
  return x_BxHxNCxCxD.transpose(0, 2, 3, 1, 4).reshape(b, nc * c, h, d)


def chunk_linear_attention_xla(q, k, v, log_decay=None, *, scale=1.0, initial_state=None,
                               chunk_size=64, scores="dot"):
  """Causal linear attention, chunked, differentiable by autodiff.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; any float dtype.
    log_decay: None, ``(H,)``, ``(B, N, H)`` or ``(B, N, H, Dk)``, entries in ``[-inf, 0]``
      (``-inf``: a reset; exact, see the module docstring); ``scores="square"`` takes the first
      three.
    scale: multiplies q (``"square"``: its features); None means ``Ds ** -0.5``, ``Ds`` the
      state's key dimension (:func:`state_key_dim`).
    initial_state: None or ``(B, H, Ds, Dv)``.
    chunk_size: tokens per chunk; must divide N (checked by the public entry points).
    scores: ``"dot"``, or ``"square"``: the op on ``square_features`` of q and k, whose state
      is ``(B, H, Dk * Dk, Dv)``, with the in-chunk scores computed as ``(q_i . k_j)^2`` from the
      ``Dk``-wide vectors (see the code for why).

  Returns:
    ``o: (B, N, H, Dv)`` in q's dtype and the final state ``(B, H, Ds, Dv)`` in float32.

  Non-finite inputs: module docstring (the op runs on their finite part, then marks; with
  ``"square"`` a non-finite ``k_j[a]`` reaches the state's rows ``(a, *)`` and ``(*, a)``).
  """
  check_scores(scores)
  square = scores == "square"
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  ds = state_key_dim(dk, scores)
  scale = resolve_scale(scale, ds)
  g = per_token_log_decay(log_decay, bsz, n, h)
  if square and g is not None and g.shape[-1] > 1:
    raise ValueError("scores='square' takes a log_decay of shape (H,) or (B, N, H), not a "
                     "per-channel one: its state's channels are pairs of q, k channels")
  # For the marks of non-finite entries (module docstring): with "square" on k's features, whose
  # non-finite entries are exactly the state rows that a non-finite k reaches.
  raw = (q, square_features(k) if square else k, v, g, initial_state)
  q, k, v = finite_values(q), finite_values(k), finite_values(v)
  g = finite_log_decay(g)
  initial_state = None if initial_state is None else finite_values(initial_state)
  c = chunk_size
  if g is not None and g.shape[-1] > 1:
    c = max(d for d in range(1, min(chunk_size, PER_CHANNEL_SUBCHUNK) + 1) if chunk_size % d == 0)
  f32 = jnp.float32
  q_c = _to_chunks(q.astype(f32), c)
  k_c = _to_chunks(k.astype(f32), c)
  v_c = _to_chunks(v.astype(f32), c)
  causal = jnp.tril(jnp.ones((c, c), dtype=bool))

  if square:
    # (q . k)^2 from the Dk-wide vectors, not the dot of the Dk^2 features: that one sums
    # q_a q_b k_a k_b, whose terms cancel down to the result when q and k are nearly orthogonal,
    # so its relative error is ~eps / cos^2(q, k); ReBased divides by a sum of such scores (its
    # normaliser), tiny at a document's first tokens when their q is nearly orthogonal to the
    # keys so far. Squaring the Dk-wide dot leaves eps / cos, the conditioning of q and k.
    # HIGHEST: a TPU's default float32 matmul rounds to bfloat16. The state (inter-chunk part,
    # chunk states) keeps the features.
    qk = scale * jnp.square(jnp.einsum("bhnid,bhnjd->bhnij", q_c, k_c,
                                       precision=jax.lax.Precision.HIGHEST))
    q_c, k_c = scale * square_features(q_c), square_features(k_c)
  else:
    q_c = q_c * scale
    qk = None if g is not None and g.shape[-1] > 1 else jnp.einsum(
        "bhnid,bhnjd->bhnij", q_c, k_c)

  if g is None:
    scores_ij = qk
    chunk_decay = None
    q_in, k_in = q_c, k_c
  else:
    g_c = _to_chunks(g, c)                               # (B, H, NC, C, Dg)
    b_in = cumsum_inclusive(g_c, axis=3)                 # sum_{u <= i} g_u within the chunk
    to_end = cumsum_reverse_exclusive(g_c, axis=3)       # sum_{u > j} g_u within the chunk
    chunk_decay = jnp.exp(jnp.sum(g_c, axis=3))          # (B, H, NC, Dg)
    log_w = pairwise_log_decay(g_c, axis=3)              # (B, H, NC, C, C, Dg): sum_{j<u<=i} g_u
    if g.shape[-1] == 1:
      scores_ij = qk * masked_exp(log_w[..., 0], causal)
    else:
      scores_ij = jnp.einsum("bhnid,bhnjd,bhnijd->bhnij", q_c, k_c,
                             masked_exp(log_w, causal[..., None]))
    q_in = q_c * jnp.exp(b_in)
    k_in = k_c * jnp.exp(to_end)
  scores_ij = jnp.where(causal, scores_ij, 0.0)
  o_intra = jnp.einsum("bhnij,bhnjd->bhnid", scores_ij, v_c)

  # Each chunk's own contribution to the state at its end, then a scan carries states across chunks.
  chunk_states = jnp.einsum("bhnjk,bhnjv->nbhkv", k_in, v_c)
  s0 = (jnp.zeros((bsz, h, ds, dv), f32) if initial_state is None
        else initial_state.astype(f32))
  s0 = match_vma(s0, chunk_states)

  if chunk_decay is None:
    def step(s, st):
      return s + st, s
    s_final, s_starts = jax.lax.scan(step, s0, chunk_states)
  else:
    decay_n = jnp.moveaxis(chunk_decay, 2, 0)[..., None]   # (NC, B, H, Dg, 1)

    def step(s, inputs):
      st, a = inputs
      return a * s + st, s
    s_final, s_starts = jax.lax.scan(step, s0, (chunk_states, decay_n))

  o_inter = jnp.einsum("bhnik,nbhkv->bhniv", q_in, s_starts)
  o = _from_chunks(o_intra + o_inter).astype(q.dtype)
  return mark_nonfinite_outputs(o, s_final, *raw)
