"""The chunked delta rule (XLA path) against the float64 token-by-token recurrence (design §11)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax import kernels
import lasp_jax
from lasp_jax.kernels import delta_rule
from tests.references import delta_recurrence, f64, rel_err

B, N, H, DK, DV, CHUNK = 2, 64, 2, 16, 8, 16
DECAYS = ("none", "head", "token", "channel")
TOL = 2e-4
# Document starts at a chunk edge (16, 48), one token around one (31, 33), documents of 1 and 2
# tokens (40, 41, 43); row 1 is one document.
STARTS = ((16, 31, 33, 40, 41, 43, 48), ())


def make_inputs(decay, *, b=B, n=N, h=H, dk=DK, dv=DV, beta_max=2.0, seed=0, strength=1.0):
  """Unit-norm keys (as the models give them), beta in (0, beta_max)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (b, n, h, dk))
  k = jax.random.normal(ks[1], (b, n, h, dk))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, n, h, dv))
  beta = beta_max * jax.nn.sigmoid(jax.random.normal(ks[3], (b, n, h)))
  g = {
      "none": None,
      "head": -strength * jnp.linspace(0.05, 0.6, h),
      "token": strength * jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[4], (b, n, h))),
      "channel": strength * jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[5], (b, n, h, dk))),
  }[decay]
  s0 = jax.random.normal(ks[6], (b, h, dk, dv))
  ct = jax.random.normal(ks[7], (b, n, h, dv))
  return q, k, v, beta, g, s0, ct


def segment_ids(starts=STARTS, n=N):
  marks = np.zeros((len(starts), n), np.int32)
  for row, pos in enumerate(starts):
    marks[row, list(pos)] = 1
  return jnp.asarray(np.cumsum(marks, axis=1) % 3)  # ids reused: a start is a change of id


def loss_and_outputs(fn, ct, ct_s):
  """``<o, ct> + <S_final, ct_s>`` with ``(o, S_final)`` as aux, for ``fn(q, k, v, beta, g, s0)``."""
  def loss(q, k, v, beta, g, s0):
    o, s = fn(q, k, v, beta, g, s0)
    return jnp.sum(o * ct) + jnp.sum(s * ct_s), (o, s)
  return loss


def argnums(g):
  return (0, 1, 2, 3, 5) if g is None else (0, 1, 2, 3, 4, 5)


def grads_and_outputs(fn, q, k, v, beta, g, s0, ct, ct_s):
  return jax.grad(loss_and_outputs(fn, ct, ct_s), argnums=argnums(g), has_aux=True)(
      q, k, v, beta, g, s0)


def assert_matches(got, want, tol=TOL, what=""):
  (g_got, (o_got, s_got)), (g_want, (o_want, s_want)) = got, want
  assert rel_err(o_got, o_want) < tol, f"{what} output: {rel_err(o_got, o_want)}"
  assert rel_err(s_got, s_want) < tol, f"{what} final state: {rel_err(s_got, s_want)}"
  for i, (a, b) in enumerate(zip(g_got, g_want)):
    assert np.all(np.isfinite(np.asarray(a))), f"{what} grad {i} not finite"
    assert rel_err(a, b) < 5 * tol, f"{what} grad {i}: {rel_err(a, b)}"


@functools.lru_cache(maxsize=None)
def reference(decay, beta_max, packed, scale=0.5):
  q, k, v, beta, g, s0, ct = make_inputs(decay, beta_max=beta_max)
  ids = segment_ids() if packed else None
  ct_s = jnp.ones_like(s0)
  ref = lambda q, k, v, b, g, s0: delta_recurrence(  # noqa: E731
      q, k, v, b, g, scale=scale, initial_state=s0, segment_ids=ids)
  return f64(lambda *a: grads_and_outputs(ref, *a, ct, ct_s), q, k, v, beta, g, s0)


