"""The scan exchange's static schedule: which device sends which segment slot in which round
(computed on the host, cached per layout and axis size)."""

from __future__ import annotations

import dataclasses
import functools

from lasp_jax.sequence_parallel import layout as layout_lib

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
