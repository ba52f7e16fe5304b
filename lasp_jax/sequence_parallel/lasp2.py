"""LASP-2: sequence-parallel linear attention with one all-gather of a memory state (design §2-5).

Three entry points:
- ``linear_attention``: one device, the chunked form (design §3).
- ``lasp2``: the per-shard op, for use inside the caller's own ``jax.shard_map``.
- ``lasp2_attention``: the same on global ``(B, N, H, D)`` arrays over a mesh axis.

Per device the forward pass is:
1. each segment's summary (design §10): its zero-initial state and its total log-decay (a cheap
   matmul and a sum); with packed documents (``segment_ids``) every start is an exact ``-inf``
   decay, so a segment holding a start has ``M = 0``,
2. the exchange (``exchange.allgather_prefix``): ONE all-gather of every segment's summary in one
   float32 buffer of ``W * S * B * (H * (Dk * Dv + Dv + 1) [+ H * Dg] [+ 2])`` floats (``S``
   segments per device: 1 contiguous, 2 zigzag; ``H (Dv + 1)``: where non-finite inputs reach,
   design §13b; the log-decay only when it is data dependent, the first and last segment ids only
   with packed documents), issued before and independent of the intra-chunk work
   so XLA can overlap them, then a local fold: the incoming state of each segment (and the final
   state, the same on every device); or, with ``exchange="scan"``, ``ceil(log2 P)`` rounds of
   ppermutes holding O(1) summaries (``exchange.scan_prefix``),
3. output = local chunked attention from zero (the kernels) + ``scale * (q * exp(b)) S_in``.

The backward pass is autodiff: the transpose of the all-gather is one reduce-scatter of the same
size, so one state-sized collective per direction, none that grows with N (the scan has its own
log-depth backward).

The delta rule (``beta``, design §11) uses the same exchange with a ``Dk x Dk`` transition in its
summary; its local pass starts from ``S_in`` (the WY stage, which does not need it, comes first).

Numerics: log-decays are clamped to ``reference.LOG_DECAY_FLOOR`` (exact: ``exp`` of anything at or
below it is 0), so ``-inf`` resets are exact zeros and never NaN; every weight is ``exp`` of a
direct sum of log-decays (segment prefixes, suffixes, sums of whole segments' gammas). The fold
of the exchange combines only earlier segments into a segment's incoming state, so a NaN or inf in a
later segment never reaches an earlier segment's output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lasp_jax import kernels
from lasp_jax.kernels.delta_rule import api as delta_api
from lasp_jax.kernels.delta_rule import reference as delta_ref
from lasp_jax.kernels.linear_attention import reference as ref
from lasp_jax.kernels import dispatch
from lasp_jax.kernels.linear_attention.api import (check_chunk_size, reset_log_decay, resolve_backend,
                                          validate_inputs)
from lasp_jax.sequence_parallel import exchange as exchange_lib
from lasp_jax.sequence_parallel import layout as layout_lib
from lasp_jax.sequence_parallel import sharding

BACKENDS = ("auto",) + dispatch.BACKENDS


def _kernel_backend(backend: str, q, v, log_decay=None, chunk_size=64, scores="dot") -> str:
  """``"auto"``: the default device's Pallas kernel where it can tile these shapes, else XLA."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  return resolve_backend(backend, q, v, log_decay, chunk_size, scores)


def _check_decay_mode(log_decay, causal):
  if log_decay is not None and not causal:
    raise ValueError("log_decay must be None when causal=False: a decay has no meaning for "
                     "bidirectional attention")


