"""Packed documents, initial and final states under LASP-2 (design §10, 13) against the float64
recurrence with resets: every decay form, both layouts, 8 devices, gradients; no new collective."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax import comm
from tests.references import f64, linear_recurrence, rel_err
from tests.sequence_parallel.test_lasp2 import DECAYS, TOL, make_inputs, sp_mesh

W, B, N, H, DK, DV, CHUNK = 8, 2, 128, 2, 8, 16, 8
# Natural-order document starts. Device edges: every 16 tokens (contiguous), every 8 (zigzag).
# Row 0: at a device edge (16, 64), one token before and after one (31, 33), documents of 1, 2
# and 3 tokens (40, 41, 43, 46), a start at a segment's last token (79), one late (100).
# Row 1: one document over all devices, so the initial state reaches its last token.
STARTS = ((16, 31, 33, 40, 41, 43, 46, 64, 79, 100), ())


def _segment_ids():
  starts = np.zeros((B, N), np.int32)
  for b, row in enumerate(STARTS):
    starts[b, list(row)] = 1
  return jnp.asarray(np.cumsum(starts, axis=1) % 3)  # ids reused: a start is a change of id


def _inputs(decay):
  q, k, v, g, ct = make_inputs(decay, b=B, n=N, h=H, dk=DK, dv=DV, seed=3)
  s0 = jax.random.normal(jax.random.PRNGKey(5), (B, H, DK, DV))
  ct_s = jax.random.normal(jax.random.PRNGKey(6), (B, H, DK, DV))
  return q, k, v, g, s0, ct, ct_s


def _loss(fn, ct, ct_s):
  def loss(q, k, v, g, s0):
    o, s = fn(q, k, v, g, s0)
    return jnp.sum(o * ct) + jnp.sum(s * ct_s)
  return loss


def _argnums(g):
  return (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)


@functools.lru_cache(maxsize=None)
def _reference(decay):
  q, k, v, g, s0, ct, ct_s = _inputs(decay)
  ids = _segment_ids()
  ref = lambda q, k, v, g, s0: linear_recurrence(  # noqa: E731
      q, k, v, g, initial_state=s0, segment_ids=ids)
  return f64(lambda *a: (ref(*a), jax.grad(_loss(ref, ct, ct_s), argnums=_argnums(g))(*a)),
             q, k, v, g, s0)


def _check(got, want, what):
  ((o, s), grads), ((o_r, s_r), grads_r) = got, want
  names = ["o", "final_state"] + ["d" + n for n in "qkvgs"]
  for name, a, r in zip(names[:2], (o, s), (o_r, s_r)):
    assert rel_err(a, r) < TOL, f"{what} {name}: {rel_err(a, r)}"
  for a, r, i in zip(grads, grads_r, range(len(grads))):
    assert np.all(np.isfinite(np.asarray(a))), f"{what} grad {i}"
    assert rel_err(a, r) < TOL, f"{what} grad {i}: {rel_err(a, r)}"


@pytest.mark.parametrize("decay", DECAYS)
def test_one_device_packed_with_initial_and_final_state(decay):
  q, k, v, g, s0, ct, ct_s = _inputs(decay)
  ids = _segment_ids()
  fn = lambda q, k, v, g, s0: lasp_jax.linear_attention(  # noqa: E731
      q, k, v, g, segment_ids=ids, initial_state=s0, return_final_state=True, chunk_size=CHUNK)
  got = jax.jit(lambda *a: (fn(*a), jax.grad(_loss(fn, ct, ct_s), argnums=_argnums(g))(*a)))(
      q, k, v, g, s0)
  _check(got, _reference(decay), f"one device {decay}")


_PACKED_DEFAULT = {("none", "contiguous"), ("token", "zigzag"), ("channel", "contiguous")}


@pytest.mark.parametrize("decay, layout, exchange", [
    *((d, l, "allgather") if (d, l) in _PACKED_DEFAULT
      else pytest.param(d, l, "allgather", marks=pytest.mark.slow)
      for d in DECAYS for l in ("contiguous", "zigzag")),
    ("token", "zigzag", "scan"),
    *(pytest.param(d, "zigzag", "scan", marks=pytest.mark.slow) for d in ("none", "head", "channel"))])
def test_lasp2_packed_with_initial_and_final_state(decay, layout, exchange):
  q, k, v, g, s0, ct, ct_s = _inputs(decay)
  ids = _segment_ids()
  mesh = sp_mesh(W)
  zz = (lambda x: None if x is None or x.ndim == 1 else lasp_jax.zigzag(x, W)) if (
      layout == "zigzag") else (lambda x: x)
  fn = lambda q, k, v, g, s0: lasp_jax.lasp2_attention(  # noqa: E731
      q, k, v, g, mesh=mesh, segment_ids=zz(ids), initial_state=s0, return_final_state=True,
      chunk_size=CHUNK, layout=layout, exchange=exchange)
  ct_l = zz(ct)
  (o, s), grads = jax.jit(lambda *a: (fn(*a), jax.grad(
      _loss(fn, ct_l, ct_s), argnums=_argnums(g))(*a)))(zz(q), zz(k), zz(v), g if g is None or (
          g.ndim == 1) else zz(g), s0)
  if layout == "zigzag":
    un = lambda x: lasp_jax.unzigzag(np.asarray(x), W)  # noqa: E731
    o = un(o)
    grads = [un(a) if a.ndim >= 3 and a.shape[1] == N else a for a in grads]
  _check(((o, s), grads), _reference(decay), f"W={W} {layout} {decay} {exchange}")


def test_lasp2_scan_contiguous_packed_with_initial_and_final_state():
  """The scan exchange in the contiguous layout (zigzag: above), the per-channel decay."""
  test_lasp2_packed_with_initial_and_final_state("channel", "contiguous", "scan")


def test_packed_per_shard_op_and_batch_axis():
  """The per-shard ``lasp2`` inside a user's shard_map on a data x sp mesh, with documents."""
  q, k, v, g, s0, _, _ = _inputs("token")
  ids = _segment_ids()
  mesh = jax.make_mesh((2, 4), ("data", "sp"))
  x = P("data", "sp")
  fn = jax.shard_map(
      lambda q, k, v, g, ids, s0: lasp_jax.lasp2(
          q, k, v, g, axis_name="sp", segment_ids=ids, initial_state=s0, return_final_state=True,
          chunk_size=CHUNK),
      mesh=mesh, in_specs=(x, x, x, x, x, P("data")), out_specs=(x, P("data")))
  with jax.set_mesh(mesh):
    args = [jax.reshard(a, NamedSharding(mesh, s)) for a, s in
            ((q, x), (k, x), (v, x), (g, x), (ids, x), (s0, P("data")))]
    o, s = jax.jit(fn)(*args)
  (o_r, s_r), _ = _reference("token")
  assert rel_err(o, o_r) < TOL and rel_err(s, s_r) < TOL


