"""Baselines (LASP-1, ring attention, Ulysses) against the float64 references, forward and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lasp_jax
from lasp_jax.kernels.attention import flash

from lasp_jax import baselines as bl
from lasp_jax.baselines import _common
from tests.references import f64, linear_recurrence, rel_err, softmax_attention

TOL = 2e-4
B, N, H, D = 2, 128, 8, 8      # 8 devices: 16 tokens each, two chunks of 8


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("sp",))


def _rand(seed, shape, lo=None, hi=None):
  r = np.random.default_rng(seed)
  if lo is not None:
    return jnp.asarray(r.uniform(lo, hi, shape), jnp.float32)
  return jnp.asarray(r.standard_normal(shape) * 0.5, jnp.float32)


def _decay(kind):
  return {"none": None, "H": _rand(5, (H,), -0.3, -0.01), "BNH": _rand(6, (B, N, H), -0.3, -0.01),
          "BNHD": _rand(7, (B, N, H, D), -0.3, -0.01)}[kind]


def _value_and_grads(fn):
  """``(args, w) -> (fn(*args), grads of <fn(*args), w> w.r.t. every array arg)`` in one program."""
  def run(w, *args):
    def loss(*xs):
      out = fn(*xs)
      return jnp.sum(out * w), out
    grads, out = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
    return out, grads
  return run


def _check(ops, ref, args, tol=TOL):
  """Forward and gradients of each op in ``ops`` against the f64 reference (computed once)."""
  idx = [i for i, a in enumerate(args) if a is not None]

  def only_arrays(fn):
    def call(*xs):
      full = list(args)
      for i, x in zip(idx, xs):
        full[i] = x
      return fn(*full)
    return call

  xs = [args[i] for i in idx]
  w = None
  for op in ops:
    if w is None:
      w = _rand(99, jax.eval_shape(op, *args).shape)
      want, want_g = f64(jax.jit(_value_and_grads(only_arrays(ref))), w, *xs)
    out, grads = jax.jit(_value_and_grads(only_arrays(op)))(w, *xs)
    assert rel_err(out, want) < tol, rel_err(out, want)
    for i, g, wg in zip(idx, grads, want_g):
      assert rel_err(g, wg) < tol, (i, rel_err(g, wg))


def _small_tiles(monkeypatch):
  """Flash tiles of 8 tokens, so that each device's shard spans several (and tiles get skipped)."""
  pick = flash.pick_block
  monkeypatch.setattr(flash, "pick_block", lambda n, target=8: pick(n, min(target, 8)))


def _lin_ref(q, k, v, g):
  return linear_recurrence(q, k, v, g)[0]


@pytest.mark.parametrize("decay", ["none", "H", "BNH", "BNHD"])
def test_linear_baselines_exact(mesh, monkeypatch, decay):
  """LASP-1 for every decay shape; ring (left product) where it applies; Ulysses for two."""
  monkeypatch.setattr(_common, "QUERY_BLOCK", 8)   # two query blocks per device
  q, k, v = (_rand(i, (B, N, H, D)) for i in range(3))
  ops = [lambda q, k, v, g: bl.lasp1_attention(q, k, v, g, scale=0.5, chunk_size=8)]
  if decay in ("none", "H"):
    ops.append(lambda q, k, v, g: bl.ring_linear_attention(q, k, v, g, scale=0.5))
  if decay in ("H", "BNHD"):
    ops.append(lambda q, k, v, g: bl.ulysses_linear_attention(q, k, v, g, scale=0.5,
                                                              chunk_size=8))
  with jax.set_mesh(mesh):
    _check(ops, lambda q, k, v, g: linear_recurrence(q, k, v, g, scale=0.5)[0],
           (q, k, v, _decay(decay)))


def test_ulysses_linear_bidirectional(mesh):
  q, k, v = (_rand(i, (B, N, H, D)) for i in range(3))
  out = bl.ulysses_linear_attention(q, k, v, mesh=mesh, causal=False, chunk_size=8)
  want = f64(lambda q, k, v: linear_recurrence(q, k, v, causal=False)[0], q, k, v)
  assert rel_err(out, want) < TOL


@pytest.mark.parametrize("causal,layout,hkv", [(True, "contiguous", 2), (False, "zigzag", 4)])
def test_ring_softmax_exact(mesh, monkeypatch, causal, layout, hkv):
  _small_tiles(monkeypatch)
  q = _rand(0, (B, N, H, D)) * 2
  k, v = (_rand(i, (B, N, hkv, D)) * 2 for i in (1, 2))
  pos = lasp_jax.zigzag(jnp.arange(N)[None], 8)[0] if layout == "zigzag" else None

  def ref(q, k, v):
    return softmax_attention(q, k, v, causal=causal, q_positions=pos, kv_positions=pos)

  with jax.set_mesh(mesh):
    _check([lambda q, k, v: bl.ring_softmax_attention(q, k, v, causal=causal, layout=layout)],
           ref, (q, k, v))


