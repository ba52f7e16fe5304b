"""The scan exchange (design §10): ``scan_prefix`` against ``allgather_prefix`` and a float64 numpy
fold of the summaries, values and gradients, every summary type and layout, packed documents and
an initial state, W = 3 and 8 here and W = 12 and 16 in a subprocess; HLO: log-depth permutes,
no all-gather, temporaries that do not grow with W; the dispatcher and the cost model."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lasp_jax import comm
from lasp_jax.sequence_parallel import exchange
from lasp_jax.sequence_parallel import layout as layout_lib
from tests import references as refs
from tests.references import rel_err

B, H, DK, DV = 2, 2, 4, 3
KINDS = ("diag_scalar", "diag_channel", "delta")
LAYOUTS = ("contiguous", "zigzag")
TOL = 2e-5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The log M of a segment with a document start inside it: the sum of clamped log-decays that the
# kernels produce there, some -1e4. Its exp is exactly 0 in float32 and float64, which is all the
# references below rely on (a local value, not the implementation's floor).
INNER_RESET_GAMMA = -1e4


# --- inputs: summaries in global segment order, then laid out per device -------------------------

def _starts_and_inner(p_total):
  """Per global position and row: a document starts at its first token (``start``), and one
  starts inside it (``inner``: its summary's M is 0). Row 1 is one document throughout.

  Row 0 starts at positions 2 and P-1 (device edges in both layouts: in zigzag position W-1 -> W
  is the edge between one device's own two segments, so position W starts there too) and inside
  positions 1, W and P-2; position 1 is followed by a start, so a segment that is its own
  document (start at both ends) is covered."""
  start = np.zeros((p_total, B), bool)
  inner = np.zeros((p_total, B), bool)
  for p in (2, p_total // 2, p_total - 1):
    if 0 < p < p_total:
      start[p, 0] = True
  for p in (1, p_total // 2, p_total - 2):
    if 0 <= p < p_total:
      inner[p, 0] = True
  return start, inner


def global_summaries(kind, p_total, packed, seed=0):
  """``(summary with leaves (P, B, ...), edge ids (first, last) each (P, B) int32 or None,
  start (P, B))`` in global segment order; float32."""
  rng = np.random.default_rng(seed)
  state = rng.standard_normal((p_total, B, H, DK, DV)).astype(np.float32)
  start, inner = _starts_and_inner(p_total)
  if not packed:
    start[:], inner[:] = False, False
  if kind == "delta":
    m = (0.8 * np.eye(DK) + 0.4 * rng.standard_normal((p_total, B, H, DK, DK)) / np.sqrt(DK))
    m = np.where(inner[:, :, None, None, None], 0.0, m).astype(np.float32)
    summ = exchange.DeltaSummary(jnp.asarray(m), jnp.asarray(state))
  else:
    dg = 1 if kind == "diag_scalar" else DK
    gamma = -rng.uniform(0.05, 1.5, (p_total, B, H, dg))
    gamma = np.where(inner[:, :, None, None], INNER_RESET_GAMMA, gamma).astype(np.float32)
    summ = exchange.DiagonalSummary(jnp.asarray(gamma), jnp.asarray(state))
  ids = None
  if packed:   # a change of id is a start; ids reused (mod 3) so that only changes matter
    # first id of segment p: documents begun up to p's start; last: plus one inside p.
    first = (np.cumsum(start, axis=0) + np.cumsum(inner, axis=0) - inner) % 3
    last = (first + inner) % 3
    ids = (first.astype(np.int32), last.astype(np.int32))
  return summ, ids, start


def numpy_fold(summ, start, initial=None):
  """The independent reference: ``S <- M S + E`` over global positions in float64, the state
  dropped where a document starts. Returns ``(s_in (P, B, H, Dk, Dv), final)``."""
  state = np.asarray(summ.state, np.float64)
  s = np.zeros(state.shape[1:]) if initial is None else np.asarray(initial, np.float64)
  s_in = []
  for p in range(state.shape[0]):
    s = np.where(start[p][:, None, None, None], 0.0, s)
    s_in.append(s)
    if isinstance(summ, exchange.DeltaSummary):
      s = np.einsum("bhij,bhjv->bhiv", np.asarray(summ.m[p], np.float64), s) + state[p]
    else:
      s = np.exp(np.asarray(summ.gamma[p], np.float64))[..., None] * s + state[p]
  return np.stack(s_in), s


def jnp_fold(delta, m_or_log_m, state, start, initial=None):
  """``numpy_fold`` in jnp, for float64 autodiff (``refs.f64``): the reference gradients."""
  s = jnp.zeros(state.shape[1:], state.dtype) if initial is None else initial
  s_in = []
  for p in range(state.shape[0]):
    s = jnp.where(start[p][:, None, None, None], 0.0, s)
    s_in.append(s)
    if delta:
      s = jnp.einsum("bhij,bhjv->bhiv", m_or_log_m[p], s) + state[p]
    else:
      s = jnp.exp(m_or_log_m[p])[..., None] * s + state[p]
  return jnp.stack(s_in), s


def fold_grads(summ, start, initial, ct_in, ct_fin):
  """Float64 gradients of ``sum(s_in * ct_in) + sum(final * ct_fin)`` through ``jnp_fold``
  w.r.t. the summary's two leaves (global order) and the initial state (if any)."""
  delta = isinstance(summ, exchange.DeltaSummary)
  leaves = (summ.m, summ.state) if delta else (summ.gamma, summ.state)
  start = np.asarray(start)

  def loss(a, b, ct_in, ct_fin, initial=None):
    s_in, final = jnp_fold(delta, a, b, start, initial)
    return jnp.sum(s_in * ct_in) + jnp.sum(final * ct_fin)

  if initial is None:
    return refs.f64(jax.grad(loss, argnums=(0, 1)), *leaves, ct_in, ct_fin)
  return refs.f64(jax.grad(loss, argnums=(0, 1, 4)), *leaves, ct_in, ct_fin, initial)


def to_local(x, layout, w):
  """Global order ``(P, ...)`` -> device layout ``(W, S, ...)``."""
  inv = np.argsort(layout_lib.segment_order(layout, w))
  nseg = layout_lib.segments_per_shard(layout)
  return x[inv].reshape(w, nseg, *x.shape[1:])


def to_global(x, layout, w):
  """Device layout ``(W, S, ...)`` -> global order ``(P, ...)``."""
  return x.reshape(-1, *x.shape[2:])[layout_lib.segment_order(layout, w)]


def device_local(x, mesh):
  """A ``(W, ...)`` array split over the mesh's ``"sp"`` axis."""
  return jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("sp")))


