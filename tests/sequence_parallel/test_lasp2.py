"""LASP-2 (and the one-device op) against the float64 recurrence, forward and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lasp_jax
from lasp_jax import comm
from tests.references import f64, linear_recurrence, rel_err

B, N, H, DK, DV = 2, 256, 2, 8, 16
CHUNK = 16
DECAYS = ("none", "head", "token", "channel")
TOL = 2e-4


def make_inputs(decay, *, b=B, n=N, h=H, dk=DK, dv=DV, seed=0, strength=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (b, n, h, dk))
  k = jax.random.normal(ks[1], (b, n, h, dk))
  v = jax.random.normal(ks[2], (b, n, h, dv))
  g = {
      "none": None,
      "head": -strength * jnp.linspace(0.05, 0.6, h),
      "token": strength * jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[3], (b, n, h))),
      "channel": strength * jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[4], (b, n, h, dk))),
  }[decay]
  ct = jax.random.normal(jax.random.PRNGKey(seed + 1), (b, n, h, dv))
  return q, k, v, g, ct


def out_and_grads(fn, q, k, v, g, ct):
  """The output and the VJP of <o, ct> w.r.t. q, k, v (and g), in one program."""
  args = (q, k, v) if g is None else (q, k, v, g)
  o, vjp = jax.vjp(lambda *a: fn(*a) if g is not None else fn(*a, None), *args)
  return o, vjp(ct.astype(o.dtype))


@functools.lru_cache(maxsize=None)
def reference(decay, causal=True):
  q, k, v, g, ct = make_inputs(decay)
  fn = functools.partial(linear_recurrence, causal=causal)
  return f64(lambda q, k, v, g, ct: out_and_grads(lambda *a: fn(*a)[0], q, k, v, g, ct),
             q, k, v, g, ct)


def assert_close(got, want, tol=TOL, what=""):
  got_o, got_g = got
  want_o, want_g = want
  assert rel_err(got_o, want_o) < tol, f"{what} output: {rel_err(got_o, want_o)}"
  for i, (a, b) in enumerate(zip(got_g, want_g)):
    assert np.all(np.isfinite(np.asarray(a, np.float64))), f"{what} grad {i} not finite"
    assert rel_err(a, b) < tol, f"{what} grad {'qkvg'[i]}: {rel_err(a, b)}"


def sp_mesh(w, explicit=True):
  devs = jax.devices()[:w]
  if explicit:
    return jax.make_mesh((w,), ("sp",), devices=devs)
  return jax.sharding.Mesh(np.array(devs), ("sp",))


# --- one device ---------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", DECAYS)
def test_linear_attention_matches_recurrence(decay):
  q, k, v, g, ct = make_inputs(decay)
  fn = jax.jit(lambda *a: out_and_grads(
      functools.partial(lasp_jax.linear_attention, chunk_size=CHUNK), *a))
  assert_close(fn(q, k, v, g, ct), reference(decay), what=decay)


def test_linear_attention_initial_and_final_state():
  q, k, v, g, _ = make_inputs("channel", n=64)
  s0 = jax.random.normal(jax.random.PRNGKey(7), (B, H, DK, DV))
  o, s = lasp_jax.linear_attention(q, k, v, g, initial_state=s0, return_final_state=True,
                                   chunk_size=CHUNK)
  want_o, want_s = f64(linear_recurrence, q, k, v, g, initial_state=s0)
  assert s.dtype == jnp.float32 and s.shape == (B, H, DK, DV)
  assert rel_err(o, want_o) < TOL and rel_err(s, want_s) < TOL
  # Splitting a sequence in two and carrying the state gives the unsplit result.
  o1, s1 = lasp_jax.linear_attention(q[:, :32], k[:, :32], v[:, :32], g[:, :32],
                                     initial_state=s0, return_final_state=True, chunk_size=CHUNK)
  o2 = lasp_jax.linear_attention(q[:, 32:], k[:, 32:], v[:, 32:], g[:, 32:], initial_state=s1,
                                 chunk_size=CHUNK)
  assert rel_err(jnp.concatenate([o1, o2], axis=1), want_o) < TOL


def test_linear_attention_bidirectional():
  q, k, v, _, ct = make_inputs("none")
  got = jax.jit(lambda *a: out_and_grads(
      functools.partial(lasp_jax.linear_attention, causal=False, scale=0.5), *a))(q, k, v, None, ct)
  fn = functools.partial(linear_recurrence, causal=False, scale=0.5)
  want = f64(lambda q, k, v, ct: out_and_grads(lambda *a: fn(*a)[0], q, k, v, None, ct),
             q, k, v, ct)
  assert_close(got, want)


# --- LASP-2 over the sequence axis ----------------------------------------------------------------

# Every decay on 8 devices, every device count with a per-token decay; the rest is slow.
@pytest.mark.parametrize("w, decay", [
    (w, d) if w == 8 or d == "token" else pytest.param(w, d, marks=pytest.mark.slow)
    for w in (1, 2, 4, 8) for d in DECAYS])
def test_lasp2_attention_matches_recurrence(w, decay):
  # N / W / CHUNK = 16, 8, 4, 2 chunks per device: the local chunking matters in every case.
  mesh = sp_mesh(w)
  q, k, v, g, ct = make_inputs(decay)
  fn = jax.jit(lambda *a: out_and_grads(
      functools.partial(lasp_jax.lasp2_attention, mesh=mesh, chunk_size=CHUNK), *a))
  assert_close(fn(q, k, v, g, ct), reference(decay), what=f"W={w} {decay}")


@pytest.mark.parametrize("decay", DECAYS)
def test_lasp2_zigzag_layout(decay):
  w = 8
  mesh = sp_mesh(w)
  q, k, v, g, ct = make_inputs(decay)
  zz = lambda x: x if x is None or x.ndim < 3 else lasp_jax.zigzag(x, w)
  fn = jax.jit(lambda *a: out_and_grads(functools.partial(
      lasp_jax.lasp2_attention, mesh=mesh, chunk_size=CHUNK, layout="zigzag"), *a))
  o, grads = fn(*(zz(x) for x in (q, k, v, g, ct)))
  un = lambda x: x if x.ndim < 3 else lasp_jax.unzigzag(x, w)
  assert_close((un(o), [un(x) for x in grads]), reference(decay), what=f"zigzag {decay}")


@pytest.mark.parametrize("w", [2, 8])
def test_lasp2_bidirectional(w):
  mesh = sp_mesh(w)
  q, k, v, _, ct = make_inputs("none")
  got = jax.jit(lambda *a: out_and_grads(functools.partial(
      lasp_jax.lasp2_attention, mesh=mesh, causal=False, scale=0.5, chunk_size=CHUNK), *a))(
          q, k, v, None, ct)
  fn = functools.partial(linear_recurrence, causal=False, scale=0.5)
  want = f64(lambda q, k, v, ct: out_and_grads(lambda *a: fn(*a)[0], q, k, v, None, ct),
             q, k, v, ct)
  assert_close(got, want)


def test_lasp2_data_and_sequence_mesh():
  mesh = jax.make_mesh((2, 4), ("data", "sp"))
  q, k, v, g, ct = make_inputs("token")
  fn = jax.jit(lambda *a: out_and_grads(functools.partial(
      lasp_jax.lasp2_attention, mesh=mesh, batch_axis="data", chunk_size=CHUNK), *a))
  with jax.set_mesh(mesh):
    got = fn(q, k, v, g, ct)
  assert got[0].sharding.spec[:2] == P("data", "sp")[:2]
  assert_close(got, reference("token"))


def test_lasp2_auto_mesh_eager_and_presharded():
  mesh = sp_mesh(8, explicit=False)
  q, k, v, g, _ = make_inputs("head")
  want = reference("head")[0]
  eager = lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, chunk_size=CHUNK)
  assert rel_err(eager, want) < TOL
  sharded = [jax.device_put(x, NamedSharding(mesh, P(None, "sp", None, None))) for x in (q, k, v)]
  assert rel_err(lasp_jax.lasp2_attention(*sharded, g, mesh=mesh, chunk_size=CHUNK), want) < TOL


def test_lasp2_inside_set_mesh_with_grad():
  mesh = sp_mesh(4)
  q, k, v, g, ct = make_inputs("channel")
  with jax.set_mesh(mesh):  # mesh=None: the context mesh
    got = jax.jit(lambda *a: out_and_grads(
        functools.partial(lasp_jax.lasp2_attention, chunk_size=CHUNK), *a))(q, k, v, g, ct)
  assert_close(got, reference("channel"))


def test_lasp2_per_shard_in_user_shard_map():
  mesh = sp_mesh(8)
  q, k, v, g, _ = make_inputs("token")
  spec = P(None, "sp", None, None)
  fn = jax.shard_map(functools.partial(lasp_jax.lasp2, axis_name="sp", chunk_size=CHUNK),
                     mesh=mesh, in_specs=(spec, spec, spec, P(None, "sp", None)), out_specs=spec)
  with jax.set_mesh(mesh):
    args = [jax.reshard(x, s) for x, s in zip((q, k, v, g), (spec, spec, spec, P(None, "sp", None)))]
    o = jax.jit(fn)(*args)
  assert rel_err(o, reference("token")[0]) < TOL


@pytest.mark.parametrize("decay", ["none", "token"])
def test_lasp2_bfloat16(decay):
  mesh = sp_mesh(8)
  q, k, v, g, ct = make_inputs(decay)
  bf = lambda x: x.astype(jnp.bfloat16)
  o = lasp_jax.lasp2_attention(bf(q), bf(k), bf(v), g, mesh=mesh, chunk_size=CHUNK)
  assert o.dtype == jnp.bfloat16
  # Against the float64 recurrence on the bf16-rounded inputs: only the compute rounding remains.
  want = f64(lambda *a: linear_recurrence(*a)[0], bf(q), bf(k), bf(v), g)
  assert rel_err(o, want) < 2e-2


@pytest.mark.parametrize("op", ["lasp2", *(pytest.param(o, marks=pytest.mark.slow)
                                          for o in ("delta", "lasp2h", "conv"))])
def test_float16_is_accepted_and_computed_in_float32(op):
  # Issue 23: float16 was accepted without a word in the docstrings; it is part of the contract
  # (kernels.linear_attention's input contract): states in float32, outputs and gradients in
  # float16, here for the op, the delta rule, LASP-2H and the short conv under a mesh.
  mesh = sp_mesh(8)
  q, k, v, g, ct = make_inputs("token")
  h = lambda *a: [x.astype(jnp.float16) for x in a]
  k_unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(5), g.shape))
  fn, args = {
      "lasp2": (lambda q, k, v, g: lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh,
                                                            chunk_size=CHUNK), (q, k, v, g)),
      "delta": (lambda q, k, v, g, b: lasp_jax.lasp2_attention(q, k, v, g, beta=b, mesh=mesh,
                                                               chunk_size=CHUNK),
                (q, k_unit, v, g, beta)),
      "lasp2h": (lambda q, k, v: lasp_jax.lasp2h_attention(q, k, v, mesh=mesh),
                 (q, k, v[..., :DK])),
      "conv": (lambda x, w: lasp_jax.causal_conv1d(x, w, mesh=mesh), (v[..., 0, :], v[0, :4, 0])),
  }[op]
  # Against float32 on the float16-rounded inputs: only the output rounding remains.
  o = fn(*h(*args))
  want = fn(*[x.astype(jnp.float32) for x in h(*args)])
  assert o.dtype == jnp.float16
  assert rel_err(o, want) < 3e-3, rel_err(o, want)
  if op == "lasp2":
    grad = jax.jit(jax.grad(lambda q: jnp.sum(fn(q, *h(k, v, g)).astype(jnp.float32) * ct)))
    dq, dq32 = grad(*h(q)), grad(h(q)[0].astype(jnp.float32))
    assert dq.dtype == jnp.float16 and rel_err(dq, dq32) < 3e-3, rel_err(dq, dq32)


def test_lasp2_64k_tokens_strong_decay_is_finite_and_exact():
  # Cumulative log-decays reach about -7e4 here: any exp(cumsum) or division by a cumulative
  # product under/overflows; differences of direct sums do not.
  n = 65536
  mesh = sp_mesh(8)
  q, k, v, g, _ = make_inputs("token", b=1, n=n, h=1, dk=4, dv=4, strength=6.0)
  assert float(jnp.sum(g)) < -5e4
  o = lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, chunk_size=64)
  want = f64(lambda *a: linear_recurrence(*a)[0], q, k, v, g)
  assert np.all(np.isfinite(np.asarray(o)))
  assert rel_err(o, want) < TOL
  gc = make_inputs("channel", b=1, n=n, h=1, dk=4, dv=4, strength=6.0)[3]
  zz = [lasp_jax.zigzag(x, 8) for x in (q, k, v, gc)]
  o = lasp_jax.lasp2_attention(*zz, mesh=mesh, chunk_size=64, layout="zigzag")
  want = f64(lambda *a: linear_recurrence(*a)[0], q, k, v, gc)
  assert np.all(np.isfinite(np.asarray(o)))
  assert rel_err(lasp_jax.unzigzag(o, 8), want) < TOL


# --- communication --------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["none", "token"])
def test_lasp2_communication_does_not_grow_with_n(decay):
  w, b, h, dk, dv = 8, 2, 4, 16, 32
  mesh = sp_mesh(w)
  stats = []
  for n in (1024, 8192):
    x = jax.ShapeDtypeStruct((b, n, h, dk), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "sp", None, None)))
    vs = jax.ShapeDtypeStruct((b, n, h, dv), jnp.float32, sharding=x.sharding)
    args = [x, x, vs]
    if decay == "token":
      args.append(jax.ShapeDtypeStruct((b, n, h), jnp.float32,
                                       sharding=NamedSharding(mesh, P(None, "sp", None))))
    loss = lambda *a: jnp.sum(lasp_jax.lasp2_attention(*a, mesh=mesh, chunk_size=64) ** 2)
    stats.append(comm.summarize(comm.collective_stats(
        jax.grad(loss, argnums=tuple(range(len(args)))), *args, mesh=mesh)))
  assert stats[0] == stats[1], stats
  fwd, bwd = stats[0]["all-gather"], stats[0]["reduce-scatter"]
  assert set(stats[0]) == {"all-gather", "reduce-scatter"}
  assert fwd["count"] == 1 and bwd["count"] == 1
  state_bytes = w * b * h * dk * dv * 4
  extra = w * b * h * 4 if decay == "token" else 0  # each segment's (H,) total log-decay
  extra += w * b * h * (dv + 1) * 4                 # and its non-finite marks (design §13b)
  assert fwd["bytes"] == state_bytes + extra
  assert bwd["bytes"] == (state_bytes + extra) // w


# --- bad input -----------------------------------------------------------------------------------

def test_bad_inputs_raise_value_errors():
  mesh = sp_mesh(8)
  q, k, v, g, _ = make_inputs("token")
  cases = [
      (dict(mesh=mesh, chunk_size=64), "N=256"),                     # 256 % (8 * 64) != 0
      (dict(mesh=mesh, chunk_size=16, seq_axis="seq"), "'seq'"),
      (dict(mesh=mesh, chunk_size=16, batch_axis="data"), "'data'"),
      (dict(mesh=mesh, chunk_size=16, causal=False), "causal=False"),
      (dict(mesh=mesh, chunk_size=16, layout="ring"), "'ring'"),
      (dict(mesh=mesh, chunk_size=16, backend="cuda"), "'cuda'"),
  ]
  for kwargs, fragment in cases:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
      lasp_jax.lasp2_attention(q, k, v, g, **kwargs)
  with pytest.raises(ValueError, match="2 \\* axis size"):
    lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, chunk_size=32, layout="zigzag")
  with pytest.raises(ValueError, match="log_decay must have shape"):
    lasp_jax.lasp2_attention(q, k, v, g[:, :, :1], mesh=mesh, chunk_size=16)
  with pytest.raises(ValueError, match="log_decay must have shape"):
    lasp_jax.linear_attention(q, k, v, jnp.zeros((H + 1,)), chunk_size=16)
  with pytest.raises(ValueError, match="q and k"):
    lasp_jax.linear_attention(q, k[..., :4], v, chunk_size=16)
  with pytest.raises(ValueError, match="v must share"):
    lasp_jax.linear_attention(q, k, v[:, :128], chunk_size=16)
  with pytest.raises(ValueError, match="chunk_size=48"):
    lasp_jax.linear_attention(q, k, v, chunk_size=48)
  with pytest.raises(ValueError, match="initial_state"):
    lasp_jax.linear_attention(q, k, v, initial_state=jnp.zeros((B, H, DK, DK)), chunk_size=16)
  with pytest.raises(TypeError, match="int32"):
    lasp_jax.linear_attention(q.astype(jnp.int32), k, v, chunk_size=16)
  with pytest.raises(ValueError, match="shape \\(B, N, H, D\\)"):
    lasp_jax.linear_attention(q[0], k[0], v[0], chunk_size=16)


def test_auto_backend_falls_back_to_xla_where_no_kernel_applies():
  from lasp_jax.kernels.linear_attention import resolve_backend
  q, k, v, g, _ = make_inputs("token")
  assert resolve_backend("auto", q, v, g, CHUNK) == "xla"  # CPU: no Pallas lowering
  assert resolve_backend("gpu", q, v, g, CHUNK) == "gpu"   # explicit: kept (raises later if untileable)
  with pytest.raises(ValueError, match="'triton'"):
    resolve_backend("triton", q, v, g, CHUNK)


# --- extreme and non-finite inputs (issue 11) -----------------------------------------------------

# W = 4, N = 128, chunk 16: device (and zigzag segment) boundaries at multiples of 32 (16).
HARD_GATES = {32: -np.inf, 63: -np.inf, 53: -1e9, 79: -1e6, 95: -1e4, 100: -1e9}


def hard_gate_inputs(decay):
  """Mild gates, and a hard reset at a device's first token (32), a device's and chunk's last
  (63, 95), a chunk's last (79) and mid-chunk (53, 100); ``head``: ``(H,) = [-inf, -1e9, mild]``."""
  q, k, v, g, ct = make_inputs(decay, b=1, n=128, h=3, seed=3)
  if decay == "head":
    return q, k, v, jnp.asarray([-jnp.inf, -1e9, -0.3]), ct
  for t, val in HARD_GATES.items():
    g = g.at[:, t].set(val) if decay == "token" else g.at[:, t, :, ::2].set(val)
  return q, k, v, g, ct


