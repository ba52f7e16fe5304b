"""The delta rule under LASP-2 (design §10-11) against the float64 recurrence: every decay form, both
layouts, W = 1, 2, 3, 4, 8, packed documents cut at device edges, initial and final states, gradients of
q, k, v, beta, g and S_0; the exchange gathers one ``(M, E)`` per segment, independent of N."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax import comm
from tests.kernels.test_delta_rule import (argnums, assert_matches, grads_and_outputs,
                                           make_inputs, segment_ids)
from tests.references import delta_recurrence, f64, linear_recurrence, rel_err
from tests.sequence_parallel.test_lasp2 import sp_mesh

B, N, H, DK, DV, CHUNK = 2, 128, 2, 8, 8, 8
# Device edges every 16 tokens (contiguous, W=8) or 8 (zigzag): starts at (16, 64), one token
# around an edge (31, 33), documents of 1 and 2 tokens (40, 41, 43), at a segment's last token
# (79); row 1 is one document over every device, so the initial state reaches its last token.
STARTS = ((16, 31, 33, 40, 41, 43, 64, 79, 100), ())


@functools.lru_cache(maxsize=None)
def _case(decay):
  q, k, v, beta, g, s0, ct = make_inputs(decay, b=B, n=N, h=H, dk=DK, dv=DV, seed=4)
  ct_s = jax.random.normal(jax.random.PRNGKey(8), s0.shape)
  return q, k, v, beta, g, s0, ct, ct_s


@functools.lru_cache(maxsize=None)
def _reference(decay, packed=True):
  q, k, v, beta, g, s0, ct, ct_s = _case(decay)
  ids = segment_ids(STARTS, N) if packed else None
  ref = lambda q, k, v, b, g, s0: delta_recurrence(  # noqa: E731
      q, k, v, b, g, scale=0.5, initial_state=s0, segment_ids=ids)
  return f64(lambda *a: grads_and_outputs(ref, *a, ct, ct_s), q, k, v, beta, g, s0)


def _sp(w, layout, decay, packed=True, exchange="allgather"):
  """jit(grad) of LASP-2 on global natural-order inputs (zigzagged in and out for zigzag)."""
  mesh = sp_mesh(w)
  ids = segment_ids(STARTS, N) if packed else None
  zz = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.zigzag(x, w))
  unzz = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.unzigzag(x, w))

  def fn(q, k, v, b, g, s0):
    g = g if g is None or g.ndim == 1 else zz(g)
    o, s = lasp_jax.lasp2_attention(
        zz(q), zz(k), zz(v), g, beta=zz(b), mesh=mesh, scale=0.5,
        segment_ids=None if ids is None else zz(ids), initial_state=s0,
        return_final_state=True, chunk_size=CHUNK, layout=layout, exchange=exchange)
    return unzz(o), s

  q, k, v, beta, g, s0, ct, ct_s = _case(decay)
  with jax.set_mesh(mesh):
    return jax.jit(functools.partial(grads_and_outputs, fn))(q, k, v, beta, g, s0, ct, ct_s)


@pytest.mark.parametrize("decay, layout", [
    ("none", "zigzag"), ("token", "zigzag"), ("channel", "contiguous"),
    *(pytest.param(d, l, marks=pytest.mark.slow) for d, l in
      (("none", "contiguous"), ("head", "contiguous"), ("head", "zigzag"),
       ("token", "contiguous"), ("channel", "zigzag")))])
def test_eight_devices_match_recurrence(decay, layout):
  assert_matches(_sp(8, layout, decay), _reference(decay), what=f"{decay} {layout}")


@pytest.mark.parametrize("w, layout", [
    (4, "zigzag"), *(pytest.param(w, "contiguous", marks=pytest.mark.slow) for w in (1, 2))])
def test_fewer_devices_match_recurrence(w, layout):
  assert_matches(_sp(w, layout, "token"), _reference("token"), what=f"W={w} {layout}")


@pytest.mark.parametrize("decay, layout", [
    ("token", "zigzag"), pytest.param("channel", "contiguous", marks=pytest.mark.slow)])
def test_scan_exchange_matches_recurrence(decay, layout):
  assert_matches(_sp(8, layout, decay, exchange="scan"), _reference(decay),
                 what=f"scan {decay} {layout}")


@pytest.mark.parametrize("layout, exchange", [
    ("zigzag", "scan"), pytest.param("contiguous", "allgather", marks=pytest.mark.slow)])
def test_three_devices_both_exchanges(layout, exchange):
  """W = 3, not a power of two (N = 96 = 3 * 2 * 2 chunks of 8)."""
  n, w = 96, 3
  q, k, v, beta, g, s0, ct = make_inputs("token", b=B, n=n, h=H, dk=DK, dv=DV, seed=6)
  ids = segment_ids(((16, 31, 33, 47, 48, 80), (5,)), n)
  zz = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.zigzag(x, w))
  unzz = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.unzigzag(x, w))
  mesh = sp_mesh(w)

  def fn(q, k, v, b, g, s0):
    o, s = lasp_jax.lasp2_attention(
        zz(q), zz(k), zz(v), zz(g), beta=zz(b), mesh=mesh, scale=0.5, segment_ids=zz(ids),
        initial_state=s0, return_final_state=True, chunk_size=CHUNK, layout=layout,
        exchange=exchange)
    return unzz(o), s
  ct_s = jnp.ones_like(s0)
  ref = lambda q, k, v, b, g, s0: delta_recurrence(  # noqa: E731
      q, k, v, b, g, scale=0.5, initial_state=s0, segment_ids=ids)
  want = f64(lambda *a: grads_and_outputs(ref, *a, ct, ct_s), q, k, v, beta, g, s0)
  with jax.set_mesh(mesh):
    got = jax.jit(functools.partial(grads_and_outputs, fn))(q, k, v, beta, g, s0, ct, ct_s)
  assert_matches(got, want, what=f"W=3 {layout} {exchange}")


def test_unpacked_without_initial_state_and_batch_axis():
  q, k, v, beta, g, _, _, _ = _case("token")
  mesh = jax.make_mesh((2, 4), ("data", "sp"))
  with jax.set_mesh(mesh):
    o = lasp_jax.lasp2_attention(q, k, v, g, beta=beta, mesh=mesh, batch_axis="data",
                                 chunk_size=CHUNK)
  want = f64(lambda *a: delta_recurrence(*a)[0], q, k, v, beta, g)
  assert rel_err(o, want) < 2e-4


def test_sixteen_k_tokens_with_strong_gates_are_finite_and_exact():
  n = 16384
  q, k, v, beta, _, _, _ = make_inputs("none", b=1, n=n, h=1, dk=8, dv=8, seed=2)
  g = 4.0 * jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(3), (1, n, 1)))
  g = g.at[:, ::997].set(-jnp.inf).at[:, 500::1500].set(-1e9)
  with jax.set_mesh(sp_mesh(8)):
    o = jax.jit(lambda *a: lasp_jax.lasp2_attention(
        *a[:3], a[4], beta=a[3], mesh=sp_mesh(8), chunk_size=64))(q, k, v, beta, g)
  want = f64(lambda *a: delta_recurrence(*a)[0], q, k, v, beta, jnp.maximum(g, -1e4))
  assert np.all(np.isfinite(np.asarray(o)))
  assert rel_err(o, want) < 2e-4


@pytest.mark.parametrize("packed", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_one_summary_gather_forward_one_reduce_scatter_backward_independent_of_n(packed):
  w, b, h, dk, dv = 8, 2, 4, 16, 32
  mesh = sp_mesh(w)
  stats = []
  for n in (1024, 4096):
    x = jax.ShapeDtypeStruct((b, n, h, dk), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "sp", None, None)))
    vs = jax.ShapeDtypeStruct((b, n, h, dv), jnp.float32, sharding=x.sharding)
    row = jax.ShapeDtypeStruct((b, n, h), jnp.float32,
                               sharding=NamedSharding(mesh, P(None, "sp", None)))
    ids = jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=NamedSharding(mesh, P(None, "sp")))

    def loss(q, k, v, beta, g, ids):
      return jnp.sum(lasp_jax.lasp2_attention(
          q, k, v, g, beta=beta, segment_ids=ids if packed else None, mesh=mesh,
          chunk_size=64) ** 2)
    stats.append(comm.summarize(comm.collective_stats(
        jax.grad(loss, argnums=(0, 1, 2, 3, 4)), x, x, vs, row, row, ids, mesh=mesh)))
  assert stats[0] == stats[1], stats
  assert set(stats[0]) == {"all-gather", "reduce-scatter"}, stats[0]
  fwd, bwd = stats[0]["all-gather"], stats[0]["reduce-scatter"]
  assert fwd["count"] == 1 and bwd["count"] == 1
  summary = b * h * dk * (dk + dv) * 4                  # (M, E) of one segment, float32
  summary += b * h * (dv + 1) * 4                       # its non-finite marks (design §13b)
  ids_bytes = 2 * b * 4 if packed else 0                # first and last ids, one int32 each
  assert fwd["bytes"] == w * (summary + ids_bytes)
  assert bwd["bytes"] == summary + ids_bytes


def test_per_shard_op_in_a_user_shard_map():
  q, k, v, beta, g, _, _, _ = _case("token")
  mesh = sp_mesh(4, explicit=False)
  spec = P(None, "sp")
  fn = jax.shard_map(
      lambda q, k, v, b, g: lasp_jax.lasp2(q, k, v, g, beta=b, axis_name="sp", chunk_size=CHUNK),
      mesh=mesh, in_specs=(spec, spec, spec, spec, spec), out_specs=spec)
  want = f64(lambda *a: delta_recurrence(*a)[0], q, k, v, beta, g)
  assert rel_err(jax.jit(fn)(q, k, v, beta, g), want) < 2e-4


def test_bad_beta_under_lasp2_is_named():
  q, k, v, beta, g, _, _, _ = _case("token")
  with pytest.raises(ValueError, match=r"beta must have shape \(B, N, H\)"):
    lasp_jax.lasp2_attention(q, k, v, g, beta=beta[:, :, :1], mesh=sp_mesh(8), chunk_size=CHUNK)
  with pytest.raises(ValueError, match="beta must be None when causal=False"):
    lasp_jax.lasp2_attention(q, k, v, beta=beta, causal=False, mesh=sp_mesh(8), chunk_size=CHUNK)


# --- non-finite inputs across devices (issue 23, item 7) ------------------------------------------

NAN_DOC = (20, 44)   # W = 4: device edges at 32 (contiguous) or 16, 32 (zigzag): the document spans one


@functools.lru_cache(maxsize=None)
def _nan_case(family, layout, exchange):
  """The jitted vjp of LASP-2 on W = 4 over natural-order inputs (zigzagged inside for zigzag),
  and the float64 recurrence's, with documents starting at ``NAN_DOC``."""
  w = 4
  mesh = sp_mesh(w)
  ids = jnp.asarray(np.searchsorted(NAN_DOC, np.arange(N), side="right")[None])
  zz = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.zigzag(x, w))
  unzz = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.unzigzag(x, w))
  delta = family == "delta"

  def op(q, k, v, b, g, s0):
    o, s = lasp_jax.lasp2_attention(
        zz(q), zz(k), zz(v), zz(g), beta=zz(b) if delta else None, mesh=mesh, scale=0.5,
        segment_ids=zz(ids), initial_state=s0, return_final_state=True, chunk_size=CHUNK,
        layout=layout, exchange=exchange)
    return unzz(o), s

  def ref(q, k, v, b, g, s0):
    if delta:
      return delta_recurrence(q, k, v, b, g, scale=0.5, initial_state=s0, segment_ids=ids)
    return linear_recurrence(q, k, v, g, scale=0.5, initial_state=s0, segment_ids=ids)

  def vjp(fn, *a):
    out, pullback = jax.vjp(fn, *a[:6])
    return out, pullback(tuple(a[6:]))
  with jax.set_mesh(mesh):
    sp = jax.jit(functools.partial(vjp, op))
  return (lambda *a: sp(*a)), (lambda *a: f64(functools.partial(vjp, ref), *a)), mesh


