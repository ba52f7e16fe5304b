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
from tests.references import delta_recurrence, f64, rel_err
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