@pytest.mark.parametrize("decay, layout", [
    ("token", "zigzag"), ("head", "contiguous"), ("channel", "contiguous"),
    *(pytest.param(d, l, marks=pytest.mark.slow)
      for d, l in (("head", "zigzag"), ("token", "contiguous"), ("channel", "zigzag")))])
def test_lasp2_hard_reset_gates_are_exact(decay, layout):
  """-inf resets inside and at the edges of segments give exact zeros (no NaN) and very negative
  gates stay exact to float32, forward and gradients (dg = 0 at -inf, its exact value)."""
  w = 4
  mesh = sp_mesh(w)
  q, k, v, g, ct = hard_gate_inputs(decay)
  want = f64(lambda q, k, v, g, ct: out_and_grads(
      lambda *a: linear_recurrence(*a)[0], q, k, v, g, ct), q, k, v, g, ct)
  fn = jax.jit(lambda *a: out_and_grads(functools.partial(
      lasp_jax.lasp2_attention, mesh=mesh, chunk_size=CHUNK, layout=layout), *a))
  if layout == "contiguous":
    got = fn(q, k, v, g, ct)
  else:  # permute outside the jitted program (zigzag inside jit(grad) compiles for minutes)
    zz = lambda x: x if x.ndim < 3 else lasp_jax.zigzag(x, w)   # noqa: E731
    un = lambda x: x if x.ndim < 3 else lasp_jax.unzigzag(x, w)  # noqa: E731
    o, grads = fn(*(zz(x) for x in (q, k, v, g, ct)))
    got = (un(o), [un(x) for x in grads])
  assert np.all(np.isfinite(np.asarray(got[0])))
  assert_close(got, want, what=f"{decay} {layout}")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_lasp2_nan_in_a_later_segment_never_reaches_earlier_outputs(layout):
  """A NaN at token 60 of 64 (W = 8) in q, k, v or the decay: outputs 0..59 exact, 60 not finite.
  Earlier segments' incoming states select, not weight by 0, the later segments' states."""
  w, n, t = 8, 64, 60
  mesh = sp_mesh(w)
  chunk = 8 if layout == "contiguous" else 4
  q, k, v, g, _ = make_inputs("token", b=1, n=n, h=1, seed=4)
  o_ref = f64(lambda *a: linear_recurrence(*a)[0], q, k, v, g)
  zz = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.zigzag(x, w))
  un = (lambda x: x) if layout == "contiguous" else (lambda x: lasp_jax.unzigzag(x, w))
  for name in "qkvg":
    args = dict(q=q, k=k, v=v, g=g)
    args[name] = args[name].at[:, t].set(jnp.nan)
    o = lasp_jax.lasp2_attention(*(zz(args[x]) for x in "qkvg"), mesh=mesh, chunk_size=chunk,
                                 layout=layout)
    o = np.asarray(un(o), np.float64)
    assert np.all(np.isfinite(o[:, :t])), f"NaN in {name} reached earlier outputs"
    assert rel_err(o[:, :t], o_ref[:, :t]) < TOL, name
    assert not np.any(np.isfinite(o[:, t])), name


