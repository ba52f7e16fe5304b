"""The one exchange of every linear recurrence over the sequence axis (design §10).

A run of tokens acts on the state as an affine map, its *summary* ``S_out = M S_in + E``; summaries
compose associatively, ``(M2, E2) o (M1, E1) = (M2 M1, M2 E1 + E2)``. Sequence parallelism is the
exclusive prefix of the segments' summaries in global segment order: each segment then runs its
local pass from its incoming state ``S_in``. A family supplies its summary type (a pytree with
``compose`` and ``reset``); this module moves and folds summaries and knows nothing else.

Strategy ``allgather`` (LASP-2): every leaf of every local summary goes into ONE float32 buffer and
ONE all-gather (its transpose, backward, is one reduce-scatter of the same size); then each device
folds the ``P = W * segments-per-shard`` summaries locally with an associative scan. One step, but
memory and bytes grow with ``W``.

Strategy ``scan`` (:func:`scan_prefix`): Hillis-Steele over ``ppermute``, ``ceil(log2 P)`` rounds
of one summary per segment slot (the last round sends states only), O(1) summaries held, and a
custom backward that runs the transposed recurrence through the same rounds in reverse order.
``auto`` picks one by the cost model of :func:`exchange_cost`; :func:`prefix` dispatches.

Packed documents cost nothing extra: a document start inside a segment is already in its summary
(``M = 0``); a start at a segment's *first* token depends on the predecessor's last token, so the
first and last segment ids ride in the same buffer (bit-cast, exact) and the reset is applied after
the gather. An initial state is one more summary ``(0, S_0)`` before segment 0, and the inclusive
fold over all segments is the final state, the same on every device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

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

  def transpose(self) -> "DiagonalSummary":
    """The summary with ``M^T`` (a diagonal is its own transpose): the scan's backward runs the
    transposed recurrence ``lambda_p = M_p^T lambda_{p+1} + g_p`` through the same scan."""
    return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaSummary:
  """``S_out = m S_in + state`` for a batch of segments of the delta rule (design §11).

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

  def transpose(self) -> "DeltaSummary":
    """The summary with ``m^T``, for the scan's backward (see ``DiagonalSummary.transpose``)."""
    return DeltaSummary(jnp.swapaxes(self.m, -1, -2), self.state)


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
      document there (design §13).
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


# --- scan: Hillis-Steele over ppermute ------------------------------------------------------------
#
# Global segment positions p = 0 .. P-1 (P = W * S) each hold one summary x_p. Round k (offset
# d = 2**k, k = 0 .. R-1, R = ceil(log2 P)) sends every position's inclusive prefix I_p to p + d.
# Each position keeps two summaries: I_p over [p - 2d + 1, p] and the exclusive A_p over
# [p - 2d + 1, p - 1]; both are updated with the SAME received I_{p-d} (A_p <- A_p o I_{p-d},
# I_p <- I_p o I_{p-d}), so the exclusive prefix needs no extra shift at the end. After R rounds
# A_p is the prefix over [0, p - 1] (the incoming state) and I_{P-1} over everything (the final).
#
# Document starts ride in the same messages: a range's summary is kept with its LOWER boundary
# not yet applied, plus the first segment id of the range. The receiver compares that first id
# with the last id of the received range (the sender's own segment's last id) and resets its own
# ranges there before composing: the predecessor's last id costs no extra collective.


@dataclasses.dataclass(frozen=True)
class _Channel:
  """One message per device in one round: a ppermute (``perm``) or a local copy (``perm=None``).

  ``send_slot[r]``: the local segment slot device ``r`` sends (any where it sends nothing);
  ``recv_slot[r]``: the slot that receives on device ``r``, -1 for none.
  """
  perm: tuple | None
  send_slot: tuple
  recv_slot: tuple