def test_segment_ids_add_no_collective():
  """fwd+bwd with documents: still one all-gather and one reduce-scatter, 2 ints more per
  segment than without, and nothing that grows with N."""
  mesh = sp_mesh(W)
  stats = {}
  for n in (1024, 4096):
    for packed in (False, True):
      xs = NamedSharding(mesh, P(None, "sp"))
      q = jax.ShapeDtypeStruct((B, n, H, DK), jnp.float32, sharding=xs)
      v = jax.ShapeDtypeStruct((B, n, H, DV), jnp.float32, sharding=xs)
      g = jax.ShapeDtypeStruct((B, n, H), jnp.float32, sharding=xs)
      ids = jax.ShapeDtypeStruct((B, n), jnp.int32, sharding=xs)
      loss = lambda q, k, v, g, ids: jnp.sum(lasp_jax.lasp2_attention(  # noqa: E731
          q, k, v, g, mesh=mesh, segment_ids=ids if packed else None, chunk_size=64) ** 2)
      stats[n, packed] = comm.summarize(comm.collective_stats(
          jax.grad(loss, argnums=(0, 1, 2, 3)), q, q, v, g, ids, mesh=mesh))
  for packed in (False, True):
    assert stats[1024, packed] == stats[4096, packed]
    assert set(stats[1024, packed]) == {"all-gather", "reduce-scatter"}, stats[1024, packed]
    assert stats[1024, packed]["all-gather"]["count"] == 1
  extra = stats[1024, True]["all-gather"]["bytes"] - stats[1024, False]["all-gather"]["bytes"]
  assert extra == W * B * 2 * 4, extra               # first and last id of each segment


def test_wide_segment_ids_keep_their_width_across_devices():
  """int64 ids (x64) that differ only above 2**32, changing exactly at a device edge: still a
  document start (the ids cross devices bit for bit, not cast to int32)."""
  q, k, v, g, _, _, _ = _inputs("token")
  mesh = sp_mesh(W)
  narrow = jnp.asarray(np.repeat([[0, 1]], B, axis=0).repeat(N // 2, axis=1), jnp.int32)
  want = lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, segment_ids=narrow, chunk_size=CHUNK)
  with jax.enable_x64(True):
    wide = jnp.asarray(np.asarray(narrow, np.int64) << 33)
    got = lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, segment_ids=wide, chunk_size=CHUNK)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_packing_inputs():
  q, k, v, g, s0, _, _ = _inputs("token")
  mesh = sp_mesh(W)
  with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, N\)"):
    lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, segment_ids=jnp.zeros((B, N - 1), jnp.int32),
                             chunk_size=CHUNK)
  with pytest.raises(TypeError, match="segment_ids must be an integer"):
    lasp_jax.linear_attention(q, k, v, g, segment_ids=jnp.zeros((B, N)), chunk_size=CHUNK)
  with pytest.raises(ValueError, match="initial_state must have shape"):
    lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, initial_state=s0[:, :1], chunk_size=CHUNK)
  with pytest.raises(ValueError, match="segment_ids must be None when causal=False"):
    lasp_jax.lasp2_attention(q, k, v, mesh=mesh, causal=False, chunk_size=CHUNK,
                             segment_ids=jnp.zeros((B, N), jnp.int32))
