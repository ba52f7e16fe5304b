"""The one exchange of every linear recurrence over the sequence axis (SPEC section 10).

A run of tokens acts on the state as an affine map, its *summary* ``S_out = M S_in + E``; summaries
compose associatively, ``(M2, E2) o (M1, E1) = (M2 M1, M2 E1 + E2)``. Sequence parallelism is the
exclusive prefix of the segments' summaries in global segment order: each segment then runs its
local pass from its incoming state ``S_in``. A family supplies its summary type (a pytree with
``compose`` and ``reset``); this module moves and folds summaries and knows nothing else.

Strategy ``allgather`` (LASP-2): every leaf of every local summary goes into ONE float32 buffer and
ONE all-gather (its transpose, backward, is one reduce-scatter of the same size); then each device
folds the ``P = W * segments-per-shard`` summaries locally with an associative scan. Memory and
bytes grow with ``W`` (the scan exchange of the next issue will not).

Packed documents cost nothing extra: a document start inside a segment is already in its summary
(``M = 0``); a start at a segment's *first* token depends on the predecessor's last token, so the
first and last segment ids ride in the same buffer (bit-cast, exact) and the reset is applied after
the gather. An initial state is one more summary ``(0, S_0)`` before segment 0, and the inclusive
fold over all segments is the final state, the same on every device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.linear_attention import reference as ref
from lasp_jax.sequence_parallel import layout as layout_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalSummary:
  """``S_out = diag(exp(log_m)) S_in + state`` for a batch of segments.

  ``log_m (B, H, Dg)``: the direct sum of the segment's log-decays, clamped (``Dg`` 1 or Dk; a
  reset is ``ref.LOG_DECAY_FLOOR``, whose exp is exactly 0); ``state (B, H, Dk, Dv)`` float32: the
  segment's state from zero.
  """
  log_m: jax.Array
  state: jax.Array

  def compose(self, earlier: "DiagonalSummary") -> "DiagonalSummary":
    """``self o earlier``: first ``earlier``, then ``self``."""
    return DiagonalSummary(jnp.maximum(self.log_m + earlier.log_m, ref.LOG_DECAY_FLOOR),
                           jnp.exp(self.log_m)[..., None] * earlier.state + self.state)

  def reset(self, starts_B) -> "DiagonalSummary":
    """The summary with its incoming state dropped (``M = 0``) where ``starts_B`` (B,) is True."""
    return DiagonalSummary(jnp.where(starts_B[:, None, None], ref.LOG_DECAY_FLOOR, self.log_m),
                           self.state)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaSummary:
  """``S_out = m S_in + state`` for a batch of segments of the delta rule (SPEC section 11).

  ``m (B, H, Dk, Dk)`` float32: the segment's transition, the product of its tokens'
  ``(I - beta_i k_i^T k_i) diag(exp g_i)`` (a reset is ``m = 0``); ``state (B, H, Dk, Dv)``
  float32: the segment's state from zero.
  """
  m: jax.Array
  state: jax.Array

  def compose(self, earlier: "DeltaSummary") -> "DeltaSummary":
    """``self o earlier``: first ``earlier``, then ``self``."""
    mm = lambda a, b: jnp.einsum("...ij,...jk->...ik", a, b,  # noqa: E731
                                 precision=jax.lax.Precision.HIGHEST)
    return DeltaSummary(mm(self.m, earlier.m), mm(self.m, earlier.state) + self.state)

  def reset(self, starts_B) -> "DeltaSummary":
    """The summary with its incoming state dropped (``m = 0``) where ``starts_B`` (B,) is True."""
    return DeltaSummary(jnp.where(starts_B[:, None, None, None], 0.0, self.m), self.state)


def _bits(ids):
  """Integer ids ``(S, B)`` -> float32 ``(S, B, k)`` holding the same bits (``k = 2`` for 64-bit
  ids), so that they travel exactly in the float buffer and keep their whole width."""
  if ids.dtype.itemsize < 4:
    ids = ids.astype(jnp.int32)
  return jax.lax.bitcast_convert_type(ids, jnp.float32).reshape(*ids.shape, -1)


def allgather_prefix(local, *, axis_name, layout, edge_ids=None, initial=None, send=None):
  """Incoming states of this shard's segments and the final state, by one all-gather.

  Args:
    local: a summary pytree whose leaves are ``(S, B, ...)``: this shard's ``S`` segments (1
      contiguous, 2 zigzag) in local order.
    axis_name: the sequence mesh axis; layout: ``"contiguous"`` or ``"zigzag"``.
    edge_ids: None, or ``(first, last)``, each ``(S, B)`` int: the segment ids of each segment's
      first and last token; a segment whose first id differs from its predecessor's last starts a
      document there (SPEC section 13).
    initial: None or ``(B, H, Dk, Dv)``: the state before the first token of the sequence.
    send: a pytree of bools like ``local`` (None: all True); a False leaf is the same on every
      segment (e.g. a constant decay's ``log_m``) and is not sent.

  Returns:
    ``(s_in, final)``: ``s_in (S, B, H, Dk, Dv)`` the incoming state of each local segment (zero
    where it starts a document), ``final (B, H, Dk, Dv)`` the state after the last token.
  """
  leaves, treedef = jax.tree.flatten(local)
  send_flags = [True] * len(leaves) if send is None else jax.tree.leaves(send)
  nseg, bsz = leaves[0].shape[:2]
  parts = [x.reshape(nseg, bsz, -1).astype(jnp.float32)
           for x, s in zip(leaves, send_flags) if s]
  if edge_ids is not None:
    parts += [_bits(i) for i in edge_ids]
  buf = jnp.concatenate(parts, axis=-1)                                    # (S, B, F)
  w = jax.lax.axis_size(axis_name)
  gathered = jax.lax.all_gather(buf, axis_name).reshape(w * nseg, bsz, -1)
  gathered = jnp.take(gathered, jnp.asarray(layout_lib.segment_order(layout, w)), axis=0)
  num = gathered.shape[0]                                                  # P, global order

  out, offset = [], 0
  for x, s in zip(leaves, send_flags):
    if s:
      size = x[0, 0].size
      out.append(gathered[..., offset:offset + size].reshape(num, *x.shape[1:]))
      offset += size
    else:
      out.append(jnp.broadcast_to(x[:1], (num, *x.shape[1:])))
  summaries = jax.tree.unflatten(treedef, out)
  starts = None
  if edge_ids is not None:
    ids = jax.lax.bitcast_convert_type(gathered[..., offset:], jnp.int32)  # (P, B, 2k)
    first, last = jnp.split(ids, 2, axis=-1)
    changed = jnp.any(first[1:] != last[:-1], axis=-1)
    starts = jnp.concatenate([jnp.zeros((1, bsz), bool), changed])          # (P, B)
    summaries = jax.vmap(lambda sm, st: sm.reset(st))(summaries, starts)
  if initial is not None:  # the summary (0, S_0) before segment 0
    zero = jax.vmap(lambda sm: sm.reset(jnp.ones((bsz,), bool)))(
        jax.tree.map(lambda x: x[:1], summaries))
    zero = dataclasses.replace(zero, state=initial.astype(jnp.float32)[None])
    summaries = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), zero, summaries)

  # prefix[i] = x_i o ... o x_0: each prefix folds only earlier summaries, so a NaN later in the
  # sequence never reaches an earlier segment.
  prefix = jax.lax.associative_scan(lambda earlier, later: later.compose(earlier), summaries)
  states = prefix.state                                 # (P or P+1, B, H, Dk, Dv), inclusive
  if initial is None:
    states = jnp.concatenate([jnp.zeros_like(states[:1]), states])
  # states[p] is now the state before global segment p; the last is the final state.
  me = jax.lax.axis_index(axis_name)
  positions = jnp.stack([jnp.asarray(layout_lib.segment_global_index(layout, me, w, s))
                         for s in range(nseg)])
  s_in = jnp.take(states, positions, axis=0)
  if starts is not None:  # a segment that starts a document sees nothing before it
    s_in = jnp.where(jnp.take(starts, positions, axis=0)[..., None, None, None], 0.0, s_in)
  return s_in, states[-1]