def _colour_edges(edges):
  """Bipartite edge colouring with max-degree colours (Konig; Kempe-chain swaps).

  ``edges``: ``(src_device, dst_device)`` pairs, each device sending and receiving at most ``D``
  of them. Returns one colour per edge in ``0 .. D-1``: each colour is a permutation (every
  device sends at most one message and receives at most one), i.e. one ppermute.
  """
  degree = max([sum(1 for e in edges if e[0] == s) for s, _ in edges]
               + [sum(1 for e in edges if e[1] == d) for _, d in edges] + [0])
  at = {}                                            # (node, colour) -> edge index
  colour = [None] * len(edges)
  ends = lambda j: (("s", edges[j][0]), ("r", edges[j][1]))  # noqa: E731
  for i in range(len(edges)):
    u, v = ends(i)
    a = next(c for c in range(degree) if (u, c) not in at)
    b = next(c for c in range(degree) if (v, c) not in at)
    if (v, a) in at:  # flip the a/b path from v: in a bipartite graph it never reaches u
      path, x, c = [], v, a
      while (x, c) in at:
        j = at[(x, c)]
        path.append(j)
        x = ends(j)[1] if x == ends(j)[0] else ends(j)[0]
        c = b if c == a else a
      for j in path:
        for node in ends(j):
          del at[(node, colour[j])]
      for j in path:
        colour[j] = b if colour[j] == a else a
        for node in ends(j):
          at[(node, colour[j])] = j
    colour[i] = a
    at[(u, a)] = at[(v, a)] = i
  return colour


def _owners(layout: str, w: int, reverse: bool = False) -> tuple:
  """``(device, slot)`` of each global segment position (last first when ``reverse``)."""
  nseg = layout_lib.segments_per_shard(layout)
  owner = tuple(divmod(int(o), nseg) for o in layout_lib.segment_order(layout, w))
  return owner[::-1] if reverse else owner


@functools.lru_cache(maxsize=None)
def _schedule(owner: tuple, w: int) -> tuple:
  rounds, d = [], 1
  while d < len(owner):
    edges = [(owner[p], owner[p + d]) for p in range(len(owner) - d)]
    remote = [e for e in edges if e[0][0] != e[1][0]]
    local = [e for e in edges if e[0][0] == e[1][0]]
    colours = _colour_edges([(s[0], t[0]) for s, t in remote])
    groups = [[e for e, c in zip(remote, colours) if c == k]
              for k in range(max(colours, default=-1) + 1)]
    channels = []
    for group in groups + ([local] if local else []):
      send, recv = [0] * w, [-1] * w
      for (sd, ss), (td, ts) in group:
        send[sd], recv[td] = ss, ts
      perm = None if group is local else tuple((s[0], t[0]) for s, t in group)
      channels.append(_Channel(perm, tuple(send), tuple(recv)))
    rounds.append(tuple(channels))
    d *= 2
  return tuple(rounds)


def scan_schedule(layout: str, w: int, reverse: bool = False) -> tuple:
  """The rounds of the scan exchange on ``W = w`` devices (host-side, static): a tuple of rounds,
  each a tuple of ``_Channel``s. ``reverse``: the backward's, over positions last to first.

  Round ``k`` moves position ``p``'s prefix to ``p + 2**k``. Contiguous: one ppermute a round
  (``r -> r + d``). Zigzag: device ``r`` holds positions ``r`` and ``2W-1-r``, so it sends and
  receives up to two messages a round; those edges (a bipartite multigraph of degree <= 2) are
  coloured into two permutations, two ppermutes, each device's sent and received slot chosen by
  a table. A round with ``d >= W`` has degree 1 (only first-half slots send, only second-half
  slots receive): one ppermute. The edge between a device's own two segments (``W-1 -> W`` at
  ``d = 1``) is a local copy.
  """
  return _schedule(_owners(layout, w, reverse), w)


def scan_counts(layout: str, w: int, reverse: bool = False) -> dict:
  """What one pass of the scan sends per device, from its schedule: ``rounds`` (sequential
  steps), ``permutes`` (collective-permutes in the HLO), ``full_messages`` (permutes of a whole
  summary: every round but the last) and ``state_messages`` (the last round's: states only).

  ``permutes``: contiguous ``ceil(log2 W)``; zigzag ``2 ceil(log2 W) + 1`` for ``W >= 3`` (2 at
  ``W = 2``, 0 at ``W = 1``); the same for ``reverse``.
  """
  rounds = scan_schedule(layout, w, reverse)
  per = [sum(c.perm is not None for c in r) for r in rounds]
  return dict(rounds=len(rounds), permutes=sum(per), full_messages=sum(per[:-1]),
              state_messages=per[-1] if per else 0)


