"""The short causal conv (design §12) against a float64 reference: W = 1..8, both layouts, K = 1..4,
document starts at and around device boundaries, gradients; its collectives are a halo only."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax import comm
from tests.references import causal_conv1d as conv_reference
from tests.references import f64, rel_err

B, N, C = 2, 64, 8
TOL = 1e-5
# Document starts in natural order. Row 0: at a device boundary of every W (32, 16, 8), one and
# two tokens around one (15, 17, 31, 34), one-token and two-token documents (20, 21, 23),
# and a start at 4 (a zigzag half-shard edge at W=8). Row 1: one document over every device but
# for a start at the last token.
STARTS = ((4, 8, 15, 17, 20, 21, 23, 31, 32, 34, 48), (63,))


def _segment_ids():
  ids = np.zeros((B, N), np.int32)
  for b, starts in enumerate(STARTS):
    ids[b, list(starts)] = 1
  # Ids are reused (mod 3): a document starts where the id differs from the previous one.
  return jnp.asarray(np.cumsum(ids, axis=1) % 3, jnp.int32)


def _inputs(k, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(ks[0], (B, N, C))
  w = jax.random.normal(ks[1], (k, C))
  bias = jax.random.normal(ks[2], (C,))
  ct = jax.random.normal(ks[3], (B, N, C))
  return x, w, bias, ct


def _out_and_grads(fn, x, w, bias, ct):
  y, vjp = jax.vjp(fn, x, w, bias)
  return y, vjp(ct)


@functools.lru_cache(maxsize=None)
def _reference(k, segments, activation):
  x, w, bias, ct = _inputs(k)
  ids = _segment_ids() if segments else None
  fn = lambda x, w, b: conv_reference(x, w, b, activation=activation, segment_ids=ids)  # noqa
  return f64(lambda *a: _out_and_grads(fn, *a), x, w, bias, ct)


def _mesh(w):
  return jax.make_mesh((w,), ("sp",), devices=jax.devices()[:w])


def _check(got, want, layout, w, what):
  to_natural = (lambda a: lasp_jax.unzigzag(np.asarray(a), w)) if layout == "zigzag" else (
      lambda a: a)
  (y, (dx, dw, db)), (ry, (rdx, rdw, rdb)) = got, want
  for name, a, r in (("y", to_natural(y), ry), ("dx", to_natural(dx), rdx), ("dweight", dw, rdw),
                     ("dbias", db, rdb)):
    err = rel_err(a, r)
    assert err < TOL, f"{what}: {name} rel err {err}"


# Every device count, layout and kernel size by default; the rest of the product is slow.
_CONV_DEFAULT = {(8, "zigzag", 4), (4, "contiguous", 3), (2, "zigzag", 2), (1, "contiguous", 4)}


@pytest.mark.parametrize("w, layout, k", [
    c if c in _CONV_DEFAULT else pytest.param(*c, marks=pytest.mark.slow)
    for c in itertools.product([1, 2, 4, 8], ["contiguous", "zigzag"], [2, 3, 4])])
def test_sequence_parallel_conv_with_documents_matches_reference(w, layout, k):
  x, wt, bias, ct = _inputs(k)
  ids = _segment_ids()
  to_layout = (lambda a: lasp_jax.zigzag(a, w)) if layout == "zigzag" else (lambda a: a)
  mesh = _mesh(w)
  fn = lambda x, wt, b: lasp_jax.causal_conv1d(  # noqa: E731
      x, wt, b, activation="silu", segment_ids=to_layout(ids), mesh=mesh, layout=layout)
  got = jax.jit(lambda *a: _out_and_grads(fn, *a))(to_layout(x), wt, bias, to_layout(ct))
  _check(got, _reference(k, True, "silu"), layout, w, f"W={w} {layout} K={k}")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_one_device_conv_matches_reference(k):
  x, wt, bias, ct = _inputs(k)
  for segments, act in ((False, None), (True, "silu")):
    ids = _segment_ids() if segments else None
    fn = lambda x, wt, b: lasp_jax.causal_conv1d(x, wt, b, activation=act,  # noqa: E731
                                                 segment_ids=ids)
    got = jax.jit(lambda *a: _out_and_grads(fn, *a))(x, wt, bias, ct)
    _check(got, _reference(k, segments, act), "contiguous", 1, f"one device K={k} {act}")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_no_documents_no_activation_on_a_context_mesh(layout):
  """Without segment ids or bias, the mesh taken from ``jax.set_mesh``, on a data x sp mesh."""
  k = 4
  x, wt, _, ct = _inputs(k)
  mesh = jax.make_mesh((2, 4), ("data", "sp"))
  to_layout = (lambda a: lasp_jax.zigzag(a, 4)) if layout == "zigzag" else (lambda a: a)
  fn = lambda x, wt: lasp_jax.causal_conv1d(x, wt, batch_axis="data", layout=layout)  # noqa

  def out_and_grads(x, wt, ct):  # <y, ct>'s gradient: ct need not carry y's sharding
    return fn(x, wt), jax.grad(lambda x, wt: jnp.sum(fn(x, wt) * ct), argnums=(0, 1))(x, wt)

  with jax.set_mesh(mesh):
    y, (dx, dw) = jax.jit(out_and_grads)(to_layout(x), wt, to_layout(ct))
  ry, (rdx, rdw, _) = _reference_no_bias(k)
  to_natural = (lambda a: lasp_jax.unzigzag(np.asarray(a), 4)) if layout == "zigzag" else (
      lambda a: a)
  assert rel_err(to_natural(y), ry) < TOL
  assert rel_err(to_natural(dx), rdx) < TOL
  assert rel_err(dw, rdw) < TOL


@functools.lru_cache(maxsize=None)
def _reference_no_bias(k):
  x, w, _, ct = _inputs(k)
  fn = lambda x, w, b: conv_reference(x, w, None)  # noqa: E731
  return f64(lambda *a: _out_and_grads(fn, *a), x, w, jnp.zeros((C,)), ct)


def test_nan_in_a_later_document_does_not_leak_back():
  x, wt, bias, _ = _inputs(4)
  x = x.at[0, 40].set(jnp.nan)         # document [34, 48) of row 0; row 1 is one document
  mesh = _mesh(8)
  y = lasp_jax.causal_conv1d(x, wt, bias, segment_ids=_segment_ids(), mesh=mesh)
  finite = np.isfinite(np.asarray(y))
  assert finite[0, :40].all() and finite[0, 48:].all() and finite[1].all()
  assert not finite[0, 40:44].any()


def test_halo_is_the_only_communication_and_does_not_grow_with_n():
  """fwd+bwd: collective-permutes of (K-1) B C values (+ (K-1) B ids) per segment, no gather."""
  w, b, c, k = 8, 2, 16, 4
  mesh = _mesh(w)
  for layout, permutes in (("contiguous", 1), ("zigzag", 2)):
    stats = []
    for n in (256, 2048):
      sh = NamedSharding(mesh, P(None, "sp"))
      x = jax.ShapeDtypeStruct((b, n, c), jnp.float32, sharding=NamedSharding(mesh, P(None, "sp")))
      ids = jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=sh)
      wt = jax.ShapeDtypeStruct((k, c), jnp.float32, sharding=NamedSharding(mesh, P()))
      loss = lambda x, wt, ids: jnp.sum(lasp_jax.causal_conv1d(  # noqa: E731
          x, wt, activation="silu", segment_ids=ids, mesh=mesh, layout=layout) ** 2)
      stats.append(comm.summarize(comm.collective_stats(
          jax.grad(loss, argnums=(0, 1)), x, wt, ids, mesh=mesh)))
    assert stats[0] == stats[1], (layout, stats)
    # The weight gradient is summed over devices (an all-reduce of K C floats); nothing else.
    assert set(stats[0]) == {"collective-permute", "all-reduce"}, (layout, stats[0])
    assert stats[0]["all-reduce"]["bytes"] == k * c * 4
    values, ids_bytes = (k - 1) * b * c * 4, (k - 1) * b * 4
    # Per segment: values and ids forward, the values' cotangent backward.
    assert stats[0]["collective-permute"] == {"count": 3 * permutes,
                                              "bytes": permutes * (2 * values + ids_bytes)}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(weight=jnp.zeros((4,))), "weight must have shape (K, C)"),
    (dict(weight=jnp.zeros((4, 3))), "weight must have shape (K, C)"),
    (dict(weight=jnp.zeros((0, C))), "K must be >= 1"),
    (dict(bias=jnp.zeros((3,))), "bias must have shape"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(segment_ids=jnp.zeros((B, N - 1), jnp.int32)), "segment_ids must have shape"),
    (dict(segment_ids=jnp.zeros((B, N), jnp.float32)), "segment_ids must be an integer"),
    (dict(layout="ring"), "layout must be one of"),
    (dict(x=jnp.zeros((B, N))), "x must have shape (B, N, C)"),
    (dict(x=jnp.zeros((B, N, C), jnp.int32)), "x must be a float array"),
])
def test_bad_inputs_name_the_value(kwargs, needle):
  args = dict(x=jnp.zeros((B, N, C)), weight=jnp.zeros((4, C)))
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=needle.replace("(", r"\(").replace(")", r"\)")):
    lasp_jax.causal_conv1d(args.pop("x"), args.pop("weight"), **args)


def test_segment_shorter_than_the_halo_is_an_error():
  x = jnp.zeros((B, 16, C))            # zigzag over 8 devices: 1 token per segment, K-1 = 3
  with pytest.raises(ValueError, match="1 tokens .* K=4 needs K-1=3"):
    lasp_jax.causal_conv1d(x, jnp.zeros((4, C)), mesh=_mesh(8), layout="zigzag")
  with pytest.raises(ValueError, match="'nope' is not an axis"):
    lasp_jax.causal_conv1d(x, jnp.zeros((4, C)), mesh=_mesh(8), seq_axis="nope")
