"""Choosing an exchange: a cost model of time and memory per strategy and link."""

from __future__ import annotations

import jax
import numpy as np

from lasp_jax.sequence_parallel.exchange.schedule import scan_schedule

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