def _select(cond, a, b):
  """``where(cond, a, b)`` leaf by leaf; ``cond`` a scalar or ``(B,)`` (batch-leading leaves)."""
  def pick(x, y):
    c = cond if jnp.ndim(cond) == 0 else cond.reshape(cond.shape + (1,) * (x.ndim - 1))
    return jnp.where(c, x, y)
  return jax.tree.map(pick, a, b)


def _pack(parts):
  """Arrays ``(B, ...)`` -> one float32 ``(B, F)`` buffer: one message, one ppermute."""
  return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in parts], -1)


def _unpack(buf, templates):
  """The inverse of :func:`_pack`, shaped and typed like ``templates``."""
  out, offset = [], 0
  for t in templates:
    size = t[0].size
    out.append(buf[:, offset:offset + size].reshape(t.shape).astype(t.dtype))
    offset += size
  return out


def _differ(a_bits, b_bits):
  """``(B,)``: ids (float32 words from :func:`_bits`) differ; compared as int32, not as floats
  (a bit pattern may be a NaN, which equals nothing)."""
  as_int = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)  # noqa: E731
  return jnp.any(as_int(a_bits) != as_int(b_bits), axis=-1)


def _scan_core(slots, *, axis_name, owner, ids=None, initial=None, want_final=True):
  """The scan over positions ``owner`` (``(device, slot)`` each, in order).

  Args:
    slots: this device's summaries, one per slot, leaves ``(B, ...)``.
    ids: None or ``(first, last)``, each a list per slot of ``(B, k)`` float32 id words.
    initial: None or a state ``(B, ...)`` before position 0.

  Returns:
    ``(s_in, final, starts)``: per slot the incoming state (zero where a document starts), the
    state after the last position replicated by a masked psum (None unless ``want_final``), and
    per slot ``(B,)`` bools where a document starts at the segment's first token (None: never).
  """
  w = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  nseg, bsz = len(slots), jax.tree.leaves(slots[0])[0].shape[0]
  (first_dev, first_slot), (last_dev, last_slot) = owner[0], owner[-1]
  slots = list(slots)
  if initial is not None:  # the summary (0, S_0) composed into position 0 before the scan
    x0 = slots[first_slot]
    init = dataclasses.replace(x0.reset(jnp.ones((bsz,), bool)), state=initial.astype(jnp.float32))
    slots[first_slot] = _select(me == first_dev, x0.compose(init), x0)

  inc = slots                               # I: inclusive prefix, lower boundary not applied
  exc = [dataclasses.replace(x, state=jnp.zeros_like(x.state)) for x in slots]   # A: exclusive
  low = None if ids is None else list(ids[0])       # first id of the ranges' lowest segment
  starts = [None] * nseg
  rounds = _schedule(owner, w)
  for k, channels in enumerate(rounds):
    last_round = k == len(rounds) - 1

    def payload(s):  # the last round's composites feed no later round: their states suffice
      parts = [inc[s].state] if last_round else jax.tree.leaves(inc[s])
      if ids is not None:
        parts = parts + ([] if last_round else [low[s]]) + [ids[1][s]]
      return parts

    messages = [_pack(payload(s)) for s in range(nseg)]
    received = [(None, None)] * nseg        # per slot: (valid scalar, buffer)
    for ch in channels:
      out = messages[0]
      if nseg > 1 and any(ch.send_slot):
        out = jnp.where(jnp.asarray(ch.send_slot)[me] == 1, messages[1], messages[0])
      if ch.perm is not None:
        out = jax.lax.ppermute(out, axis_name, list(ch.perm))
      target = jnp.asarray(ch.recv_slot)[me]
      for s in range(nseg):
        if s not in ch.recv_slot:
          continue
        hit = target == s
        valid, buf = received[s]
        received[s] = (hit, out) if valid is None else (valid | hit, jnp.where(hit, out, buf))
    for s in range(nseg):
      valid, buf = received[s]
      if valid is None:
        continue

      def absorb(inc_s, exc_s, low_s, buf, s=s, k=k, last_round=last_round):
        parts = _unpack(buf, payload(s))
        if last_round:
          earlier = dataclasses.replace(inc_s, state=parts[0])  # its transition is not used
        else:
          n = len(jax.tree.leaves(inc_s))
          earlier = jax.tree.unflatten(jax.tree.structure(inc_s), parts[:n])
        cut = jnp.zeros((bsz,), bool)
        if ids is not None:  # a document starts at the lower boundary of this slot's ranges
          cut = _differ(low_s, parts[-1])
          if not last_round:
            low_s = parts[-2]
        new_inc = inc_s.reset(cut).compose(earlier)
        new_exc = earlier if k == 0 else exc_s.reset(cut).compose(earlier)
        if last_round:  # states only: the composites' transitions are dead (not even computed)
          new_inc = dataclasses.replace(inc_s, state=new_inc.state)
          new_exc = dataclasses.replace(exc_s, state=new_exc.state)
        return new_inc, new_exc, low_s, cut

      def keep(inc_s, exc_s, low_s, buf):  # (low vs itself: False, typed like absorb's cut)
        return inc_s, exc_s, low_s, (jnp.zeros((bsz,), bool) if low_s is None
                                     else _differ(low_s, low_s))

      # A cond, not a select: its outputs are materialised each round. With selects XLA fuses
      # the exclusive prefix's chain of elementwise updates (each consumed only by the next)
      # into one consumer at the end, which then reads, and keeps alive, every round's
      # message: O(log W) buffers instead of O(1). Non-receivers also skip the work.
      inc[s], exc[s], low_s, cut = jax.lax.cond(
          valid, absorb, keep, inc[s], exc[s], None if low is None else low[s], buf)
      if low is not None:
        low[s] = low_s
      if k == 0 and ids is not None:
        starts[s] = cut

  s_in = []
  for s in range(nseg):
    st = exc[s].state
    if initial is not None and s == first_slot:
      st = jnp.where(me == first_dev, initial.astype(st.dtype), st)
    if starts[s] is not None:
      st = jnp.where(starts[s].reshape((bsz,) + (1,) * (st.ndim - 1)), 0.0, st)
    s_in.append(st)
  final = None
  if want_final:
    final = jax.lax.psum(jnp.where(me == last_dev, inc[last_slot].state, 0.0), axis_name)
  return s_in, final, starts


