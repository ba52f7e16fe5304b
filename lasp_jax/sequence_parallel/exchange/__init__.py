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

The package, by job: ``summaries`` (the types and their :class:`Summary` protocol), ``allgather``,
``schedule`` (the scan's host-side rounds), ``scan``, ``cost`` (choosing one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.sequence_parallel.exchange.allgather import allgather_prefix
from lasp_jax.sequence_parallel.exchange.cost import (ALLGATHER_HELD_PER_SUMMARY,
                                                       DEFAULT_MEMORY_BUDGET, HARDWARE,
                                                       SCAN_HELD_PER_SEGMENT, STRATEGIES,
                                                       choose_exchange, default_hardware,
                                                       exchange_cost)
from lasp_jax.sequence_parallel.exchange.scan import scan_prefix
from lasp_jax.sequence_parallel.exchange.schedule import scan_counts, scan_schedule
from lasp_jax.sequence_parallel.exchange.summaries import (DeltaSummary, DiagonalSummary, Marked,
                                                            Summary)

__all__ = ["ALLGATHER_HELD_PER_SUMMARY", "DEFAULT_MEMORY_BUDGET", "HARDWARE",
           "SCAN_HELD_PER_SEGMENT", "STRATEGIES", "DeltaSummary", "DiagonalSummary", "Marked",
           "Summary", "allgather_prefix", "choose_exchange", "default_hardware", "exchange_cost", "prefix",
           "scan_counts", "scan_prefix", "scan_schedule"]


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
    state_bytes = bsz * sum(x[0, 0].size * 4 for x in jax.tree.leaves(local.state))
    strategy = choose_exchange(w, summary, state_bytes=state_bytes,
                               segments=nseg, hardware=default_hardware(w))
  fn = scan_prefix if strategy == "scan" else allgather_prefix
  s_in, final = fn(local, axis_name=axis_name, layout=layout, edge_ids=edge_ids, initial=initial,
                   send=send)
  if strategy == "allgather":
    # Every device folded the same summaries, but shard_map cannot know that the result is
    # replicated: one device's copy through a psum makes it so, and its transpose sends the
    # cotangent back to that one copy, not to W of them.
    first = jax.lax.axis_index(axis_name) == 0
    final = jax.tree.map(lambda x: jax.lax.psum(jnp.where(first, x, 0.0), axis_name), final)
  return s_in, final