def linear_attention(q, k, v, log_decay=None, *, beta=None, causal=True, scale=1.0,
                     segment_ids=None, initial_state=None, return_final_state=False,
                     chunk_size=64, backend="auto", scores="dot"):
  """Linear attention on one device (design §2-3), or the delta rule (design §11).

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; float32, bfloat16 or float16 (computed in
      float32, returned in q's dtype; float16 overflows past 65504, which long sequences
      without decay can reach: prefer bfloat16 for low precision).
    log_decay: None, ``(H,)``, ``(B, N, H)`` or ``(B, N, H, Dk)``; entries in ``[-inf, 0]``
      (``-inf``: an exact reset); causal only. A positive entry is a ValueError when concrete;
      under jit see ``lasp_jax.kernels.linear_attention.check_log_decay``.
    beta: None, or ``(B, N, H)`` in ``[0, 2]``: the delta rule (DeltaNet with no decay, Gated
      DeltaNet with ``(B, N, H)``, KDA with ``(B, N, H, Dk)``),
      ``S_i = (I - beta_i k_i^T k_i) diag(exp g_i) S_{i-1} + beta_i k_i^T v_i``; causal only.
    causal: causal recurrence (token i sees j <= i) or bidirectional (sees all tokens).
    scale: multiplies q (1.0 is the paper's unnormalised linear attention); None means
      ``Dk ** -0.5``, as in LASP-2H.
    segment_ids: None or ``(B, N)`` int: packed documents; the state restarts from zero wherever
      the id differs from the previous token's (design §13); causal only.
    initial_state: None or ``(B, H, Dk, Dv)``, feeding the first document of each row; causal only.
    return_final_state: also return the state after the last token, float32 ``(B, H, Dk, Dv)``.
    chunk_size: tokens per chunk; must divide N.
    backend: ``"auto"`` (Pallas on TPU/GPU, XLA on CPU), ``"xla"``, ``"tpu"`` or ``"gpu"``.
    scores: ``"dot"``, or ``"square"``: the op on ``vec(x x^T)`` features of q and k (kernel
      ``(q . k)^2``, ReBased's; state ``(B, H, Dk * Dk, Dv)``; ``scale`` multiplies q's features,
      None meaning ``1 / Dk``), the in-chunk scores from the ``Dk``-wide vectors
      (``kernels.chunk_linear_attention``); XLA path only, no ``beta``, no per-channel decay.

  Returns:
    ``o (B, N, H, Dv)`` in q's dtype, or ``(o, final_state)``.
  """
  _validate(q, k, v, log_decay, beta, initial_state, chunk_size, scale, segment_ids, scores)
  _check_decay_mode(log_decay, causal)
  _check_causal_only(causal, segment_ids, initial_state, False, beta)
  scale = ref.resolve_scale(scale, ref.state_key_dim(q.shape[-1], scores))
  if causal:
    o, s_final = kernels.chunk_linear_attention(
        q, k, v, log_decay, beta=beta, scale=scale, initial_state=initial_state,
        segment_ids=segment_ids, chunk_size=chunk_size, scores=scores,
        backend=_kernel_backend(backend, q, v, log_decay, chunk_size, scores))
  else:
    qf, kf = _state_features(q, scores), _state_features(k, scores)
    s_final = jnp.einsum("bnhk,bnhv->bhkv", kf.astype(jnp.float32), v.astype(jnp.float32))
    o = (scale * jnp.einsum("bnhk,bhkv->bnhv", qf.astype(jnp.float32), s_final)).astype(q.dtype)
  return (o, s_final) if return_final_state else o


def segment_decays(log_decay, nb, seg_len, heads):
  """Per-token decay sums of each segment: ``(b_i from start, sum_{u>j} to end, gamma)``.

  All three are direct sums of log-decays clamped to ``ref.LOG_DECAY_FLOOR`` (so finite, <= 0, and
  NaN only where a NaN is summed in), shaped ``(SB, L, H, Dg)``, ``(SB, L, H, Dg)``,
  ``(SB, H, Dg)`` (``Dg`` is 1 or Dk); None for no decay.
  """
  if log_decay is None:
    return None, None, None
  if log_decay.ndim == 1:  # constant per head: closed forms, nothing data dependent to gather
    # Clamped first: 0 * -inf (the last token's empty suffix of a reset head) would be NaN.
    g = ref.clamp_log_decay(log_decay)[None, None, :, None]
    pos = jnp.arange(seg_len, dtype=jnp.float32)[None, :, None, None]
    b = (pos + 1.0) * g
    to_end = (seg_len - 1.0 - pos) * g
    gamma = jnp.broadcast_to(seg_len * g[:, 0], (nb, heads, 1))
    return jnp.broadcast_to(b, (nb, seg_len, heads, 1)), jnp.broadcast_to(
        to_end, (nb, seg_len, heads, 1)), gamma
  g = ref.per_token_log_decay(log_decay, nb, seg_len, heads)
  return (ref.cumsum_inclusive(g, axis=1), ref.cumsum_reverse_exclusive(g, axis=1),
          jnp.sum(g, axis=1))


def _state_features(x, scores):
  """What the state is over for q or k: ``x``, or (``scores="square"``) its ``vec(x x^T)`` features,
  formed in float32 (as the op forms them)."""
  return ref.square_features(x.astype(jnp.float32)) if scores == "square" else x