def _slots(tree, nseg):
  return [jax.tree.map(lambda x, s=s: x[s], tree) for s in range(nseg)]


def _scan_forward(axis_name, layout, local, edge_ids, initial):
  nseg, bsz = jax.tree.leaves(local)[0].shape[:2]
  owner = _owners(layout, jax.lax.axis_size(axis_name))
  ids = None if edge_ids is None else [_slots(_bits(i), nseg) for i in edge_ids]
  s_in, final, starts = _scan_core(_slots(local, nseg), axis_name=axis_name, owner=owner,
                                   ids=ids, initial=initial)
  s_in = jnp.stack(s_in)
  starts = jnp.stack([jnp.zeros((bsz,), bool) if x is None else x for x in starts])
  return (s_in, final), (local, starts, s_in, initial)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(axis_name, layout, local, edge_ids, initial):
  return _scan_forward(axis_name, layout, local, edge_ids, initial)[0]


def _scan_backward(axis_name, layout, res, cts):
  """The transposed recurrence through the same scan, last position first.

  With ``U_p`` the incoming state of position ``p`` (zero at a start), ``T_{p+1} = M_p U_p + E_p``
  and cotangents ``g_p`` (of ``U_p``) and ``g_F`` (of the final ``T_P``), the adjoint of ``T_p`` is
  ``lambda_p = [p starts ? 0 : M_p^T lambda_{p+1} + g_p]``, ``lambda_P = g_F``: an affine
  recurrence in reverse order with summaries ``(M_p^T, g_p)`` reset at starts, i.e. an exclusive
  prefix over the reversed positions from the initial state ``g_F``. Then ``dE_p = lambda_{p+1}``,
  ``dM_p`` from the summary's own ``compose`` (a local VJP against ``U_p``), and the initial
  state's cotangent is ``lambda_0``, the reversed scan's final. Residuals: the local summaries,
  the starts and the incoming states (all O(1) in W).
  """
  local, starts, s_in, initial = res
  ct_in, ct_fin = cts
  nseg = starts.shape[0]
  owner = _owners(layout, jax.lax.axis_size(axis_name), reverse=True)
  xs = _slots(local, nseg)
  ys = []
  for s, x in enumerate(xs):
    y = x.transpose().reset(starts[s])
    ys.append(dataclasses.replace(
        y, state=jnp.where(starts[s].reshape((-1,) + (1,) * (ct_in.ndim - 2)), 0.0, ct_in[s])))
  lam_next, lam_0, _ = _scan_core(ys, axis_name=axis_name, owner=owner, initial=ct_fin,
                                  want_final=initial is not None)
  grads = []
  for s, x in enumerate(xs):
    earlier = dataclasses.replace(jax.lax.stop_gradient(x), state=s_in[s])
    _, vjp = jax.vjp(lambda x: x.compose(earlier).state, x)
    grads.append(vjp(lam_next[s].astype(s_in.dtype))[0])
  d_local = jax.tree.map(lambda *g: jnp.stack(g), *grads)
  d_initial = None if initial is None else lam_0.astype(initial.dtype)
  return d_local, None, d_initial