def mesh_of(w):
  return jax.make_mesh((w,), ("sp",), devices=jax.devices()[:w])


def exchange_fn(strategy, layout, w, packed, with_initial, mesh):
  """``(local leaves (W, S, B, ...), ids, initial) -> (s_in (W, S, ...), final (B, ...))``: the
  exchange in a shard_map. ``final`` leaves it replicated (``out_specs P()``, checked by
  shard_map): the scan's is; the all-gather's every device computes alike, made replicated as
  ``lasp2`` does, by a psum of device 0's copy."""
  fn = {"scan": exchange.scan_prefix, "allgather": exchange.allgather_prefix}[strategy]

  def per_shard(local, ids, initial):
    local = jax.tree.map(lambda x: x[0], local)
    ids = None if ids is None else tuple(i[0] for i in ids)
    s_in, final = fn(local, axis_name="sp", layout=layout, edge_ids=ids, initial=initial)
    if strategy == "allgather":
      final = jax.lax.psum(jnp.where(jax.lax.axis_index("sp") == 0, final, 0.0), "sp")
    return s_in[None], final

  spec = P("sp")
  return jax.shard_map(per_shard, mesh=mesh,
                       in_specs=(spec, None if not packed else (spec, spec),
                                 None if not with_initial else P()),
                       out_specs=(spec, P()))


def _cotangents(p_total, seed=11):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((p_total, B, H, DK, DV)).astype(np.float32),
          rng.standard_normal((B, H, DK, DV)).astype(np.float32))