@pytest.mark.parametrize("hkv", [2, 8])   # 2: K/V heads repeated up to H (Hkv % W != 0)
def test_ulysses_softmax_exact(mesh, monkeypatch, hkv):
  _small_tiles(monkeypatch)
  q = _rand(0, (B, N, H, D)) * 2
  k, v = (_rand(i, (B, N, hkv, D)) * 2 for i in (1, 2))
  with jax.set_mesh(mesh):
    _check([lambda q, k, v: bl.ulysses_softmax_attention(q, k, v)],
           lambda q, k, v: softmax_attention(q, k, v), (q, k, v))


def test_per_shard_api_on_auto_mesh():
  """The per-shard functions inside a user's own shard_map, on an Auto-axes mesh."""
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
  q, k, v = (_rand(i, (B, N, H, D)) for i in range(3))
  spec = P("dp", "sp", None, None)

  def both(q, k, v):
    return (bl.lasp1(q, k, v, axis_name="sp", chunk_size=8),
            bl.ring_linear(q, k, v, axis_name="sp"),
            bl.ulysses_linear(q, k, v, axis_name="sp", chunk_size=8))

  outs = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3))(
      q, k, v)
  want = f64(lambda q, k, v: linear_recurrence(q, k, v)[0], q, k, v)
  for o in outs:
    assert rel_err(o, want) < TOL


def test_bad_input(mesh):
  q, k, v = (_rand(i, (B, N, H, D)) for i in range(3))
  with pytest.raises(ValueError, match="H % W"):
    bl.ulysses_linear_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], mesh=mesh)
  with pytest.raises(ValueError, match=r"H=6"):
    bl.ulysses_softmax_attention(q[:, :, :6], k[:, :, :3], v[:, :, :3], mesh=mesh)
  with pytest.raises(ValueError, match=r"\(2, 128, 8\)"):
    bl.ring_linear_attention(q, k, v, _decay("BNH"), mesh=mesh)
  with pytest.raises(ValueError, match="causal=False"):
    bl.lasp1_attention(q, k, v, mesh=mesh, causal=False)
  with pytest.raises(ValueError, match="N=120"):
    bl.lasp1_attention(q[:, :120], k[:, :120], v[:, :120], mesh=mesh, chunk_size=8)
  with pytest.raises(ValueError, match="Hkv=3"):
    bl.ring_softmax_attention(q, k[:, :, :3], v[:, :, :3], mesh=mesh)
  with pytest.raises(ValueError, match="'seq'"):
    bl.ring_softmax_attention(q, k, v, mesh=mesh, seq_axis="seq")
  with pytest.raises(ValueError, match="layout"):
    bl.ring_softmax_attention(q, k, v, mesh=mesh, layout="striped")


@pytest.fixture(scope="module")
def mesh4():
  return jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])


def test_lasp1_bad_chunk_size(mesh4):
  """chunk_size 0, negative or not an int: the shared ValueError (as lasp2), never a
  ZeroDivisionError; a valid chunk size still matches the float64 recurrence (W=4, N=64)."""
  q, k, v = (_rand(i, (1, 64, 2, 8)) for i in range(3))
  spec = jax.sharding.PartitionSpec(None, "sp", None, None)
  auto = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("sp",))   # per-shard op: Auto axes
  for bad in (0, -8, 8.0, True):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
      bl.lasp1_attention(q, k, v, mesh=mesh4, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
      jax.shard_map(lambda q, k, v: bl.lasp1(q, k, v, axis_name="sp", chunk_size=bad),
                    mesh=auto, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)
  out = bl.lasp1_attention(q, k, v, mesh=mesh4, chunk_size=8)
  assert rel_err(out, f64(_lin_ref, q, k, v, None)) < TOL


def test_ring_linear_minus_inf_decay(mesh4):
  """A per-head log-decay of -inf is an exact reset (each token sees only itself), as in the main
  ops: no 0 * -inf = NaN on the diagonal. Forward and grads against the float64 recurrence."""
  q, k, v = (_rand(i, (1, 64, 2, 8)) for i in range(3))
  g = jnp.asarray([-jnp.inf, -0.1], jnp.float32)
  with jax.set_mesh(mesh4):
    _check([lambda q, k, v, g: bl.ring_linear_attention(q, k, v, g, scale=0.5)],
           lambda q, k, v, g: linear_recurrence(q, k, v, g, scale=0.5)[0], (q, k, v, g))