_scan.defvjp(_scan_forward, _scan_backward)


def scan_prefix(local, *, axis_name, layout, edge_ids=None, initial=None, send=None):
  """Incoming states of this shard's segments and the final state, by a log-depth scan.

  The same arguments and results as :func:`allgather_prefix`; ``send`` is accepted and ignored:
  a leaf that is the same on every segment (a constant decay's ``log_m``) is not the same on a
  composite of several segments, and it is ``1 / (Dk Dv)`` of a message.

  Hillis-Steele over ``jax.lax.ppermute`` on the ``P = W S`` global segment positions (``S``
  segments per shard: 1 contiguous, 2 zigzag), ``R = ceil(log2 P)`` rounds. Each round sends
  every position's inclusive prefix ``d = 2**k`` positions on; every position updates its
  inclusive and its exclusive prefix with the same message, so the exclusive prefix needs no extra
  state-only shift at the end (it would cost one more step). The last round's message is the state
  alone (its composites' transitions feed no later round). Per device, forward (from
  :func:`scan_counts`, checked in the compiled HLO):

  - contiguous: ``R = ceil(log2 W)`` steps, ``R`` collective-permutes; rounds ``1 .. R-1`` send
    ``B (|M| + H Dk Dv [+ 2k])`` float32 words each, the last ``B (H Dk Dv [+ k])``.
  - zigzag: ``R = ceil(log2 W) + 1`` steps; 2 collective-permutes a round (the two slots'
    messages coloured into two permutations) but 1 in the last (``d >= W``):
    ``2 ceil(log2 W) + 1`` permutes for ``W >= 3`` (2 at ``W = 2``, 0 at ``W = 1``), same sizes.

  ``|M|`` is the transition's words per row (``H Dg`` diagonal, ``H Dk Dk`` delta), ``k`` the
  words per id (1; 2 for 64-bit ids): the first id of the sender's range and its last id, for
  document starts (``[+ ...]`` only with ``edge_ids``). The final state lives on the device of the
  last global segment and is replicated by a masked psum: one all-reduce of ``B H Dk Dv`` float32
  (``2 (W-1)/W`` of it received per device on a ring), which XLA drops when it is unused.

  Backward (a ``custom_vjp``): the transposed recurrence through the same scan over the positions
  in reverse (:func:`_scan_backward`): the same number of collective-permutes, without id words,
  plus one all-reduce for the initial state's cotangent when ``initial`` is given. Autodiff of the
  forward ppermutes would also be log-depth (each ppermute's transpose is a ppermute) but keeps
  every round's messages for the backward: O(log W) summaries (measured 2-5 more per round); this
  keeps O(1): the local summaries, the starts and the incoming states. Measured fwd+bwd
  temporaries (XLA:CPU, tests/sequence_parallel/test_exchange.py, benchmarks/memory.py): the same
  from W = 8 to 256, ~5 summaries per local segment, one summary less at W = 4 (one full-message
  round only); the all-gather's grow by 6-9 summaries per gathered one. Forward-mode
  (``jax.jvp``) is not supported through it.
  """
  del send
  return _scan(axis_name, layout, local, edge_ids, initial)


# --- choosing: a cost model -----------------------------------------------------------------------

STRATEGIES = ("allgather", "scan", "auto")