def run_case(kind, layout, w, packed, with_initial, mesh=None):
  """Both strategies' values and gradients, and the numpy fold: a dict of numpy arrays."""
  mesh = mesh_of(w) if mesh is None else mesh
  nseg = layout_lib.segments_per_shard(layout)
  p_total = w * nseg
  summ, ids, start = global_summaries(kind, p_total, packed)
  initial = (np.random.default_rng(5).standard_normal((B, H, DK, DV)).astype(np.float32)
             if with_initial else None)
  local = jax.tree.map(lambda x: device_local(to_local(np.asarray(x), layout, w), mesh), summ)
  lids = None if ids is None else tuple(device_local(to_local(i, layout, w), mesh) for i in ids)
  if initial is not None:
    initial = jax.device_put(initial, NamedSharding(mesh, P()))
  ct_in, ct_fin = _cotangents(p_total)

  def values_and_grads(strategy, local, lids, initial):
    f = exchange_fn(strategy, layout, w, packed, with_initial, mesh)

    def loss(local, initial):
      s_in, final = f(local, lids, initial)
      # The cotangent in the device layout: no reordering of a sharded array.
      return (jnp.sum(s_in * to_local(ct_in, layout, w)) + jnp.sum(final * ct_fin),
              (s_in, final))
    grads, (s_in, final) = jax.grad(loss, argnums=(0, 1), has_aux=True)(local, initial)
    return s_in, final, grads

  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: (values_and_grads("scan", *a), values_and_grads("allgather", *a)))(
        local, lids, initial)
  (s_sc, f_sc, g_sc), (s_ag, f_ag, g_ag) = out
  s_ref, f_ref = numpy_fold(summ, start, initial)

  def global_grads(g):   # (summary leaves in global order, then the initial state's if any)
    leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
    return [to_global(x, layout, w) for x in leaves[:2]] + leaves[2:]

  return dict(s_in=(to_global(np.asarray(s_sc), layout, w), to_global(np.asarray(s_ag), layout, w),
                    s_ref),
              final=(np.asarray(f_sc), np.asarray(f_ag), f_ref),
              grads=(global_grads(g_sc), global_grads(g_ag),
                     fold_grads(summ, start, None if initial is None else np.asarray(initial),
                                ct_in, ct_fin)))


def check_case(res, what):
  """scan == allgather == the numpy fold (values), == the float64 fold's autodiff (gradients)."""
  (s_sc, s_ag, s_ref), (f_sc, f_ag, f_ref) = res["s_in"], res["final"]
  assert rel_err(s_sc, s_ref) < TOL, f"{what} s_in vs fold: {rel_err(s_sc, s_ref)}"
  assert rel_err(s_ag, s_ref) < TOL, f"{what} allgather s_in vs fold: {rel_err(s_ag, s_ref)}"
  assert rel_err(f_sc, f_ref) < TOL, f"{what} final vs fold: {rel_err(f_sc, f_ref)}"
  assert rel_err(f_ag, f_ref) < TOL, f"{what} allgather final vs fold: {rel_err(f_ag, f_ref)}"
  g_sc, g_ag, g_ref = res["grads"]
  assert len(g_sc) == len(g_ag) == len(g_ref), what
  for name, a, b, r in zip(("m", "state", "initial"), g_sc, g_ag, g_ref):
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), what
    assert rel_err(a, r) < TOL, f"{what} scan grad {name}: {rel_err(a, r)}"
    assert rel_err(b, r) < TOL, f"{what} allgather grad {name}: {rel_err(b, r)}"


# --- exactness ----------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [3, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_scan_matches_allgather_and_fold_packed_with_initial(kind, layout, w):
  """Document starts at device edges, between a device's own two segments (zigzag) and inside
  segments, with an initial state."""
  check_case(run_case(kind, layout, w, packed=True, with_initial=True), f"{kind} {layout} W={w}")


