"""The all-gather exchange (LASP-2): every summary in one float32 buffer, one all-gather, then a
local fold."""

from __future__ import annotations


import jax
import jax.numpy as jnp

from lasp_jax.sequence_parallel import layout as layout_lib
from lasp_jax.sequence_parallel.exchange.summaries import _bits

def allgather_prefix(local, *, axis_name, layout, edge_ids=None, initial=None, send=None):
  """Incoming states of this shard's segments and the final state, by one all-gather.

  Args:
    local: a summary pytree whose leaves are ``(S, B, ...)``: this shard's ``S`` segments (1
      contiguous, 2 zigzag) in local order.
    axis_name: the sequence mesh axis; layout: ``"contiguous"`` or ``"zigzag"``.
    edge_ids: None, or ``(first, last)``, each ``(S, B)`` int: the segment ids of each segment's
      first and last token; a segment whose first id differs from its predecessor's last starts a
      document there (design §13).
    initial: None or a state like ``local.state`` without the segment axis (``(B, H, Dk, Dv)``):
      the state before the first token of the sequence.
    send: a pytree of bools like ``local`` (None: all True); a False leaf is the same on every
      segment (e.g. a constant decay's ``gamma``) and is not sent.

  Returns:
    ``(s_in, final)``: ``s_in (S, B, H, Dk, Dv)`` the incoming state of each local segment (zero
    where it starts a document), ``final (B, H, Dk, Dv)`` the state after the last token (pytrees
    like ``local.state`` where it is one).
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
    zero = zero.with_state(jax.tree.map(lambda x: x.astype(jnp.float32)[None], initial))
    summaries = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), zero, summaries)

  # prefix[i] = x_i o ... o x_0: each prefix folds only earlier summaries, so a NaN later in the
  # sequence never reaches an earlier segment.
  prefix = jax.lax.associative_scan(lambda earlier, later: later.compose(earlier), summaries)
  states = prefix.state                                 # (P or P+1, B, H, Dk, Dv), inclusive
  if initial is None:
    states = jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x]), states)
  # states[p] is now the state before global segment p; the last is the final state.
  me = jax.lax.axis_index(axis_name)
  positions = jnp.stack([jnp.asarray(layout_lib.segment_global_index(layout, me, w, s))
                         for s in range(nseg)])
  s_in = jax.tree.map(lambda x: jnp.take(x, positions, axis=0), states)
  if starts is not None:  # a segment that starts a document sees nothing before it
    start = jnp.take(starts, positions, axis=0)
    s_in = jax.tree.map(
        lambda x: jnp.where(start.reshape(start.shape + (1,) * (x.ndim - 2)), 0.0, x), s_in)
  return s_in, jax.tree.map(lambda x: x[-1], states)