def test_reference_is_the_spec_matrix_recurrence():
  """``delta_recurrence`` (fla's ``v' = beta (v - S^T k)``, ``S += k v'^T``) equals the design §11
  product ``S_i = (I - beta k^T k) diag(a) S + beta k^T v`` written with explicit matrices."""
  q, k, v, beta, g, s0, _ = make_inputs("channel", b=1, n=12, h=1, dk=4, dv=3)
  q, k, v, beta, g, s0 = (np.asarray(x, np.float64) for x in (q, k, v, beta, g, s0))
  s = s0[0, 0]
  want = []
  for i in range(12):
    ki = k[0, i, 0][:, None]                                          # column (Dk, 1)
    trans = (np.eye(4) - beta[0, i, 0] * ki @ ki.T) @ np.diag(np.exp(g[0, i, 0]))
    s = trans @ s + beta[0, i, 0] * ki @ v[0, i, 0][None, :]
    want.append(0.7 * q[0, i, 0] @ s)
  o, s_final = f64(functools.partial(delta_recurrence, scale=0.7), q, k, v, beta, g,
                   initial_state=s0)
  np.testing.assert_allclose(o[0, :, 0], np.stack(want), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(s_final[0, 0], s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decay, beta_max", [
    ("none", 2.0), ("token", 2.0), ("channel", 2.0), ("token", 1.0),
    *(pytest.param(d, b, marks=pytest.mark.slow) for d, b in
      (("head", 2.0), ("none", 1.0), ("head", 1.0), ("channel", 1.0)))])
def test_matches_recurrence_forward_and_gradients(decay, beta_max):
  q, k, v, beta, g, s0, ct = make_inputs(decay, beta_max=beta_max)
  fn = lambda q, k, v, b, g, s0: kernels.chunk_linear_attention(  # noqa: E731
      q, k, v, g, beta=b, scale=0.5, initial_state=s0, chunk_size=CHUNK, backend="xla")
  got = jax.jit(functools.partial(grads_and_outputs, fn))(q, k, v, beta, g, s0, ct,
                                                           jnp.ones_like(s0))
  assert_matches(got, reference(decay, beta_max, False), what=f"{decay} beta<{beta_max}")


@pytest.mark.parametrize("decay", [
    "token", *(pytest.param(d, marks=pytest.mark.slow) for d in ("none", "channel"))])
def test_packed_documents_restart_the_state(decay):
  q, k, v, beta, g, s0, ct = make_inputs(decay)
  ids = segment_ids()
  fn = lambda q, k, v, b, g, s0: lasp_jax.linear_attention(  # noqa: E731
      q, k, v, g, beta=b, scale=0.5, initial_state=s0, segment_ids=ids,
      return_final_state=True, chunk_size=CHUNK)
  got = jax.jit(functools.partial(grads_and_outputs, fn))(q, k, v, beta, g, s0, ct,
                                                           jnp.ones_like(s0))
  assert_matches(got, reference(decay, 2.0, True), what=decay)


def test_a_document_does_not_depend_on_what_is_packed_before_it():
  q, k, v, beta, g, _, _ = make_inputs("token")
  ids = segment_ids()
  o = lasp_jax.linear_attention(q, k, v, g, beta=beta, segment_ids=ids, chunk_size=CHUNK)
  noise = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  before = jnp.arange(N)[None, :, None, None] < 48
  q2, k2 = jnp.where(before, noise, q), jnp.where(before, noise, k)
  o2 = lasp_jax.linear_attention(q2, k2, v, g, beta=beta, segment_ids=ids, chunk_size=CHUNK)
  np.testing.assert_array_equal(np.asarray(o[0, 48:]), np.asarray(o2[0, 48:]))


def test_strong_gates_and_resets_are_exact_and_finite():
  q, k, v, beta, g, s0, _ = make_inputs("token", n=128)
  g = g.at[:, [20, 64, 90]].set(-jnp.inf).at[:, [33, 100]].set(-1e9).at[:, 70].set(-1e6)
  o, s = delta_rule.chunk_delta_rule(q, k, v, beta, g, initial_state=s0, chunk_size=32,
                                     backend="xla")
  want_o, want_s = f64(delta_recurrence, q, k, v, beta, jnp.maximum(g, -1e4), initial_state=s0)
  assert np.all(np.isfinite(np.asarray(o)))
  assert rel_err(o, want_o) < TOL and rel_err(s, want_s) < TOL


def test_nonfinite_input_never_reaches_earlier_positions():
  """A NaN at position 40 leaves every earlier output what the float64 recurrence gives (on the
  clean inputs: causal, positions < 40 never see 40), not just finite."""
  q, k, v, beta, g, _, _ = make_inputs("token")
  want = f64(delta_recurrence, q, k, v, beta, g)[0][:, :40]
  for name in ("k", "v", "beta", "g"):
    args = dict(q=q, k=k, v=v, beta=beta, g=g)
    args[name] = args[name].at[:, 40].set(jnp.nan)
    o = delta_rule.chunk_delta_rule(args["q"], args["k"], args["v"], args["beta"], args["g"],
                                    chunk_size=CHUNK, backend="xla")[0]
    assert np.all(np.isfinite(np.asarray(o[:, :40]))), name
    assert rel_err(o[:, :40], want) < TOL, (name, rel_err(o[:, :40], want))