def local_state(k, v, to_end):
  """A segment's zero-initial state ``sum_j diag(exp(sum_{u>j} g_u)) k_j^T v_j``, float32
  ``(B, H, Dk, Dv)`` (design §4, step 1)."""
  k_dec = k.astype(jnp.float32) if to_end is None else k.astype(jnp.float32) * jnp.exp(to_end)
  return jnp.einsum("blhk,blhv->bhkv", k_dec, v.astype(jnp.float32))


def add_incoming(o_local, q, b_in, s_in, scale):
  """``o_local + scale * (q * exp(b)) S_in`` in float32 (design §4, step 4); ``scale`` None
  means ``Dk ** -0.5``."""
  scale = ref.resolve_scale(scale, q.shape[-1])
  q_dec = q.astype(jnp.float32) if b_in is None else q.astype(jnp.float32) * jnp.exp(b_in)
  return o_local.astype(jnp.float32) + scale * jnp.einsum("blhk,bhkv->blhv", q_dec, s_in)


def lasp2(q, k, v, log_decay=None, *, axis_name, beta=None, causal=True, scale=1.0,
          segment_ids=None, initial_state=None, return_final_state=False, chunk_size=64,
          layout="contiguous", exchange="allgather", backend="auto", scores="dot"):
  """LASP-2 on local shards, inside the caller's ``jax.shard_map`` over ``axis_name``.

  Args:
    q, k: ``(B, C, H, Dk)``; v: ``(B, C, H, Dv)``: this device's shard of the sequence.
    log_decay: None, ``(H,)`` (replicated), ``(B, C, H)`` or ``(B, C, H, Dk)`` (sharded like q).
    axis_name: the mesh axis the sequence is split over.
    beta: None, or ``(B, C, H)`` in ``[0, 2]`` (sharded like q): the delta rule (design §11);
      the exchange then carries each segment's ``Dk x Dk`` transition with its state.
    segment_ids: None or ``(B, C)`` int (sharded like q): packed documents; the state restarts
      from zero wherever the id differs from the previous token's in natural order, also when
      that token is on another device (design §13; no extra collective).
    initial_state: None or ``(B, H, Dk, Dv)``, the same on every device of ``axis_name``: the
      state before the first token, feeding the first document of each row.
    return_final_state: also return the state after the last token of the whole sequence,
      float32 ``(B, H, Dk, Dv)``, replicated over ``axis_name`` (one all-reduce of that state).
    layout: ``"contiguous"`` or ``"zigzag"`` (design §5); the shard holds 1 or 2 segments.
    exchange: how the segments' summaries meet (design §10, ``exchange.prefix``): ``"allgather"``
      (LASP-2: one all-gather, every device holds all ``W`` summaries), ``"scan"`` (log-depth
      ppermute scan, O(1) summaries held) or ``"auto"`` (by ``exchange.choose_exchange``).
    Others as ``linear_attention``.

  Returns:
    ``o (B, C, H, Dv)`` in q's dtype, exactly the matching rows of the unsplit computation, or
    ``(o, final_state)``.
  """
  _validate(q, k, v, log_decay, beta, initial_state, None, scale, segment_ids, scores)
  check_chunk_size(chunk_size)
  _check_decay_mode(log_decay, causal)
  _check_causal_only(causal, segment_ids, initial_state, return_final_state, beta)
  scale = ref.resolve_scale(scale, ref.state_key_dim(q.shape[-1], scores))
  nseg = layout_lib.segments_per_shard(layout)
  bsz, c_local, heads, dk = q.shape
  if c_local % (nseg * chunk_size):
    raise ValueError(
        f"local sequence length {c_local} is not a multiple of "
        f"{'2 * ' if nseg == 2 else ''}chunk_size={chunk_size}")
  f32 = jnp.float32

  if not causal:
    with jax.named_scope("lasp2_bidirectional"):
      qf, kf = _state_features(q, scores), _state_features(k, scores)
      st = jnp.einsum("bnhk,bnhv->bhkv", kf.astype(f32), v.astype(f32))
      total = jnp.sum(jax.lax.all_gather(st, axis_name), axis=0)
      return (scale * jnp.einsum("bnhk,bhkv->bnhv", qf.astype(f32), total)).astype(q.dtype)

  q_s, k_s, v_s = (layout_lib.to_segments(x, nseg) for x in (q, k, v))
  g_s = log_decay if log_decay is None or log_decay.ndim == 1 else layout_lib.to_segments(log_decay, nseg)
  beta_s = None if beta is None else layout_lib.to_segments(beta, nseg)
  ids_s = layout_lib.to_segments(segment_ids, nseg)
  if ids_s is not None:  # starts inside a segment; one at its first token comes with the exchange
    g_s = reset_log_decay(g_s, ids_s, heads)
  split = lambda x: x.reshape(nseg, bsz, *x.shape[1:])  # noqa: E731  (SB, ..) -> (S, B, ..)
  edges = None if ids_s is None else (split(ids_s[:, 0]), split(ids_s[:, -1]))
  # Non-finite inputs (design §13b): every pass below runs on the finite inputs; the marks of
  # where the recurrence would carry a NaN ride in the exchange beside the summaries.
  marks = _SegmentMarks.of(q_s, k_s, v_s, g_s, beta_s, delta=beta is not None)
  q_s, k_s, v_s = (ref.finite_values(x) for x in (q_s, k_s, v_s))
  g_s = ref.finite_log_decay(g_s)
  beta_s = None if beta_s is None else ref.finite_values(beta_s)
  initial = None
  if initial_state is not None:
    initial = (ref.finite_values(initial_state),
               jnp.any(~ref.is_finite(initial_state), axis=-2).astype(f32))
  incoming = []

  def prefix(local, send=None):
    local = exchange_lib.Marked(local, split(marks.keep), split(marks.end))
    send = None if send is None else exchange_lib.Marked(send, True, True)
    (s_in, bad_in), s_final = exchange_lib.prefix(
        local, strategy=exchange, axis_name=axis_name, layout=layout, edge_ids=edges,
        initial=initial, send=send)
    incoming.append(bad_in.reshape(nseg * bsz, *bad_in.shape[2:]))
    return s_in.reshape(nseg * bsz, *s_in.shape[2:]), s_final

  kernel_backend = _kernel_backend(backend, q_s, v_s, g_s, chunk_size, scores)
  if beta is None:
    o, s_final = _diagonal_segments(q_s, k_s, v_s, g_s, prefix, split, scale, chunk_size,
                                    kernel_backend, scores)
  else:
    # The delta rule resolves "auto" per stage (its state pass has its own dispatch entry).
    o, s_final = _delta_segments(q_s, k_s, v_s, beta_s, g_s, prefix, split, scale, chunk_size,
                                 backend)
  o, s_final = marks.apply(o, s_final if return_final_state else None, incoming[0])
  o = layout_lib.from_segments(o.astype(q.dtype), nseg)
  # The exchange's final state is replicated over the axis by one all-reduce, only when asked.
  return (o, s_final) if return_final_state else o


