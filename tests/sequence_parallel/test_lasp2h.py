"""LASP-2H on 8 simulated devices against the float64 dense softmax reference, fwd and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax import comm
from lasp_jax.sequence_parallel.lasp2h import computed_blocks_per_device
from tests.references import f64, rel_err, softmax_attention

B, N, H, HKV, D = 2, 128, 4, 2, 8  # 16 tokens per device: 2 query tiles, 16 key tiles each
W = 8
TOL = 2e-4


def make_inputs(*, b=B, n=N, h=H, hkv=HKV, d=D, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (b, n, h, d), dtype)
  k = jax.random.normal(ks[1], (b, n, hkv, d), dtype)
  v = jax.random.normal(ks[2], (b, n, hkv, d), dtype)
  do = jax.random.normal(ks[3], (b, n, h, d), jnp.float32)
  # Packed documents of random lengths, some shorter than a tile, some spanning devices.
  seg = jnp.cumsum(jax.random.bernoulli(ks[4], 0.06, (b, n)), axis=1).astype(jnp.int32)
  return q, k, v, do, seg


def explicit_mesh(shape=(W,), names=("sp",)):
  return jax.make_mesh(shape, names)


def auto_mesh(shape=(W,), names=("sp",)):
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)


def reference(q, k, v, do, seg, causal):
  def run(q, k, v, do, seg):
    def loss(q, k, v):
      o = softmax_attention(q, k, v, causal=causal, segment_ids=seg)
      return jnp.sum(o * do), o
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1]
  seg = None if seg is None else np.asarray(seg)
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, do)]
    out = jax.jit(run)(*args, None if seg is None else jnp.asarray(seg))
    return jax.tree.map(np.asarray, out)


def run_lasp2h(q, k, v, do, seg, *, mesh, layout, causal, batch_axis=None):
  """Output and (dq, dk, dv) of sum(o * do), in natural order whatever the layout."""
  if layout == "zigzag":
    to, back = functools.partial(lasp_jax.zigzag, num_shards=W), functools.partial(
        lasp_jax.unzigzag, num_shards=W)
  else:
    to = back = lambda x: x
  args = [to(x) for x in (q, k, v, do)]
  seg = None if seg is None else to(seg)

  @jax.jit
  def run(q, k, v, do, seg):
    def loss(q, k, v):
      o = lasp_jax.lasp2h_attention(q, k, v, mesh=mesh, batch_axis=batch_axis, causal=causal,
                                    segment_ids=seg, layout=layout)
      return jnp.sum(o.astype(jnp.float32) * do), o
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1]

  with jax.set_mesh(mesh):
    o, grads = run(*args, seg)
  return back(o), tuple(back(g) for g in grads)


def check(got, want, tol):
  (o, grads), (o_ref, grads_ref) = got, want
  assert rel_err(o, o_ref) < tol, ("o", rel_err(o, o_ref))
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert rel_err(g, g_ref) < tol, (f"d{name}", rel_err(g, g_ref))


@pytest.mark.parametrize("layout, causal, segments, mesh_kind", [
    ("contiguous", True, False, "explicit"),
    ("zigzag", True, True, "explicit"),
    ("contiguous", False, True, "auto"),
    ("zigzag", False, False, "auto"),
])
def test_matches_reference(layout, causal, segments, mesh_kind):
  q, k, v, do, seg = make_inputs()
  seg = seg if segments else None
  mesh = explicit_mesh() if mesh_kind == "explicit" else auto_mesh()
  got = run_lasp2h(q, k, v, do, seg, mesh=mesh, layout=layout, causal=causal)
  check(got, reference(q, k, v, do, seg, causal), TOL)


def test_data_by_sequence_mesh_with_batch_axis():
  q, k, v, do, seg = make_inputs()
  mesh = explicit_mesh((2, 4), ("data", "sp"))
  # W = 4 on this mesh: zigzag over 4 devices.
  z = functools.partial(lasp_jax.zigzag, num_shards=4)
  uz = functools.partial(lasp_jax.unzigzag, num_shards=4)

  @jax.jit
  def run(q, k, v, seg):
    def loss(q, k, v):
      o = lasp_jax.lasp2h_attention(q, k, v, mesh=mesh, batch_axis="data", segment_ids=seg,
                                    layout="zigzag")
      return jnp.sum(o * z(do)), o
    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)[::-1]

  with jax.set_mesh(mesh):
    o, grads = run(z(q), z(k), z(v), z(seg))
  assert o.sharding.spec[:2] == ("data", "sp")
  check((uz(o), tuple(uz(g) for g in grads)), reference(q, k, v, do, seg, True), TOL)


def test_zigzag_is_the_contiguous_result_permuted():
  q, k, v, _, seg = make_inputs(seed=1)
  mesh = explicit_mesh()
  z = functools.partial(lasp_jax.zigzag, num_shards=W)
  with jax.set_mesh(mesh):
    o_nat = lasp_jax.lasp2h_attention(q, k, v, mesh=mesh, segment_ids=seg)
    o_zig = lasp_jax.lasp2h_attention(z(q), z(k), z(v), mesh=mesh, segment_ids=z(seg),
                                      layout="zigzag")
  np.testing.assert_allclose(np.asarray(o_zig), np.asarray(z(o_nat)), atol=1e-6, rtol=1e-5)


def test_bfloat16():
  q, k, v, do, _ = make_inputs(dtype=jnp.bfloat16)
  o, grads = run_lasp2h(q, k, v, do, None, mesh=explicit_mesh(), layout="zigzag", causal=True)
  assert o.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  check((o, grads), reference(q, k, v, do, None, True), 3e-2)


def test_per_shard_op_in_users_shard_map():
  # lasp2h inside the caller's own shard_map with the default check_vma=True.
  q, k, v, do, seg = make_inputs(seed=2)
  mesh = auto_mesh()
  spec = P(None, "sp", None, None)
  fn = jax.shard_map(
      lambda q, k, v, s: lasp_jax.lasp2h(q, k, v, axis_name="sp", segment_ids=s, scale=0.5),
      mesh=mesh, in_specs=(spec, spec, spec, P(None, "sp")), out_specs=spec)
  o = jax.jit(fn)(q, k, v, seg)
  want = f64(lambda q, k, v: softmax_attention(q, k, v, scale=0.5, segment_ids=np.asarray(seg)),
             q, k, v)
  assert rel_err(o, want) < TOL


def test_one_gather_forward_one_reduce_scatter_backward():
  mesh = explicit_mesh()
  c = N // W
  x = lambda h: jax.ShapeDtypeStruct((B, N, h, D), jnp.float32,
                                     sharding=NamedSharding(mesh, P(None, "sp", None, None)))

  def fwd_bwd(q, k, v, do):
    o, vjp = jax.vjp(lambda q, k, v: lasp_jax.lasp2h_attention(q, k, v, mesh=mesh,
                                                               layout="zigzag"), q, k, v)
    return o, vjp(do)

  stats = comm.summarize(comm.collective_stats(fwd_bwd, x(H), x(HKV), x(HKV), x(H), mesh=mesh))
  assert set(stats) == {"all-gather", "reduce-scatter"}, stats
  # Only the Hkv heads travel: K and V stacked, gathered once; their gradients scattered once.
  assert stats["all-gather"] == {"count": 1, "bytes": 2 * B * N * HKV * D * 4}
  assert stats["reduce-scatter"] == {"count": 1, "bytes": 2 * B * c * HKV * D * 4}


def test_zigzag_balances_causal_work():
  for n in (N, 16384):
    zig = computed_blocks_per_device(n, W, layout="zigzag")
    con = computed_blocks_per_device(n, W, layout="contiguous")
    assert np.all(zig == zig[0]), zig
    assert np.all(np.diff(con) > 0), con  # contiguous: each device more than the one before
  # At 16384 both layouts use 512-token tiles: the same total work, only distributed differently.
  assert zig.sum() == con.sum()
  assert con.max() > 1.8 * zig.max()
  full = computed_blocks_per_device(N, W, layout="contiguous", causal=False)
  assert np.all(full == full[0])


@pytest.mark.parametrize("change, match", [
    (dict(k=(B, N, 3, D), v=(B, N, 3, D)), "H=4 must be a multiple of key/value heads Hkv=3"),
    (dict(n=100), r"N=100 is not divisible by the axis size 8"),
    (dict(n=120, layout="zigzag"), r"N=120 is not divisible by 2 \* axis size = 16"),
    (dict(seg=((B, N - 1), jnp.int32)), r"segment_ids must have shape \(B, N\)=\(2, 128\)"),
    (dict(seg=((B, N), jnp.float32)), "segment_ids must be an integer array, got dtype float32"),
    (dict(layout="ring"), "layout must be one of .* got 'ring'"),
    (dict(seq_axis="seq"), "seq_axis 'seq' is not an axis of the mesh"),
    # Empty sequences or heads used to raise ZeroDivisionError.
    (dict(n=0), r"q must have N, H, D > 0, got shape \(2, 0, 4, 8\)"),
    (dict(q=(B, N, 0, D), k=(B, N, 0, D), v=(B, N, 0, D)),
     r"q must have N, H, D > 0, got shape \(2, 128, 0, 8\)"),
    # int64 ids cannot be held with x64 off: 2**32 would become 0, merging two documents.
    (dict(seg=np.full((B, N), 2 ** 32, np.int64)),
     "segment_ids .* int32 range .* got max 4294967296"),
])
def test_bad_input(change, match):
  n = change.get("n", N)
  q = jnp.zeros(change.get("q", (B, n, H, D)))
  k = jnp.zeros(change.get("k", (B, n, HKV, D)))
  v = jnp.zeros(change.get("v", (B, n, HKV, D)))
  seg = change.get("seg")
  seg = jnp.zeros(*seg) if isinstance(seg, tuple) else seg
  with pytest.raises(ValueError, match=match):
    lasp_jax.lasp2h_attention(q, k, v, mesh=explicit_mesh(), segment_ids=seg,
                              layout=change.get("layout", "contiguous"),
                              seq_axis=change.get("seq_axis", "sp"))


def test_segment_ids_wider_than_int32_keep_their_width():
  # With x64 on, int64 ids 0, 2**32, 2*2**32 are three documents (a cast to int32 merged them).
  q, k, v, _, _ = make_inputs(n=64)
  labels = np.repeat(np.arange(3), [20, 20, 24])[None].repeat(B, axis=0)
  mesh = explicit_mesh()
  want = lasp_jax.lasp2h_attention(q, k, v, mesh=mesh, segment_ids=jnp.asarray(labels, jnp.int32))
  with jax.enable_x64(True):
    got = lasp_jax.lasp2h_attention(q, k, v, mesh=mesh,
                                    segment_ids=jnp.asarray(labels * 2 ** 32, jnp.int64))
  # x64 mode may change float rounding a little, never a document's mask.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, match", [
    ((0, 8), "seq_len must be a positive int, got 0"),
    ((64, 0), "num_shards must be a positive int, got 0"),
    ((64, -8), "num_shards must be a positive int, got -8"),
])
def test_computed_blocks_bad_sizes(args, match):
  with pytest.raises(ValueError, match=match):
    computed_blocks_per_device(*args)