def test_bad_chunk_size_scale_decay_and_float64_are_refused():
  mesh = sp_mesh(8)
  q, k, v, g, _ = make_inputs("token")
  per_shard = jax.shard_map(
      lambda q, k, v: lasp_jax.lasp2(q, k, v, axis_name="sp", chunk_size=0),
      mesh=sp_mesh(8, explicit=False), in_specs=(P(None, "sp", None, None),) * 3,
      out_specs=P(None, "sp", None, None))
  ops = {"linear_attention": functools.partial(lasp_jax.linear_attention, q, k, v, g),
         "lasp2_attention": functools.partial(lasp_jax.lasp2_attention, q, k, v, g, mesh=mesh)}
  for chunk in (0, -16, True):
    for name, op in ops.items():
      with pytest.raises(ValueError, match="chunk_size"):
        op(chunk_size=chunk)
  with pytest.raises(ValueError, match="chunk_size"):
    per_shard(q, k, v)
  for name, op in ops.items():
    with pytest.raises(TypeError, match="scale"):
      op(chunk_size=16, scale="0.5")
  with pytest.raises(ValueError, match=r"max 0\.75 at index \(1, 7, 0\)"):
    lasp_jax.lasp2_attention(q, k, v, g.at[1, 7, 0].set(0.75), mesh=mesh, chunk_size=16)
  with jax.enable_x64(True):
    q64 = jnp.asarray(np.asarray(q), jnp.float64)
    for fn in (lasp_jax.linear_attention, functools.partial(lasp_jax.lasp2_attention, mesh=mesh)):
      with pytest.raises(TypeError, match="float64"):
        fn(q64, k, v, chunk_size=16)


