"""The delta rule's WY prepare (stage 1) as Triton kernels (interpret mode) vs a float64 solve.

Stage 1 per chunk (``kernels/delta_rule/reference`` module docstring): ``A_ij = beta_i <k_i, k_j>
e^{sum_{j<l<=i} g_l}`` below the diagonal, ``W = (I + A)^{-1} diag(beta) K e^{b}``, ``U0 = (I +
A)^{-1} diag(beta) V``, ``K_end = K e^{sum_{l>j} g_l}``, ``gamma`` the chunk's total. The reference
below writes it out in float64 with a dense solve, the log-decay sums taken directly over masks.
Several chunks, resets inside a chunk and at a chunk edge, a strong non-reset gate, beta up to 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax.kernels.delta_rule import api as delta_api
from lasp_jax.kernels.delta_rule import pallas_gpu
from lasp_jax.kernels.delta_rule import reference as delta_ref
from tests.references import f64, rel_err

B, N, H, DK, DV, C = 2, 64, 2, 16, 32, 16
NAMES = ("w", "u0", "k_end", "gamma")


def wy_reference(k, v, beta, g, chunk):
  """Stage 1 in float64: ``(w, u0, k_end, gamma)`` in the ``(B, H, NC, C, D)`` layout.

  ``g``: None, ``(H,)`` or ``(B, N, H)`` log-decays, ``-inf`` taken as the clamp floor ``-1e4``
  (its exp is 0 in float64 too).
  """
  bsz, n, h, _ = k.shape
  g = jnp.zeros((bsz, n, h)) if g is None else jnp.broadcast_to(jnp.maximum(g, -1e4), (bsz, n, h))
  chunks = lambda x: x.reshape(bsz, n // chunk, chunk, h, *x.shape[3:]).swapaxes(2, 3)  # noqa
  k_c, v_c, beta_c, g_c = chunks(k), chunks(v), chunks(beta), chunks(g)   # (B, NC, H, C, ...)
  i, j, l = np.ogrid[:chunk, :chunk, :chunk]
  between = jnp.asarray((j < l) & (l <= i), jnp.float64)                  # (C, C, C)
  log_w = jnp.einsum("ijl,bnhl->bnhij", between, g_c)
  up_to = jnp.asarray(np.arange(chunk)[None, :] <= np.arange(chunk)[:, None], jnp.float64)
  log_b = jnp.einsum("il,bnhl->bnhi", up_to, g_c)                        # sum_{l<=i} g_l
  log_end = jnp.einsum("il,bnhl->bnhi", 1.0 - up_to, g_c)                # sum_{l>i} g_l
  strict = np.tril(np.ones((chunk, chunk)), -1)
  a = strict * beta_c[..., None] * jnp.einsum("bnhid,bnhjd->bnhij", k_c, k_c) * jnp.exp(log_w)
  rhs_k = beta_c[..., None] * k_c * jnp.exp(log_b)[..., None]
  rhs_v = beta_c[..., None] * v_c
  eye = jnp.eye(chunk)
  w, u0 = (jnp.linalg.solve(eye + a, r) for r in (rhs_k, rhs_v))
  k_end = k_c * jnp.exp(log_end)[..., None]
  gamma = jnp.sum(g_c, axis=-1, keepdims=True)
  layout = lambda x: x.swapaxes(1, 2)                                     # (B, H, NC, ...)  # noqa
  return tuple(layout(x) for x in (w, u0, k_end, gamma))


def make_inputs(decay, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  k = jax.random.normal(ks[0], (B, N, H, DK))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[1], (B, N, H, DV))
  beta = 2.0 * jax.nn.sigmoid(jax.random.normal(ks[2], (B, N, H)))
  g = {"none": None,
       "head": -jnp.linspace(0.05, 0.6, H),
       "token": jax.nn.log_sigmoid(1.0 + jax.random.normal(ks[3], (B, N, H)))}[decay]
  if decay == "token":
    # a reset inside a chunk (-inf) and at a chunk edge (-1e9), a strong gate that is no reset
    g = g.at[0, 21, 0].set(-jnp.inf).at[1, 32, 1].set(-1e9).at[0, 40, 1].set(-50.0)
  return k.astype(dtype), v.astype(dtype), beta, g


def _stage1(fn):
  """``(outputs, vjp of random cotangents)`` of ``fn(k, v, beta, g) -> (w, u0, k_end, gamma)``."""
  def go(k, v, beta, g):
    out, vjp = jax.vjp(lambda *a: tuple(fn(*a)), k, v, beta, g)
    rng = np.random.default_rng(1)
    cts = tuple(jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in out)
    return out, vjp(cts)
  return go


def _kernel(k, v, beta, g):
  c = delta_api.prepare(k, v, beta, g, chunk_size=C, backend="gpu", interpret=True)
  return c.w, c.u0, c.k_end, c.gamma


def _compare(decay, dtype, tol_out, tol_grad):
  k, v, beta, g = make_inputs(decay, dtype)
  got_out, got_grads = jax.jit(_stage1(_kernel))(k, v, beta, g)
  want_out, want_grads = f64(_stage1(lambda *a: wy_reference(*a, C)), k, v, beta, g)
  for name, a, b in zip(NAMES, got_out, want_out):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    assert np.all(np.isfinite(np.asarray(a))), name
    assert rel_err(a, b) < tol_out, (name, rel_err(a, b))
  for name, a, b in zip(("dk", "dv", "dbeta", "dg"), got_grads, want_grads):
    if b is None:
      continue
    assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    # An (H,) decay's gradient sums over every token: compare it as a whole.
    assert rel_err(a, b) < tol_grad, (name, rel_err(a, b))


@pytest.mark.parametrize("decay", ["token", pytest.param("none", marks=pytest.mark.slow),
                                   pytest.param("head", marks=pytest.mark.slow)])
def test_float32_matches_the_float64_solve(decay):
  """Float32 inputs (IEEE dots): the outputs and every gradient to float32 accuracy."""
  _compare(decay, jnp.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("decay", ["token", pytest.param("head", marks=pytest.mark.slow)])
def test_bfloat16_keeps_the_solve_at_float32_accuracy(decay):
  """bf16 inputs: tensor-core dots. The solve's operands are split into bf16 heads and tails, so
  W and U0 stay near float32 accuracy (a plain bf16 inverse: ~2e-3); the backward's dots are
  plain bf16, and dk, dv come back in bf16."""
  _compare(decay, jnp.bfloat16, 5e-5, 1e-2)


def test_the_kernels_run_and_everything_else_falls_back_to_xla():
  """``backend="gpu"`` puts stage 1 on the kernels for scalar decays and power-of-two sizes;
  a per-channel decay or a head dim of 8 runs the XLA solve instead, with the same result."""
  k, v, beta, g = make_inputs("token", jnp.float32)
  jaxpr = str(jax.make_jaxpr(_kernel)(k, v, beta, g))
  assert "delta_prepare_fwd" in jaxpr
  g_channel = jnp.broadcast_to(jnp.maximum(g, -1e4)[..., None], (B, N, H, DK))
  for args in ((k, v, beta, g_channel), (k, v[..., :8], beta, g)):
    assert "pallas_call" not in str(jax.make_jaxpr(_kernel)(*args))
    got = _kernel(*args)
    want = delta_api.prepare(*args, chunk_size=C, backend="xla")
    for a, b in zip(got, (want.w, want.u0, want.k_end, want.gamma)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shapes,g_shape,dtype,match", [
    (((1, 64, 2, 24), (1, 64, 2, 32)), None, jnp.float32, "head dim Dk to be a power of two"),
    (((1, 64, 2, 16), (1, 64, 2, 32)), (1, 64, 2, 16), jnp.float32, "per-channel decay"),
    (((1, 64, 2, 16), (1, 64, 2, 32)), None, jnp.float16, "float32 or bfloat16"),
])
def test_shapes_the_kernels_cannot_tile_are_named(shapes, g_shape, dtype, match):
  k, v = (jnp.zeros(s, dtype) for s in shapes)
  g = None if g_shape is None else jnp.zeros(g_shape)
  with pytest.raises((ValueError, TypeError), match=match):
    pallas_gpu.prepare_chunks_gpu(k, v, jnp.zeros(k.shape[:3]), g, C)
  with pytest.raises(ValueError, match="the chunk size C to be a power of two"):
    pallas_gpu.prepare_chunks_gpu(*(jnp.zeros(s) for s in shapes), jnp.zeros(shapes[0][:3]),
                                  None, 24)


def test_a_chunk_that_does_not_divide_n_or_mismatched_v_is_named():
  k = jnp.zeros((1, 64, 2, 16))
  with pytest.raises(ValueError, match="C=128 must divide the sequence length N=64"):
    pallas_gpu.prepare_chunks_gpu(k, jnp.zeros((1, 64, 2, 32)), jnp.zeros((1, 64, 2)), None, 128)
  with pytest.raises(ValueError, match=r"v must have k's \(B, N, H\) = \(1, 64, 2\)"):
    pallas_gpu.prepare_chunks_gpu(k, jnp.zeros((1, 32, 2, 32)), jnp.zeros((1, 64, 2)), None, 16)


def test_lowers_for_the_real_hardware():
  """Cross-lowers fwd+bwd at a production-like size for an H100: the Triton lowering of both
  kernels, which interpret mode never touches (not the backend compile: no GPU here)."""
  sds = jax.ShapeDtypeStruct
  bf = jnp.bfloat16

  def step(k, v, beta, g):
    def loss(k, v, beta, g):
      c = pallas_gpu.prepare_chunks_gpu(k, v, beta, g[..., None], 64)
      return sum(jnp.sum(x) for x in (c.w, c.u0, c.k_end, c.gamma))
    return jax.grad(loss, argnums=(0, 1, 2, 3))(k, v, beta, g)

  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(
        jax.jit(step), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            sds((2, 256, 2, 128), bf), sds((2, 256, 2, 128), bf), sds((2, 256, 2), jnp.float32),
            sds((2, 256, 2), jnp.float32))
  assert exported.mlir_module().count("xla.gpu.triton") >= 2   # forward, backward


def test_reference_chunks_agree_with_the_library_xla_solve():
  """The float64 solve above and ``reference.prepare_chunks`` (block elimination) agree: the
  reference here is the one the XLA path is (independently) checked against via the recurrence."""
  k, v, beta, g = make_inputs("token", jnp.float32)
  want = f64(lambda *a: wy_reference(*a, C), k, v, beta, g)
  from lasp_jax.kernels.linear_attention import reference as la_ref
  got = delta_ref.prepare_chunks(k, v, beta, la_ref.per_token_log_decay(g, B, N, H), C)
  for name, a, b in zip(NAMES, (got.w, got.u0, got.k_end, got.gamma), want):
    assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))


def test_lasp2_delta_rule_with_the_gpu_kernels_matches_the_recurrence():
  """``lasp2_attention(beta=..., backend="gpu")`` on 4 simulated devices: the prepare, state-pass
  and output kernels in interpret mode inside shard_map, packed documents across a device edge,
  forward and gradients against the float64 token-by-token recurrence."""
  from lasp_jax import lasp2_attention
  from tests.references import delta_recurrence
  n = 128
  ks = jax.random.split(jax.random.PRNGKey(6), 5)
  q = jax.random.normal(ks[0], (1, n, 1, DK)) * DK ** -0.5
  k = jax.random.normal(ks[1], (1, n, 1, DK))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (1, n, 1, DV))
  beta = 2.0 * jax.nn.sigmoid(jax.random.normal(ks[3], (1, n, 1)))
  g = jax.nn.log_sigmoid(1.0 + jax.random.normal(ks[4], (1, n, 1)))
  ids = jnp.asarray((np.arange(n) >= 40) + (np.arange(n) >= 70), jnp.int32)[None]
  mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])

  def loss(fn):
    w = jnp.cos(jnp.arange(n * DV, dtype=jnp.float32)).reshape(1, n, 1, DV)
    return lambda *a: jnp.sum(fn(*a) * w)

  def op(q, k, v, beta, g):
    return lasp2_attention(q, k, v, g, beta=beta, segment_ids=ids, mesh=mesh, chunk_size=16,
                           backend="gpu")

  def ref(q, k, v, beta, g):
    return delta_recurrence(q, k, v, beta, g, segment_ids=ids)[0]

  with jax.set_mesh(mesh):
    assert "delta_prepare_fwd" in str(jax.make_jaxpr(op)(q, k, v, beta, g))
    got = (op(q, k, v, beta, g), *jax.grad(loss(op), argnums=(0, 1, 2, 3, 4))(q, k, v, beta, g))
  want = (f64(ref, q, k, v, beta, g),
          *f64(lambda *a: jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(*a), q, k, v, beta, g))
  for name, a, b in zip(("o", "dq", "dk", "dv", "dbeta", "dg"), got, want):
    assert rel_err(a, b) < 2e-4, (name, rel_err(a, b))