@dataclasses.dataclass(frozen=True)
class _SegmentMarks:
  """Where this shard's non-finite inputs reach, per segment ``(SB, ...)`` (design §13b).

  ``o (SB, L, H, Dv)``: the outputs they reach from the segment's start (computed under a
  ``lax.cond`` only when some input is non-finite, known only at run time); ``reset (SB, L, H)``:
  the tokens that restart the state; ``keep``, ``end``: the segment's
  :class:`exchange_lib.Marked` leaves; ``bad``: some input is non-finite.
  """
  o: jax.Array
  reset: jax.Array
  keep: jax.Array
  end: jax.Array
  bad: jax.Array

  @classmethod
  def of(cls, q, k, v, g, beta, *, delta):
    nb, seg_len, heads, _ = q.shape
    g_tok = None if g is None else ref.per_token_log_decay(g, nb, seg_len, heads)
    token_bad = None if beta is None else ~ref.is_finite(beta)
    if g_tok is None:
      reset = jnp.zeros((nb, seg_len, heads), bool)
    else:
      reset = jnp.all(g_tok <= ref.RESET_LOG_DECAY, axis=-1)
    flags = [jnp.any(~ref.is_finite(x)) for x in (q, k, v)]
    flags += [jnp.any(x) for x in (token_bad, None if g is None else jnp.isnan(g))
              if x is not None]
    bad = functools.reduce(jnp.logical_or, flags)

    def marked():
      o_mask, s_mask = ref.nonfinite_marks(q, k, v, g_tok, None, token_bad=token_bad,
                                           state_mixes_rows=delta)
      return o_mask, jnp.any(s_mask, axis=-2).astype(jnp.float32)

    def clean():  # _like: typed as varying over the mesh axes as the data are
      return jnp.zeros_like(v, dtype=bool), jnp.zeros_like(v[:, 0], dtype=jnp.float32)

    o_mask, end = jax.lax.cond(bad, marked, clean)
    keep = (~jnp.any(reset, axis=1))[..., None].astype(jnp.float32)
    return cls(o_mask, reset, keep, end, bad)

  def apply(self, o, s_final, bad_in):
    """``(o, s_final)`` of the finite computation, with NaN added where the marks say (the
    incoming ones reach a segment's tokens up to its first reset; a column of the final state
    is marked whole), and non-finite cotangents counted as 0 (as the kernels' ops).
    ``s_final``: the exchange's ``(state, bad)``, or None when the caller does not want it (its
    marks would otherwise keep the final state's all-reduce alive)."""
    def marked_o():
      opened = jnp.cumsum(self.reset.astype(jnp.int32), axis=1) == 0   # no reset up to here
      o_mask = self.o | (opened[..., None] & (bad_in[:, None] > 0))
      return ref.add_nan(o.astype(jnp.float32), o_mask).astype(o.dtype)

    o = jax.lax.cond(self.bad | jnp.any(bad_in > 0), marked_o, lambda: o)
    if s_final is not None:
      state, bad = s_final
      s_final = jax.lax.cond(
          jnp.any(bad > 0),
          lambda: ref.add_nan(state, jnp.broadcast_to(bad[..., None, :] > 0, state.shape)),
          lambda: state)
    return ref.zero_nonfinite_cotangent((o, s_final))