def test_scale_none_is_dk_to_the_minus_half_as_in_lasp2h():
  mesh = sp_mesh(8)
  q, k, v, g, _ = make_inputs("token", b=1, n=128)
  want = f64(lambda *a: linear_recurrence(*a, scale=DK ** -0.5)[0], q, k, v, g)
  assert rel_err(lasp_jax.linear_attention(q, k, v, g, scale=None, chunk_size=CHUNK), want) < TOL
  assert rel_err(lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, scale=None, chunk_size=CHUNK),
                 want) < TOL


@pytest.mark.parametrize("decay", ["token", pytest.param("channel", marks=pytest.mark.slow)])
def test_check_log_decay_under_checkify_with_the_readme_mesh(decay):
  # Issue 23: checkify + check_log_decay on jax.make_mesh((8,), ("sp",)) was a ShardingTypeError
  # under both wrappings: the check flattened and indexed a sequence-sharded decay, and err.get()
  # indexes the per-device errors checkify returns after a shard_map (documented: device_get).
  from jax.experimental import checkify
  from lasp_jax.kernels.linear_attention import check_log_decay
  mesh = jax.make_mesh((8,), ("sp",))
  q, k, v, g, _ = make_inputs(decay, n=128)
  index = (1, 77, 1) + ((3,) if decay == "channel" else ())
  bad = g.at[index].set(0.75)

  def f(q, k, v, g):
    check_log_decay(g)
    return lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh, chunk_size=16)

  placed = lambda *a: [jax.device_put(x, NamedSharding(mesh, P(None, "sp"))) for x in a]
  for checked in (checkify.checkify(jax.jit(f)), jax.jit(checkify.checkify(f))):
    for good_args, bad_args in (([q, k, v, g], [q, k, v, bad]), (placed(q, k, v, g),
                                                                  placed(q, k, v, bad))):
      err, o = checked(*good_args)
      assert jax.device_get(err).get() is None
      assert np.all(np.isfinite(np.asarray(o)))
      err, _ = checked(*bad_args)
      with pytest.raises(Exception, match=rf"max 0\.75 at index \({', '.join(map(str, index))}\)"):
        jax.device_get(err).throw()