def test_bfloat16_inputs():
  q, k, v, beta, g, s0, _ = make_inputs("token")
  bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
  o, s = delta_rule.chunk_delta_rule(bf(q), bf(k), bf(v), bf(beta), g, initial_state=s0,
                                     chunk_size=CHUNK, backend="xla")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  want_o, want_s = f64(delta_recurrence, bf(q), bf(k), bf(v), bf(beta), g, initial_state=s0)
  assert rel_err(o, want_o) < 2e-2 and rel_err(s, want_s) < 2e-2


def test_chunk_size_does_not_change_the_result():
  q, k, v, beta, g, _, _ = make_inputs("token", n=32)
  outs = [jax.jit(functools.partial(delta_rule.chunk_delta_rule, chunk_size=c, backend="xla"))(
      q, k, v, beta, g)[0] for c in (1, 8, 32)]
  assert rel_err(outs[0], outs[2]) < 1e-5 and rel_err(outs[1], outs[2]) < 1e-5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beta_shape=(B, N)), ValueError, r"beta must have shape \(B, N, H\)"),
    (dict(beta_value=2.5), ValueError, r"got 2\.5 at index \(1, 3, 0\)"),
    (dict(beta_value=-0.1), ValueError, r"got -0\.1 at index \(1, 3, 0\)"),
    (dict(beta_dtype=jnp.int32), TypeError, "beta must be a float array"),
    (dict(causal=False), ValueError, "beta must be None when causal=False"),
    (dict(chunk_size=24), ValueError, "not a multiple of chunk_size=24"),
])
def test_bad_inputs_are_named(kwargs, error, match):
  q, k, v, beta, g, _, _ = make_inputs("token")
  if "beta_shape" in kwargs:
    beta = jnp.ones(kwargs["beta_shape"])
  if "beta_value" in kwargs:
    beta = beta.at[1, 3, 0].set(kwargs["beta_value"])
  if "beta_dtype" in kwargs:
    beta = beta.astype(kwargs["beta_dtype"])
  with pytest.raises(error, match=match):
    lasp_jax.linear_attention(q, k, v, None if kwargs.get("causal") is False else g, beta=beta,
                              causal=kwargs.get("causal", True),
                              chunk_size=kwargs.get("chunk_size", CHUNK))


def test_float64_beta_is_refused():
  q, k, v, beta, g, _, _ = make_inputs("token")
  with jax.enable_x64(True):
    with pytest.raises(TypeError, match="beta has dtype float64"):
      delta_rule.chunk_delta_rule(q, k, v, jnp.asarray(np.asarray(beta, np.float64)), g)