def _diagonal_segments(q_s, k_s, v_s, g_s, prefix, split, scale, chunk_size, backend,
                       scores="dot"):
  """Diagonal decays: summaries ``(gamma, St)``, the exchange, then the local pass from zero
  (independent of the exchange, so XLA can overlap them) plus ``scale (q e^b) S_in``. With
  ``scores="square"`` the state and ``S_in``'s term are over the features of k and q; the local
  pass takes the ``Dk``-wide vectors (its in-chunk scores come from them)."""
  nb, seg_len, heads, _ = q_s.shape
  b_in, to_end, gamma = segment_decays(g_s, nb, seg_len, heads)
  with jax.named_scope("lasp2_state_exchange"):
    st = local_state(_state_features(k_s, scores), v_s, to_end)              # (SB, H, Dk, Dv)
    gamma = jnp.zeros((nb, heads, 1), jnp.float32) if gamma is None else gamma
    # A decay known in advance (none, or constant per head) is not sent: only the states are.
    constant = g_s is None or g_s.ndim == 1
    s_in, s_final = prefix(exchange_lib.DiagonalSummary(split(gamma), split(st)),
                           send=exchange_lib.DiagonalSummary(not constant, True))
  with jax.named_scope("lasp2_local"):
    o_local, _ = kernels.chunk_linear_attention(q_s, k_s, v_s, g_s, scale=scale,
                                                chunk_size=chunk_size, backend=backend,
                                                scores=scores)
  with jax.named_scope("lasp2_combine"):
    return add_incoming(o_local, _state_features(q_s, scores), b_in, s_in, scale), s_final


def _delta_segments(q_s, k_s, v_s, beta_s, g_s, prefix, split, scale, chunk_size, backend):
  """The delta rule (design §10-11): the WY stage per chunk (independent of the exchange), the
  segment's ``(M, E)`` summary (``Dk x Dk`` transition) through the exchange, then the state pass
  and the output from the incoming state."""
  with jax.named_scope("lasp2_delta_prepare"):
    chunks = delta_api.prepare(k_s, v_s, beta_s, g_s, chunk_size=chunk_size, backend=backend)
  with jax.named_scope("lasp2_state_exchange"):
    m, e = delta_ref.segment_summary(chunks)
    s_in, s_final = prefix(exchange_lib.DeltaSummary(split(m), split(e)))
  with jax.named_scope("lasp2_local"):
    o, _ = delta_api.apply(q_s, k_s, chunks, g_s, scale=scale, initial_state=s_in,
                           chunk_size=chunk_size, backend=backend)
  return o, s_final


def _validate(q, k, v, log_decay, beta, initial_state, chunk_size, scale, segment_ids,
              scores="dot"):
  if beta is None:
    validate_inputs(q, k, v, log_decay, initial_state, chunk_size, scale, segment_ids, scores)
  else:
    if scores != "dot":
      raise ValueError(f"scores={scores!r} needs beta=None: the delta rule scores q . k")
    delta_api.validate_inputs(q, k, v, beta, log_decay, initial_state, chunk_size, scale,
                              segment_ids)