# Assumed link parameters (orders of magnitude to be replaced by measurements on the machine):
#   latency_s: fixed cost of one collective (launch + synchronisation);
#   step_s:    one step of a ring collective, or one hop of a routed message;
#   bandwidth: bytes/s one device gets for a point-to-point message;
#   topology:  "switched" (every pair one hop: NVSwitch, a fat-tree InfiniBand fabric), "ring"
#              (the axis is one torus ring: a message d devices away takes min(d, W-d) hops and
#              loads as many links; an all-gather uses both ring directions, twice ``bandwidth``)
#              or a tuple of torus dims (devices in row-major order: hops add over the dims).
HARDWARE = {
    # TPU v5p, the sequence axis along a torus ring of ICI: 4800 Gb/s per chip over 6 links,
    # ~100 GB/s per link and direction; 5 us per collective (as benchmarks/scaling.py), 1 us/hop.
    "tpu_ici": dict(latency_s=5e-6, step_s=1e-6, bandwidth=100e9, topology="ring"),
    # 8 A100s in a node behind NVSwitch: 300 GB/s per direction per GPU; ~10 us per NCCL call.
    "nvlink": dict(latency_s=10e-6, step_s=1e-6, bandwidth=300e9, topology="switched"),
    # GPUs across nodes, one HDR 200 Gb/s NIC per GPU (the paper's A100 cluster): 25 GB/s,
    # 20 us per call (as benchmarks/scaling.py), ~5 us per ring step.
    "infiniband": dict(latency_s=20e-6, step_s=5e-6, bandwidth=25e9, topology="switched"),
}
# Per-device fwd+bwd temporaries, in summaries, measured on XLA:CPU (benchmarks/memory.py, the
# exchange alone, H=16, Dk=Dv=128, W=256): the all-gather holds the gathered buffer and its fold's
# levels for the backward, 6-7 per gathered summary (6-9 at the tests' small sizes); the scan's
# live set is the same from W=8 on, ~5 per local segment.
ALLGATHER_HELD_PER_SUMMARY = 7
SCAN_HELD_PER_SEGMENT = 5
DEFAULT_MEMORY_BUDGET = 256 * 2 ** 20


def _hops(a, b, dims):
  """Hops between devices ``a`` and ``b`` on a torus of ``dims`` (row-major numbering)."""
  total = 0
  for n in reversed(dims):
    (a, x), (b, y) = divmod(a, n), divmod(b, n)
    total += min(abs(x - y), n - abs(x - y))
  return total


def exchange_cost(strategy, w, summary_bytes, *, segments=1, state_bytes=None,
                  hardware="nvlink", **overrides):
  """Modelled forward cost of one exchange per device (the backward mirrors it).

  Args:
    strategy: ``"allgather"`` or ``"scan"``; w: devices on the axis; summary_bytes: one segment's
      summary (``(M, E)``, float32) in bytes; segments: per device (1 contiguous, 2 zigzag);
      state_bytes: its ``E`` alone (the scan's last round sends only that; default the summary);
      hardware: a key of ``HARDWARE``; overrides: any of its fields (e.g. ``topology=(16, 16)``
      for a 256-device axis over two torus dimensions).

  Model, with ``alpha`` = ``latency_s``, ``tau`` = ``step_s``, ``beta`` = ``bandwidth``,
  ``P = W * segments``, ``b`` = ``summary_bytes``:

    allgather: ``alpha + (W-1) tau + (W-1) segments b / beta_ag``, one step; holds
               ``ALLGATHER_HELD_PER_SUMMARY * P * b`` (``beta_ag = 2 beta`` on a ring);
    scan:      ``sum over rounds k of alpha + h_k tau + sum_c h_c m_k / beta``, ``R = ceil(log2 P)``
               steps, ``c`` the round's ppermutes (1 or 2), ``h_c`` their longest route in hops
               (1 switched; on a torus the hops of the longest route), ``m_k = b`` (last round:
               ``state_bytes``); holds ``SCAN_HELD_PER_SEGMENT * segments * b``, O(1) in W.

  On a switched network the scan moves ``log2 P`` summaries where the all-gather moves ``P-1``;
  on a ring a shift by ``2**k`` loads ``2**k`` links, so the scan's bandwidth term is about the
  all-gather's and it only wins on memory.

  Returns:
    ``dict(time_s, received_bytes, steps, held_bytes)``.
  """
  hw = dict(HARDWARE[hardware], **overrides)
  alpha, tau, beta, topo = hw["latency_s"], hw["step_s"], hw["bandwidth"], hw["topology"]
  ring = topo != "switched"
  dims = (w,) if topo == "ring" else tuple(topo) if ring else None
  if dims is not None and int(np.prod(dims)) != w:
    raise ValueError(f"exchange_cost: torus {dims} does not hold W={w} devices")
  state_bytes = summary_bytes if state_bytes is None else state_bytes
  p = w * segments
  if strategy == "allgather":
    moved = (w - 1) * segments * summary_bytes
    return dict(time_s=alpha + (w - 1) * tau + moved / (beta * (2 if ring else 1)),
                received_bytes=moved, steps=1,
                held_bytes=ALLGATHER_HELD_PER_SUMMARY * p * summary_bytes)
  if strategy != "scan":
    raise ValueError(f"exchange_cost: strategy must be 'allgather' or 'scan', got {strategy!r}")
  layout = "zigzag" if segments == 2 else "contiguous"
  rounds = scan_schedule(layout, w)
  time_s, moved = 0.0, 0
  for k, channels in enumerate(rounds):
    msg = state_bytes if k == len(rounds) - 1 else summary_bytes
    hops = [max([_hops(a, b, dims) if ring else 1 for a, b in c.perm] or [0])
            for c in channels if c.perm is not None]
    time_s += alpha + max(hops, default=0) * tau + sum(hops) * msg / beta
    moved += len(hops) * msg
  return dict(time_s=time_s, received_bytes=moved, steps=len(rounds),
              held_bytes=SCAN_HELD_PER_SEGMENT * segments * summary_bytes)