@pytest.mark.parametrize("backend", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
def test_pallas_state_pass_and_output_kernels_match_xla(backend):
  """The whole op with the Pallas WY prepare (GPU), state pass and linear-attention kernels
  (interpret mode)."""
  q, k, v, beta, g, s0, ct = make_inputs("token", dv=16)
  ids = segment_ids()

  def run(name):
    fn = lambda q, k, v, b, g, s0: delta_rule.chunk_delta_rule(  # noqa: E731
        q, k, v, b, g, initial_state=s0, segment_ids=ids, chunk_size=CHUNK, backend=name,
        interpret=True if name != "xla" else None)
    return jax.jit(functools.partial(grads_and_outputs, fn))(q, k, v, beta, g, s0, ct,
                                                             jnp.ones_like(s0))
  if backend == "gpu":   # the WY stage on its kernels too (the TPU has none: XLA)
    assert "delta_prepare_fwd" in str(jax.make_jaxpr(lambda *a: delta_rule.chunk_delta_rule(
        *a, chunk_size=CHUNK, backend="gpu", interpret=True))(q, k, v, beta, g))
  assert_matches(run(backend), run("xla"), tol=1e-5, what=backend)


# --- non-finite inputs in the backward pass, across resets (issue 23, item 7) --------------------

@functools.lru_cache(maxsize=None)
def _op_and_ref(backend, starts=()):
  """``chunk_delta_rule`` and the float64 recurrence, documents starting at ``starts`` (one
  function object per case, so that the jitted ``_outputs_and_vjp`` compiles once)."""
  ids = jnp.asarray(np.searchsorted(starts, np.arange(N), side="right")[None]) if starts else None

  def op(q, k, v, b, g, s0):
    return delta_rule.chunk_delta_rule(q, k, v, b, g, scale=0.5, initial_state=s0,
                                       segment_ids=ids, chunk_size=CHUNK, backend=backend,
                                       interpret=True)

  def ref(q, k, v, b, g, s0):
    return delta_recurrence(q, k, v, b, g, scale=0.5, initial_state=s0, segment_ids=ids)
  return op, ref


@functools.partial(jax.jit, static_argnums=0)
def _outputs_and_vjp(fn, *a):
  out, pullback = jax.vjp(fn, *a[:6])
  return out, pullback(tuple(a[6:]))


def _vjp_both(backend, args, cts, starts=()):
  """``((o, s_final), grads)`` of ``chunk_delta_rule`` and of the float64 recurrence on the same
  inputs with every NaN (inputs and cotangents ``(do, ds_final)``) replaced by 0."""
  op, ref = _op_and_ref(backend, starts)
  clean = lambda xs: [jnp.where(jnp.isnan(x), 0.0, x) for x in xs]  # noqa: E731
  return _outputs_and_vjp(op, *args, *cts), f64(_outputs_and_vjp, ref, *clean(args), *clean(cts))


def _assert_exact(name, got, want, rows=slice(None)):
  got, want = np.asarray(got, np.float64)[:, rows], np.asarray(want)[:, rows]
  assert np.all(np.isfinite(got)), f"{name}: a NaN reached it"
  assert rel_err(got, want) < TOL, (name, rel_err(got, want))


GRAD_NAMES = ("dq", "dk", "dv", "dbeta", "dg")


@pytest.mark.parametrize("backend", ["xla", "gpu"])
def test_nan_in_a_document_stays_in_it_forward_and_backward(backend):
  """Documents [0, 20), [20, 44), [44, 64); a NaN in the middle one's q (24), k (28), v (33),
  beta (36) and gate (38), and NaN cotangents on its non-finite outputs: the other documents'
  outputs, final state and gradients (and d initial_state) are finite and equal the float64
  recurrence's without the NaN. Was: NaN everywhere after the NaN (the WY solve's 0 * NaN across
  the in-chunk reset, e^{-inf} * NaN in the state pass) and in every earlier gradient."""
  q, k, v, beta, g, s0, ct = make_inputs("token", b=1)
  args = [q, k, v, beta, g]
  for i, t in enumerate((24, 28, 33, 36, 38)):
    args[i] = args[i].at[:, t].set(jnp.nan)
  ct = ct.at[:, 24:44].set(jnp.nan)
  ct_s = jax.random.normal(jax.random.PRNGKey(3), s0.shape)
  ((o, s), grads), ((o_ref, s_ref), grads_ref) = _vjp_both(backend, (*args, s0), (ct, ct_s),
                                                           (20, 44))
  for rows in (slice(0, 20), slice(44, None)):
    for name, got, want in zip(("o",) + GRAD_NAMES, (o, *grads[:5]), (o_ref, *grads_ref[:5])):
      _assert_exact(f"{name} rows {rows}", got, want, rows)
  _assert_exact("final state", s, s_ref)
  _assert_exact("d initial_state", grads[5], grads_ref[5])
  _assert_exact("o (NaN document, before the NaN)", o, o_ref, slice(20, 24))
  assert not np.any(np.isfinite(np.asarray(o)[:, 28:44]))


def test_nan_with_a_zero_cotangent_leaves_the_other_gradients_exact():
  """A NaN q at token t whose output's cotangent is 0, and (second case) a NaN k, v and beta at t
  with zero cotangents on every output they reach (a masked padding tail): no gradient depends on
  them, so every other token's gradients, dg and d initial_state are finite and exact."""
  q, k, v, beta, g, s0, ct = make_inputs("token", b=1)
  t, others = 30, np.arange(N) != 30
  ct_s = jax.random.normal(jax.random.PRNGKey(4), s0.shape)
  cases = (((q.at[:, t].set(jnp.nan), k, v, beta), ct.at[:, t].set(0.0), ct_s),
           ((q, k.at[:, t].set(jnp.nan), v.at[:, t].set(jnp.nan), beta.at[:, t].set(jnp.nan)),
            ct.at[:, t:].set(0.0), 0 * ct_s))
  for case, (inputs, do, ds) in enumerate(cases):
    (_, grads), (_, want) = _vjp_both("xla", (*inputs, g, s0), (do, ds))
    for name, got, ref in zip(GRAD_NAMES, grads, want):
      _assert_exact(f"{name} (case {case})", got, ref, others)
    _assert_exact(f"d initial_state (case {case})", grads[5], want[5])