def _check_causal_only(causal, segment_ids, initial_state, return_final_state, beta=None):
  if causal:
    return
  for name, val in (("segment_ids", segment_ids), ("initial_state", initial_state),
                    ("beta", beta)):
    if val is not None:
      raise ValueError(f"{name} must be None when causal=False")
  if return_final_state:
    raise ValueError("return_final_state must be False when causal=False")


def decay_spec(log_decay, batch_axis, seq_axis):
  if log_decay is None:
    return None
  if log_decay.ndim == 1:
    return P(None)
  return P(batch_axis, seq_axis, *([None] * (log_decay.ndim - 2)))


def lasp2_attention(q, k, v, log_decay=None, *, beta=None, mesh=None, seq_axis="sp",
                    batch_axis=None, causal=True, scale=1.0, segment_ids=None,
                    initial_state=None, return_final_state=False, chunk_size=64,
                    layout="contiguous", exchange="allgather", backend="auto", scores="dot"):
  """LASP-2 on global arrays: splits the sequence over ``mesh`` axis ``seq_axis``.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; sharded or not (they are resharded).
    log_decay: None, ``(H,)``, ``(B, N, H)`` or ``(B, N, H, Dk)``.
    beta: None, or ``(B, N, H)`` in ``[0, 2]``: the delta rule (design §11).
    mesh: a ``jax.sharding.Mesh`` (Explicit or Auto axes); None uses the ``jax.set_mesh`` context.
    seq_axis: mesh axis that splits N; ``batch_axis``: optional mesh axis that splits B.
    segment_ids: None or ``(B, N)`` int in the layout of q: packed documents (a start is where
      the id differs from the previous token's in natural order, across devices too).
    initial_state: None or ``(B, H, Dk, Dv)``; return_final_state: also return the final state
      ``(B, H, Dk, Dv)`` float32, replicated along ``seq_axis`` (split along ``batch_axis``);
      ``Dk * Dk`` with ``scores="square"``.
    layout: the sequence axis of the inputs (and output) is in ``"contiguous"`` or ``"zigzag"``
      order (``lasp_jax.zigzag``).
    Others as ``linear_attention``.

  Returns:
    ``o (B, N, H, Dv)`` in q's dtype, sharded like q, or ``(o, final_state)``.
  """
  _validate(q, k, v, log_decay, beta, initial_state, None, scale, segment_ids, scores)
  check_chunk_size(chunk_size)
  _check_decay_mode(log_decay, causal)
  _check_causal_only(causal, segment_ids, initial_state, return_final_state, beta)
  mesh = sharding.resolve_mesh(mesh)
  w = sharding.axis_size(mesh, seq_axis, "seq_axis")
  nb = sharding.axis_size(mesh, batch_axis, "batch_axis")
  bsz, n = q.shape[:2]
  nseg = layout_lib.segments_per_shard(layout)
  if n % (w * nseg * chunk_size):
    raise ValueError(
        f"sequence length N={n} must be a multiple of {'2 * ' if nseg == 2 else ''}"
        f"axis size ({seq_axis!r}: {w}) * chunk_size ({chunk_size}) = {w * nseg * chunk_size}")
  if bsz % nb:
    raise ValueError(f"batch size B={bsz} is not a multiple of the {batch_axis!r} axis size {nb}")
  kernel_backend = _kernel_backend(backend, q, v, log_decay, chunk_size, scores)
  x_spec = P(batch_axis, seq_axis, None, None)
  state_spec = P(batch_axis, None, None, None)
  fn = functools.partial(lasp2, axis_name=seq_axis, causal=causal, scale=scale,
                         return_final_state=return_final_state, chunk_size=chunk_size,
                         layout=layout, exchange=exchange, backend=backend, scores=scores)
  row_spec = P(batch_axis, seq_axis)
  return sharding.shard_map(
      lambda q, k, v, g, b, ids, s0: fn(q, k, v, g, beta=b, segment_ids=ids, initial_state=s0),
      mesh,
      (x_spec, x_spec, x_spec, decay_spec(log_decay, batch_axis, seq_axis),
       P(batch_axis, seq_axis, None), row_spec, state_spec),
      (x_spec, state_spec) if return_final_state else x_spec,
      (q, k, v, log_decay, beta, segment_ids, initial_state),
      # Pallas calls inside shard_map need check_vma=False (JAX 0.10).
      check_vma=kernel_backend == "xla")