@pytest.mark.parametrize("family, layout, exchange", [
    ("delta", "contiguous", "allgather"), ("diagonal", "zigzag", "scan"),
    pytest.param("delta", "zigzag", "scan", marks=pytest.mark.slow),
    pytest.param("diagonal", "contiguous", "allgather", marks=pytest.mark.slow)])
def test_nan_in_a_document_stays_in_it_across_devices(family, layout, exchange):
  """A NaN on both sides of a device edge inside the document [20, 44) (q at 24, k at 28, v at 33,
  beta at 36, the gate at 38) and NaN cotangents on its outputs: every other document's outputs
  and gradients, the final state and d initial_state equal the float64 recurrence's without the
  NaN, through the local passes, the exchange's summaries and its backward (a reset is an exact
  zero across devices too)."""
  q, k, v, beta, g, s0, ct = make_inputs("token", b=1, n=N, h=H, dk=DK, dv=DV, seed=9)
  args = [q, k, v, beta, g, s0]
  for i, t in enumerate((24, 28, 33, 36, 38)):
    if family == "delta" or i != 3:
      args[i] = args[i].at[:, t].set(jnp.nan)
  ct = ct.at[:, NAN_DOC[0]:NAN_DOC[1]].set(jnp.nan)
  ct_s = jax.random.normal(jax.random.PRNGKey(10), s0.shape)
  sp, ref, mesh = _nan_case(family, layout, exchange)
  (o, s), grads = sp(*args, ct, ct_s)
  clean = [jnp.where(jnp.isnan(x), 0.0, x) for x in (*args, ct, ct_s)]
  (o_ref, s_ref), grads_ref = ref(*clean)

  def exact(name, got, want, rows=slice(None)):
    got, want = np.asarray(got, np.float64)[:, rows], np.asarray(want)[:, rows]
    assert np.all(np.isfinite(got)), f"{name}: a NaN reached it"
    assert rel_err(got, want) < 2e-4, (name, rel_err(got, want))

  names = ("dq", "dk", "dv", "dbeta", "dg")
  for rows in (slice(0, NAN_DOC[0]), slice(NAN_DOC[1], None)):
    for i, name in enumerate(("o",) + names):
      if name == "dbeta" and family != "delta":
        continue
      got, want = (o, o_ref) if i == 0 else (grads[i - 1], grads_ref[i - 1])
      exact(f"{name} rows {rows}", got, want, rows)
  exact("final state", s, s_ref)
  exact("d initial_state", grads[5], grads_ref[5])
  exact("o (NaN document, before the NaN)", o, o_ref, slice(NAN_DOC[0], 24))
  assert not np.any(np.isfinite(np.asarray(o)[:, 28:NAN_DOC[1]]))
  # A NaN in the initial state reaches the first document's outputs in its column only, and one
  # in the last document's v at token 100 that document's outputs and the final state, in its
  # column (the same compiled program, other data).
  (o, s), _ = sp(q, k, v.at[0, 100, 0, 3].set(jnp.nan), beta, g, s0.at[0, 0, 1, 2].set(jnp.nan),
                 jnp.zeros_like(ct), ct_s)
  o, s = np.asarray(o), np.asarray(s)
  want_o = np.zeros(o.shape, bool)
  want_o[0, :NAN_DOC[0], 0, 2] = want_o[0, 100:, 0, 3] = True
  want_s = np.zeros(s.shape, bool)
  want_s[0, 0, :, 3] = True
  np.testing.assert_array_equal(~np.isfinite(o), want_o)
  np.testing.assert_array_equal(~np.isfinite(s), want_s)