@pytest.mark.parametrize("kind,packed,with_initial", [
    ("delta", False, False), ("diag_channel", True, False), ("diag_scalar", False, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_matches_allgather_and_fold_variants(layout, kind, packed, with_initial):
  """Without documents and/or without the initial state, W = 8."""
  check_case(run_case(kind, layout, 8, packed, with_initial),
             f"{kind} {layout} packed={packed} initial={with_initial}")


def test_scan_on_an_auto_mesh_and_one_device():
  """A ``jax.sharding.Mesh`` (Auto axes) of 3 devices, and W = 1 (no collective at all)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:3]), ("sp",))
  check_case(run_case("diag_scalar", "zigzag", 3, True, True, mesh=mesh), "auto mesh")
  for layout in LAYOUTS:
    check_case(run_case("delta", layout, 1, False, True), f"W=1 {layout}")


def test_nan_later_does_not_reach_earlier_segments():
  """A NaN in the last global segment's summary stays out of every incoming state."""
  w, layout = 8, "zigzag"
  summ, _, _ = global_summaries("diag_channel", 2 * w, False)
  state = np.asarray(summ.state).copy()
  state[-1] = np.nan
  summ = exchange.DiagonalSummary(summ.gamma, jnp.asarray(state))
  mesh = mesh_of(w)
  local = jax.tree.map(lambda x: device_local(to_local(np.asarray(x), layout, w), mesh), summ)
  with jax.set_mesh(mesh):
    s_in, _ = jax.jit(exchange_fn("scan", layout, w, False, False, mesh))(local, None, None)
  assert np.all(np.isfinite(to_global(np.asarray(s_in), layout, w)))


# --- the dispatcher and the cost model -----------------------------------------------------------

def test_prefix_dispatches_and_names_a_bad_strategy():
  w, layout = 3, "contiguous"
  summ, _, _ = global_summaries("delta", w, False)
  mesh = mesh_of(w)
  local = jax.tree.map(lambda x: device_local(to_local(np.asarray(x), layout, w), mesh), summ)
  outs = {}
  for strategy in ("allgather", "scan", "auto"):
    f = jax.shard_map(lambda x, s=strategy: exchange.prefix(
        jax.tree.map(lambda a: a[0], x), strategy=s, axis_name="sp", layout=layout)[0][None],
        mesh=mesh, in_specs=P("sp"), out_specs=P("sp"))
    with jax.set_mesh(mesh):
      outs[strategy] = np.asarray(jax.jit(f)(local))
  assert rel_err(outs["scan"], outs["allgather"]) < TOL
  assert rel_err(outs["auto"], outs["allgather"]) < TOL
  with pytest.raises(ValueError, match=r"strategy must be one of .*'ring'"):
    exchange.prefix(summ, strategy="ring", axis_name="sp", layout=layout)


def test_choose_exchange_cost_model():
  """Small W * summary: the all-gather's one step wins; large: the scan's log2 W messages on a
  switched network, and memory past the budget anywhere; on a ring only memory picks the scan."""
  mib = 2 ** 20
  assert exchange.choose_exchange(1, mib) == "allgather"
  assert exchange.choose_exchange(4, 4096, hardware="nvlink") == "allgather"
  assert exchange.choose_exchange(8, 4096, hardware="infiniband") == "allgather"
  assert exchange.choose_exchange(64, mib, hardware="infiniband") == "scan"
  assert exchange.choose_exchange(8, 16 * mib, hardware="nvlink") == "scan"
  assert exchange.choose_exchange(16, mib, hardware="tpu_ici") == "allgather"
  assert exchange.choose_exchange(256, mib, hardware="tpu_ici", segments=2) == "scan"  # memory
  assert exchange.choose_exchange(16, mib, hardware="tpu_ici", memory_budget_bytes=1) == "scan"
  # Monotone in the summary size at fixed W: once the scan wins, it keeps winning.
  picks = [exchange.choose_exchange(32, 2 ** k, hardware="infiniband") for k in range(8, 26)]
  assert picks == sorted(picks), picks
  sc = exchange.exchange_cost("scan", 16, mib, segments=2, hardware="nvlink")
  assert sc["steps"] == 5 and sc["received_bytes"] == 9 * mib
  ag = exchange.exchange_cost("allgather", 16, mib, segments=2, hardware="nvlink")
  assert ag["steps"] == 1 and ag["received_bytes"] == 30 * mib


# --- HLO: collectives and memory ----------------------------------------------------------------

def abstract_args(kind, layout, w, mesh, *, packed, h=H, dk=DK, dv=DV):
  nseg = layout_lib.segments_per_shard(layout)
  sh = NamedSharding(mesh, P("sp"))
  def sds(*s, dt=jnp.float32):
    return jax.ShapeDtypeStruct((w, nseg, B, *s), dt, sharding=sh)
  if kind == "delta":
    local = exchange.DeltaSummary(sds(h, dk, dk), sds(h, dk, dv))
  else:
    local = exchange.DiagonalSummary(sds(h, 1 if kind == "diag_scalar" else dk), sds(h, dk, dv))
  ids = (sds(dt=jnp.int32), sds(dt=jnp.int32)) if packed else None
  return local, ids


def exchange_program(strategy, kind, layout, w, mesh, *, packed, passes, final=True, **dims):
  """The exchange alone, compiled: fwd, or fwd+bwd (the gradient of ``|s_in|^2 [+ |final|^2]``:
  the backward needs the forward's outputs, as in training; ``grad`` without the loss value, so
  no reduction's all-reduce joins the count)."""
  local, ids = abstract_args(kind, layout, w, mesh, packed=packed, **dims)
  f = exchange_fn(strategy, layout, w, packed, False, mesh)

  def fwd(local, ids):
    s_in, fin = f(local, ids, None)
    return (s_in, fin) if final else s_in

  def loss(local, ids):
    s_in, fin = f(local, ids, None)
    return jnp.sum(jnp.square(s_in)) + (jnp.sum(jnp.square(fin)) if final else 0.0)

  with jax.set_mesh(mesh):
    return jax.jit(fwd if passes == "fwd" else jax.grad(loss)).lower(local, ids).compile()


def state_bytes(w_unused=None, h=H, dk=DK, dv=DV):
  return B * h * dk * dv * 4


def expected_permute_bytes(kind, layout, w, packed, h=H, dk=DK, dv=DV):
  """Forward collective-permute bytes per device from ``scan_counts`` and the message sizes."""
  c = exchange.scan_counts(layout, w)
  m = h * (dk * dk if kind == "delta" else 1 if kind == "diag_scalar" else dk)
  full = B * (m + h * dk * dv + (2 if packed else 0)) * 4
  last = B * (h * dk * dv + (1 if packed else 0)) * 4
  return c["full_messages"] * full + c["state_messages"] * last


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_hlo_log_depth_no_all_gather(layout):
  """Forward: exactly ``scan_counts`` collective-permutes (contiguous ceil(log2 W); zigzag
  2 ceil(log2 W) + 1) of the documented bytes, one all-reduce (the final state) and no all-gather;
  fwd+bwd: twice the permutes (the backward's reverse scan), still log-depth."""
  w = 8
  mesh = mesh_of(w)
  for kind, packed in (("diag_channel", False), ("delta", True)):
    fwd = comm.summarize(comm.parse_collectives(exchange_program(
        "scan", kind, layout, w, mesh, packed=packed, passes="fwd").as_text()))
    want = exchange.scan_counts(layout, w)["permutes"]
    assert set(fwd) == {"collective-permute", "all-reduce"}, fwd
    assert fwd["collective-permute"] == {
        "count": want, "bytes": expected_permute_bytes(kind, layout, w, packed)}, (kind, fwd)
    assert fwd["all-reduce"] == {"count": 1, "bytes": state_bytes()}, fwd
    both = comm.summarize(comm.parse_collectives(exchange_program(
        "scan", kind, layout, w, mesh, packed=packed, passes="fwd+bwd").as_text()))
    assert "all-gather" not in both and "reduce-scatter" not in both, both
    # The backward's messages are the forward's without the id words (its resets are known).
    assert both["collective-permute"] == {"count": 2 * want, "bytes": expected_permute_bytes(
        kind, layout, w, packed) + expected_permute_bytes(kind, layout, w, False)}, (kind, both)
    assert both["all-reduce"]["count"] == 1, both   # the final state's; its transpose is free
  # Without the final state, its all-reduce is gone (dead code).
  fwd = comm.summarize(comm.parse_collectives(exchange_program(
      "scan", "diag_scalar", layout, w, mesh, packed=False, passes="fwd", final=False).as_text()))
  assert set(fwd) == {"collective-permute"}, fwd


MEM_DIMS = dict(h=4, dk=32, dv=32)       # summaries of 33-66 KiB: temporaries dominated by them


def summary_bytes(kind, h=MEM_DIMS["h"], dk=MEM_DIMS["dk"], dv=MEM_DIMS["dv"]):
  m = dk * dk if kind == "delta" else 1 if kind == "diag_scalar" else dk
  return B * h * (m + dk * dv) * 4


def temp_bytes(strategy, layout, w, kind="diag_channel"):
  """Per-device temporaries of the exchange's fwd+bwd (with documents), from XLA's buffer
  assignment."""
  mesh = mesh_of(w)
  return exchange_program(strategy, kind, layout, w, mesh, packed=True, passes="fwd+bwd",
                          **MEM_DIMS).memory_analysis().temp_size_in_bytes


def test_temporaries_at_w8():
  """At W = 8 the scan's fwd+bwd temporaries are below the all-gather's (W = 4, 16 and 32, both
  layouts, in the subprocess test)."""
  assert temp_bytes("scan", "contiguous", 8, "delta") < temp_bytes("allgather", "contiguous", 8,
                                                                  "delta")


# --- W = 12 and 16 in a subprocess (32 simulated devices) ----------------------------------------

_SCRIPT = r"""
import json, sys
import jax
sys.path.insert(0, {root!r})
from tests.sequence_parallel import test_exchange as T
from lasp_jax import comm
out = {{"devices": jax.device_count(), "counts": {{}}, "temp": {{}}}}
for w in (12, 16):
  for layout in T.LAYOUTS:
    T.check_case(T.run_case("delta", layout, w, True, True), f"delta {{layout}} W={{w}}")
    T.check_case(T.run_case("diag_channel", layout, w, True, False), f"diag {{layout}} W={{w}}")
    mesh = T.mesh_of(w)
    for passes in ("fwd", "fwd+bwd"):
      s = comm.summarize(comm.parse_collectives(T.exchange_program(
          "scan", "delta", layout, w, mesh, packed=True, passes=passes).as_text()))
      out["counts"][f"{{w}} {{layout}} {{passes}}"] = s
for kind in ("diag_channel", "delta"):
  for layout in T.LAYOUTS:
    for w in (4, 16, 32):
      for strategy in ("scan", "allgather"):
        if strategy == "allgather" and w == 32:
          continue
        key = f"{{strategy}} {{kind}} {{layout}} {{w}}"
        out["temp"][key] = T.temp_bytes(strategy, layout, w, kind)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_w12_w16_and_memory_in_a_subprocess():
  """32 simulated devices: scan == allgather == fold at W = 12 and 16 (both layouts, delta with
  documents and an initial state, channel decay with documents); HLO permute counts at both;
  fwd+bwd temporaries: the all-gather's grow by >= 12 S summaries from W = 4 to 16; the scan's by
  at most one summary (W = 4 has a single full-message round, so one transition buffer fewer
  is ever live; from W = 8 on the live set is the same) and not from 16 to 32 (<= 4 KiB)."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="32", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=32")
  t0 = time.perf_counter()
  p = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=ROOT)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
  line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
  out = json.loads(line[len("RESULT "):])
  print(f"subprocess {time.perf_counter() - t0:.1f} s:", json.dumps(out, indent=1))
  assert out["devices"] == 32
  for w in (12, 16):
    for layout in LAYOUTS:
      want = exchange.scan_counts(layout, w)["permutes"]
      fwd = out["counts"][f"{w} {layout} fwd"]
      assert set(fwd) == {"collective-permute", "all-reduce"}, fwd
      assert fwd["collective-permute"] == {
          "count": want, "bytes": expected_permute_bytes("delta", layout, w, True)}, fwd
      both = out["counts"][f"{w} {layout} fwd+bwd"]
      assert set(both) == {"collective-permute", "all-reduce"}, both
      assert both["collective-permute"]["count"] == 2 * want, both
  for kind in ("diag_channel", "delta"):
    size = summary_bytes(kind)
    for layout in LAYOUTS:
      nseg = layout_lib.segments_per_shard(layout)
      t = lambda s, w: out["temp"][f"{s} {kind} {layout} {w}"]  # noqa: E731
      assert t("allgather", 16) - t("allgather", 4) >= 12 * nseg * size, (kind, layout, out["temp"])
      assert t("scan", 16) <= t("scan", 4) + size + 4096, (kind, layout, out["temp"])
      assert t("scan", 32) <= t("scan", 16) + 4096, (kind, layout, out["temp"])