def choose_exchange(w, summary_bytes, *, segments=1, state_bytes=None, hardware="nvlink",
                    memory_budget_bytes=DEFAULT_MEMORY_BUDGET, **overrides) -> str:
  """``"allgather"`` or ``"scan"`` by :func:`exchange_cost`: the scan where it is modelled faster
  (large ``W * summary_bytes`` on a switched network), or where the all-gather would hold more
  than ``memory_budget_bytes`` per device; else the all-gather (one step: small messages, small W).
  A pure function of its arguments."""
  if w <= 1:
    return "allgather"
  kw = dict(segments=segments, state_bytes=state_bytes, hardware=hardware, **overrides)
  ag = exchange_cost("allgather", w, summary_bytes, **kw)
  sc = exchange_cost("scan", w, summary_bytes, **kw)
  if ag["held_bytes"] > memory_budget_bytes or sc["time_s"] < ag["time_s"]:
    return "scan"
  return "allgather"


def default_hardware(w: int) -> str:
  """The ``HARDWARE`` preset for the default backend: TPU -> ICI; otherwise NVLink up to 8
  devices (one node) and InfiniBand beyond (CPU runs are modelled as GPUs)."""
  if jax.default_backend() == "tpu":
    return "tpu_ici"
  return "nvlink" if w <= 8 else "infiniband"


def prefix(local, *, strategy, axis_name, layout, edge_ids=None, initial=None, send=None):
  """The exchange by ``strategy``: ``"allgather"`` (:func:`allgather_prefix`), ``"scan"``
  (:func:`scan_prefix`) or ``"auto"`` (:func:`choose_exchange` on this axis size, the summary's
  bytes and :func:`default_hardware`; decided at trace time). Same arguments and results, except
  that ``final`` is replicated over ``axis_name`` whatever the strategy (one all-reduce of it,
  which XLA drops when the caller does not use it)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"exchange strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "auto":
    w = jax.lax.axis_size(axis_name)
    leaves = jax.tree.leaves(local)
    nseg, bsz = leaves[0].shape[:2]
    summary = bsz * sum(x[0, 0].size * 4 for x in leaves)       # one segment's, float32
    strategy = choose_exchange(w, summary, state_bytes=bsz * local.state[0, 0].size * 4,
                               segments=nseg, hardware=default_hardware(w))
  fn = scan_prefix if strategy == "scan" else allgather_prefix
  s_in, final = fn(local, axis_name=axis_name, layout=layout, edge_ids=edge_ids, initial=initial,
                   send=send)
  if strategy == "allgather":
    # Every device folded the same summaries, but shard_map cannot know that the result is
    # replicated: one device's copy through a psum makes it so, and its transpose sends the
    # cotangent back to that one copy, not to W of them.
    final = jax.lax.psum(jnp.where(jax.lax.axis_index(axis_name) == 0, final, 0.0), axis_name)
  return s_in, final
