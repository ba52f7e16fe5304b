"""The scan exchange: Hillis-Steele over ``ppermute`` (``ceil(log2 P)`` rounds, O(1) summaries
held) with a custom backward through the same rounds in reverse (design §10)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lasp_jax.sequence_parallel.exchange.schedule import _owners, _schedule
from lasp_jax.sequence_parallel.exchange.summaries import _bits

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
    init = x0.reset(jnp.ones((bsz,), bool)).with_state(
        jax.tree.map(lambda x: x.astype(jnp.float32), initial))
    slots[first_slot] = _select(me == first_dev, x0.compose(init), x0)

  inc = slots                               # I: inclusive prefix, lower boundary not applied
  exc = [x.with_state(jax.tree.map(jnp.zeros_like, x.state)) for x in slots]   # A: exclusive
  low = None if ids is None else list(ids[0])       # first id of the ranges' lowest segment
  starts = [None] * nseg
  rounds = _schedule(owner, w)
  for k, channels in enumerate(rounds):
    last_round = k == len(rounds) - 1

    def payload(s):  # the last round's composites feed no later round: their states suffice
      parts = jax.tree.leaves(inc[s].state if last_round else inc[s])
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
        if last_round:  # its transition is not used
          state = jax.tree.structure(inc_s.state)
          earlier = inc_s.with_state(jax.tree.unflatten(state, parts[:state.num_leaves]))
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
          new_inc = inc_s.with_state(new_inc.state)
          new_exc = exc_s.with_state(new_exc.state)
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
      st = jax.tree.map(lambda x, i: jnp.where(me == first_dev, i.astype(x.dtype), x), st, initial)
    if starts[s] is not None:
      st = jax.tree.map(
          lambda x, s=s: jnp.where(starts[s].reshape((bsz,) + (1,) * (x.ndim - 1)), 0.0, x), st)
    s_in.append(st)
  final = None
  if want_final:
    final = jax.tree.map(lambda x: jax.lax.psum(jnp.where(me == last_dev, x, 0.0), axis_name),
                         inc[last_slot].state)
  return s_in, final, starts


def _slots(tree, nseg):
  return [jax.tree.map(lambda x, s=s: x[s], tree) for s in range(nseg)]


def _scan_forward(axis_name, layout, local, edge_ids, initial):
  nseg, bsz = jax.tree.leaves(local)[0].shape[:2]
  owner = _owners(layout, jax.lax.axis_size(axis_name))
  ids = None if edge_ids is None else [_slots(_bits(i), nseg) for i in edge_ids]
  s_in, final, starts = _scan_core(_slots(local, nseg), axis_name=axis_name, owner=owner,
                                   ids=ids, initial=initial)
  s_in = jax.tree.map(lambda *x: jnp.stack(x), *s_in)
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
    ys.append(y.with_state(jax.tree.map(
        lambda c, s=s: jnp.where(starts[s].reshape((-1,) + (1,) * (c.ndim - 2)), 0.0, c[s]),
        ct_in)))
  lam_next, lam_0, _ = _scan_core(ys, axis_name=axis_name, owner=owner, initial=ct_fin,
                                  want_final=initial is not None)
  grads = []
  for s, x in enumerate(xs):
    earlier = jax.lax.stop_gradient(x).with_state(jax.tree.map(lambda v, s=s: v[s], s_in))
    _, vjp = jax.vjp(lambda x: x.compose(earlier).state, x)
    grads.append(vjp(jax.tree.map(lambda lam, v: lam.astype(v.dtype), lam_next[s], s_in))[0])
  d_local = jax.tree.map(lambda *g: jnp.stack(g), *grads)
  d_initial = None if initial is None else jax.tree.map(lambda lam, i: lam.astype(i.dtype),
                                                         lam_0, initial)
  return d_local, None, d_initial


_scan.defvjp(_scan_forward, _scan_backward)


def scan_prefix(local, *, axis_name, layout, edge_ids=None, initial=None, send=None):
  """Incoming states of this shard's segments and the final state, by a log-depth scan.

  The same arguments and results as :func:`allgather_prefix`; ``send`` is accepted and ignored:
  a leaf that is the same on every segment (a constant decay's ``gamma``) is not the same on a
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
