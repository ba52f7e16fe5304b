"""Pallas linear-attention kernels (TPU-style, GPU-style; interpret mode) vs the float64 recurrence.

Shapes are tiny but always span several chunks, so the triangular mask inside each tile, the state
carried between tiles and the reversed walk of the backward pass all matter.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax import kernels
from lasp_jax.kernels.linear_attention import pallas_gpu, pallas_tpu
from tests.kernels.race import races_per_call
from tests.references import f64, linear_recurrence, rel_err

# GPU tiles need powers of two >= 16; TPU tiles need head dims that are multiples of 128.
HEAD_DIM = {"gpu": 32, "tpu": 128}


def _data(seed, bsz, n, h, dk, dv, decay, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((bsz, n, h, dk)) * dk ** -0.5
  k = rng.standard_normal((bsz, n, h, dk)) * dk ** -0.5
  v = rng.standard_normal((bsz, n, h, dv))
  s0 = rng.standard_normal((bsz, h, dk, dv)) * 0.5
  g = {"none": None,
       "head": -rng.uniform(0.05, 0.5, (h,)),
       "token": np.log(rng.uniform(0.3, 1.0, (bsz, n, h)))}[decay]
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
  return cast(q), cast(k), cast(v), (None if g is None else jnp.asarray(g, jnp.float32)), \
      jnp.asarray(s0, jnp.float32)


def _loss(fn, weights):
  """A scalar that touches every output and the final state with distinct weights."""
  w_o, w_s = weights

  def loss(q, k, v, g, s0):
    o, s = fn(q, k, v, g, s0)
    return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)
  return loss


def _square_features_ref(x):
  """``vec(x x^T)``: entry ``a * D + b`` is ``x_a x_b``."""
  return jnp.einsum("...a,...b->...ab", x, x).reshape(*x.shape[:-1], -1)


def _check(backend, q, k, v, g, s0, chunk, tol, segment_ids=None, scores="dot"):
  scale = 0.8

  def kernel(q, k, v, g, s0):
    return kernels.chunk_linear_attention(q, k, v, g, scale=scale, initial_state=s0,
                                          segment_ids=segment_ids, chunk_size=chunk,
                                          backend=backend, interpret=True, scores=scores)

  def ref(q, k, v, g, s0):
    if scores == "square":  # the recurrence over the features
      q, k = _square_features_ref(q), _square_features_ref(k)
    return linear_recurrence(q, k, v, g, scale=scale, initial_state=s0, segment_ids=segment_ids)

  rng = np.random.default_rng(1)
  weights = (rng.standard_normal(v.shape), rng.standard_normal(s0.shape))
  argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
  o, s = kernel(q, k, v, g, s0)
  grads = jax.grad(_loss(kernel, weights), argnums=argnums)(q, k, v, g, s0)
  o_ref, s_ref = f64(ref, q, k, v, g, s0)
  grads_ref = f64(lambda *a: jax.grad(_loss(ref, weights), argnums=argnums)(*a), q, k, v, g, s0)

  assert o.dtype == q.dtype and s.dtype == jnp.float32
  names = ["o", "final_state"] + [["dq", "dk", "dv", "dg", "ds0"][i] for i in argnums]
  for name, got, want in zip(names, (o, s, *grads), (o_ref, s_ref, *grads_ref)):
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), name
    assert got.shape == want.shape, name
    assert rel_err(got, want) < tol, (name, rel_err(got, want))


@pytest.mark.parametrize("backend,decay,chunk,n", [
    ("gpu", "none", 16, 64),
    # The per-head decay's own cases: packed documents and the bf16 gradient (gpu), hard resets
    # (tpu) run by default; these are slow.
    pytest.param("gpu", "head", 32, 96, marks=pytest.mark.slow),
    pytest.param("gpu", "token", 16, 64, marks=pytest.mark.slow),
    ("tpu", "none", 16, 48),
    pytest.param("tpu", "head", 8, 32, marks=pytest.mark.slow),
    pytest.param("tpu", "token", 16, 48, marks=pytest.mark.slow),
])
def test_float32_forward_state_and_grads(backend, decay, chunk, n):
  d = HEAD_DIM[backend]
  bsz, heads = {"none": (2, 1), "head": (1, 2), "token": (1, 1)}[decay]
  _check(backend, *_data(0, bsz, n, heads, d, d, decay), chunk, 2e-4)


def test_square_scores_match_the_recurrence_over_the_features():
  """``scores="square"``: q, k F wide, the state over ``vec(k k^T)``, against the float64
  recurrence over the F^2 features: output, final state and every gradient (q, k at F wide),
  across chunk boundaries, with a per-token decay, the initial state and two documents per row
  (the second starting inside a chunk, and at a chunk boundary)."""
  bsz, n, h, f, dv = 2, 32, 2, 4, 3
  q, k, v, g, _ = _data(5, bsz, n, h, f, dv, "token")
  s0 = jnp.asarray(np.random.default_rng(6).standard_normal((bsz, h, f * f, dv)) * 0.5,
                   jnp.float32)
  ids = jnp.asarray(np.stack([np.arange(n) >= 11, np.arange(n) >= 16]), jnp.int32)
  _check("xla", q, k, v, g, s0, 8, 2e-4, segment_ids=ids, scores="square")


def test_square_scores_refuse_what_they_cannot_run():
  q, k, v, _, _ = _data(0, 1, 16, 1, 4, 4, "none")
  for backend in ("gpu", "tpu"):
    with pytest.raises(ValueError, match="scores='square'"):
      kernels.chunk_linear_attention(q, k, v, chunk_size=8, backend=backend, scores="square")
  with pytest.raises(ValueError, match="scores='square'"):
    kernels.chunk_linear_attention(q, k, v, jnp.zeros((1, 16, 1, 4)), chunk_size=8,
                                   scores="square")
  with pytest.raises(ValueError, match="Dk \\* Dk"):
    kernels.chunk_linear_attention(q, k, v, initial_state=jnp.zeros((1, 1, 4, 4)), chunk_size=8,
                                   scores="square")
  with pytest.raises(ValueError, match="scores must be one of"):
    kernels.chunk_linear_attention(q, k, v, chunk_size=8, scores="squared")
  with pytest.raises(ValueError, match="beta=None"):
    kernels.chunk_linear_attention(q, k, v, beta=jnp.ones((1, 16, 1)), chunk_size=8,
                                   scores="square")
  # None and "auto" resolve to the XLA path (the default device's kernels cannot run it).
  o, s = kernels.chunk_linear_attention(q, k, v, chunk_size=8, scores="square")
  assert s.shape == (1, 1, 16, 4)
  assert kernels.linear_attention.resolve_backend("auto", q, v, scores="square") == "xla"


# Slow: the default run's bf16 decay cases are test_bfloat16_head_decay_gradient (GPU) and
# test_tpu_bfloat16_head_decay_gradient_over_a_long_row (TPU), through the same kernels.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) for b in ("gpu", "tpu")])
def test_bfloat16_token_decay(backend):
  d = HEAD_DIM[backend]
  _check(backend, *_data(2, 1, 64, 1, d, d, "token", jnp.bfloat16), 16, 3e-2)


def _bf16_head_decay_dg_error(backend, n, d, heads):
  """Relative error of the (H,) decay's gradient from bf16 inputs (chunk 64) against the float64
  recurrence: two heads of gates ``[-0.01, -0.1]`` drawn, ``heads`` of them kept."""
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.standard_normal((1, n, 2, d)) * s, jnp.bfloat16)[:, :, heads]
             for s in (d ** -0.5, d ** -0.5, 1.0))
  g = jnp.asarray([-0.01, -0.1], jnp.float32)[heads]
  w = jnp.asarray(rng.standard_normal((1, n, 2, d)))[:, :, heads]

  def loss(fn):
    return lambda q, k, v, g: jnp.sum(fn(q, k, v, g)[0].astype(jnp.float32) * w)

  kernel = functools.partial(kernels.chunk_linear_attention, chunk_size=64, backend=backend,
                             interpret=True)
  dg = jax.grad(loss(kernel), argnums=3)(q, k, v, g)
  want = f64(lambda *a: jax.grad(loss(linear_recurrence), argnums=3)(*a), q, k, v, g)
  return rel_err(np.asarray(dg, np.float64), want)


def test_bfloat16_head_decay_gradient():
  """The (H,) decay's gradient sums dL/dB over every token, which cancels: built as a suffix sum
  of q.dq - k.dk from bf16 operands it was 4.5e-2 off here (1.6e-1 on an H200 at N 8192); the
  chunk-local flux form (``_pallas_common.decay_grad_flux``) gives 1.1e-2 (the XLA path 5.6e-3:
  what is left is the bf16 rounding of the kernels' dot operands)."""
  assert _bf16_head_decay_dg_error("gpu", 512, 64, slice(None)) < 2e-2


def test_tpu_bfloat16_head_decay_gradient_over_a_long_row():
  """The TPU kernels' (H,) decay gradient at N = 4096 from bf16 inputs (a gate of -0.1): as the
  suffix sum of q.dq - k.dk over the row it was 0.21 off here; from the chunk-local sums (column
  sums of P and the flux per chunk, ``_pallas_common.dkv_chunk_lanes``) 4.4e-3. (With a second
  head of gate -0.01: 2.5e-2 before, 1.6e-3 after, the GPU kernels 5.9e-3, the XLA path 6.5e-3.)"""
  assert _bf16_head_decay_dg_error("tpu", 4096, 128, slice(1, 2)) < 1e-2


def test_gpu_split_backward_and_channel_blocks_are_exact():
  """Dk/Dv split over two programs each, dk and dv from separate kernels."""
  q, k, v, g, s0 = _data(3, 1, 64, 1, 32, 32, "token")
  bs = pallas_gpu.BlockSizes(chunk_size=16, block_k=16, block_v=16, split_backward=True)

  def fn(q, k, v, g, s0):
    return pallas_gpu.chunk_linear_attention_gpu(q, k, v, g, initial_state=s0, block_sizes=bs,
                                                 interpret=True)
  weights = (np.cos(np.arange(v.size)).reshape(v.shape), np.ones(s0.shape))
  got = jax.grad(_loss(fn, weights), argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)
  want = f64(lambda *a: jax.grad(_loss(lambda q, k, v, g, s0: linear_recurrence(
      q, k, v, g, initial_state=s0), weights), argnums=(0, 1, 2, 3, 4))(*a), q, k, v, g, s0)
  for a, b in zip(got, want):
    assert rel_err(a, b) < 2e-4


def test_interpret_defaults_to_cpu_and_per_channel_decay_uses_xla():
  q, k, v, _, _ = _data(4, 1, 32, 1, 16, 16, "none")
  o, s = kernels.chunk_linear_attention(q, k, v, chunk_size=16, backend="gpu")  # interpret=None
  o_ref, s_ref = f64(linear_recurrence, q, k, v)
  assert rel_err(o, o_ref) < 2e-4 and rel_err(s, s_ref) < 2e-4
  g4 = jnp.asarray(np.log(np.random.default_rng(5).uniform(0.5, 1.0, (1, 32, 1, 16))), jnp.float32)
  for backend in ("gpu", "tpu"):
    o, s = kernels.chunk_linear_attention(q, k, v, g4, chunk_size=16, backend=backend)
    o_ref, s_ref = f64(linear_recurrence, q, k, v, g4)
    assert rel_err(o, o_ref) < 2e-4 and rel_err(s, s_ref) < 2e-4


@pytest.mark.parametrize("backend,dk,dv,chunk,n,dtype,match", [
    ("gpu", 32, 32, 16, 40, jnp.float32, "multiple of chunk_size"),
    ("tpu", 128, 128, 16, 40, jnp.float32, "multiple of chunk_size"),
    ("gpu", 24, 32, 16, 32, jnp.float32, "Dk to be a power of two >= 16.*got 24"),
    ("gpu", 32, 48, 16, 32, jnp.float32, "Dv to be a power of two >= 16.*got 48"),
    ("gpu", 32, 32, 8, 32, jnp.float32, "chunk_size to be a power of two >= 16.*got 8"),
    ("tpu", 128, 128, 12, 36, jnp.float32, "multiple of 8 for float32"),
    ("tpu", 128, 128, 8, 32, jnp.bfloat16, "multiple of 16 for bfloat16"),
])
def test_bad_shapes_raise_value_error(backend, dk, dv, chunk, n, dtype, match):
  q = jnp.zeros((1, n, 1, dk), dtype)
  v = jnp.zeros((1, n, 1, dv), dtype)
  with pytest.raises(ValueError, match=match):
    kernels.chunk_linear_attention(q, q, v, chunk_size=chunk, backend=backend, interpret=True)


def test_mixed_dtypes_raise_type_error():
  q = jnp.zeros((1, 32, 1, 32), jnp.float32)
  with pytest.raises(TypeError, match="all float32 or all bfloat16"):
    kernels.chunk_linear_attention(q, q, q.astype(jnp.bfloat16), chunk_size=16, backend="gpu")


def _abstract_device(backend):
  """JAX 0.11's Triton lowering asks the (abstract) device for its compute capability."""
  if backend != "gpu":
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("backend,platform,target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_for_the_real_hardware(backend, platform, target):
  """Cross-lowers fwd+bwd (bf16, per-token decay, the benchmark's head dim) for the device: this
  runs the Triton / Mosaic lowering of every kernel, which interpret mode never touches."""
  mod = pallas_gpu if backend == "gpu" else pallas_tpu
  entry = getattr(mod, f"chunk_linear_attention_{backend}")
  sds = jax.ShapeDtypeStruct

  def step(q, k, v, g, s0):
    def loss(q, k, v, g, s0):
      o, s = entry(q, k, v, g, initial_state=s0)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
    # value_and_grad: the gradient alone needs no forward kernel (XLA would drop it).
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)

  x = sds((2, 256, 2, 128), jnp.bfloat16)
  with _abstract_device(backend):
    exported = jax.export.export(
        jax.jit(step), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
            x, x, x, sds((2, 256, 2), jnp.float32), sds((2, 2, 128, 128), jnp.float32))
  assert exported.mlir_module().count(target.split("$")[-1]) >= 3   # fwd, dq, dkv


@pytest.mark.parametrize("dk, dv", [
    pytest.param(64, 128, marks=pytest.mark.slow), pytest.param(128, 96, marks=pytest.mark.slow),
    (16, 40)])
def test_tpu_head_dims_off_the_lane_tiling(dk, dv):
  """Head dims that are not multiples of 128 (zero-padded to one, exact) on the TPU kernels:
  forward, final state and every gradient against the float64 recurrence."""
  q, k, v, g, s0 = _data(12, 1, 32, 2, dk, dv, "token")
  _check("tpu", q, k, v, g, s0, 16, 2e-4)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_lasp2_with_pallas_backend_matches_recurrence(backend):
  """lasp2_attention(backend=...) on 4 simulated devices: kernels in interpret mode in shard_map."""
  from lasp_jax import lasp2_attention
  d = HEAD_DIM[backend]
  q, k, v, g, _ = _data(6, 1, 128, 1, d, d, "token")
  mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
  with jax.set_mesh(mesh):
    o = lasp2_attention(q, k, v, g, mesh=mesh, chunk_size=16, backend=backend)
  o_ref, _ = f64(linear_recurrence, q, k, v, g)
  assert rel_err(o, o_ref) < 2e-4


def test_benchmark_smoke(tmp_path):
  """benchmarks/kernels.py at toy size on CPU (XLA path + GPU-style kernels in interpret mode),
  the delta rule's rows included."""
  import json

  from benchmarks import kernels as bench
  out = tmp_path / "kernels.json"
  bench.main(["--small", "--shape", "1,64,1,32,32", "--chunk", "16", "--iters", "1",
              "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert {r["impl"] for r in rows} == {"pallas", "xla", "delta-pallas", "delta-auto", "delta-xla"}
  for r in rows:
    assert "error" not in r and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["fwd_gbs"] > 0


def test_gpu_rejects_arrays_past_int32_offsets():
  x = jax.ShapeDtypeStruct((16, 1 << 20, 8, 128), jnp.bfloat16)   # 2**34 elements, never allocated
  with pytest.raises(ValueError, match="int32 offsets"):
    pallas_gpu.check_shapes(x, x, pallas_gpu.DEFAULT_BLOCK_SIZES)


def test_tpu_kernels_under_tpu_semantics_interpreter(monkeypatch):
  """pltpu.InterpretParams simulates Mosaic's pipelining: output blocks are written back only when
  their index changes, scratch persists across the sequential chunk axis. Races are detected."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v, g, s0 = _data(7, 1, 32, 2, 128, 128, "token")
  bs = pallas_tpu.BlockSizes(chunk_size=16)

  def fn(q, k, v, g, s0):
    return pallas_tpu.chunk_linear_attention_tpu(
        q, k, v, g, initial_state=s0, block_sizes=bs,
        interpret=pltpu.InterpretParams(detect_races=True))
  weights = (np.cos(np.arange(v.size)).reshape(v.shape), np.ones(s0.shape))
  all_args = (0, 1, 2, 3, 4)
  with races_per_call(monkeypatch) as races:   # every kernel call checked (tests/kernels/race.py)
    got = (*fn(q, k, v, g, s0), *jax.grad(_loss(fn, weights), argnums=all_args)(q, k, v, g, s0))
  ref = lambda q, k, v, g, s0: linear_recurrence(q, k, v, g, initial_state=s0)  # noqa: E731
  want = (*f64(ref, q, k, v, g, s0),
          *f64(lambda *a: jax.grad(_loss(ref, weights), argnums=all_args)(*a), q, k, v, g, s0))
  for a, b in zip(got, want):   # uninitialised memory reads as NaN in this interpreter
    assert np.all(np.isfinite(np.asarray(a))) and rel_err(a, b) < 2e-4
  assert len(races) >= 4 and not any(races), races   # fwd, then fwd, dq, dkv of the gradient


# --- packed documents (issue 12) -----------------------------------------------------------------

# Document starts (chunk 16, N = 64): at a chunk's first token (16, 48), one before and after a
# chunk edge (31, 33), documents of 1, 2 and 3 tokens (20, 21, 23, 26); ids reused (mod 2).
DOC_STARTS = (16, 20, 21, 23, 26, 31, 33, 48)


# Segment ids turn "none" into a per-token decay inside the kernels: the "none" case is slow.
@pytest.mark.parametrize("backend, decay", [
    ("xla", "token"), ("gpu", "token"), ("tpu", "token"),
    *(pytest.param(b, d, marks=pytest.mark.slow) for b, d in (
        ("xla", "none"), ("gpu", "none"), ("tpu", "none"), ("xla", "head"), ("gpu", "head"),
        ("tpu", "head")))])
def test_packed_documents_restart_the_state(backend, decay):
  """Segment ids in the kernels: the state restarts at every start (in-chunk mask causal and
  same-document, carried state reset), the initial state feeds only the first document; forward,
  final state and gradients against the float64 recurrence with resets."""
  d = HEAD_DIM.get(backend, 16)
  data = _data(11, 2, 64, 2, d, d, decay)
  starts = np.zeros((2, 64), np.int32)
  starts[0, list(DOC_STARTS)] = 1
  starts[1, 40] = 1                                  # row 1: two long documents
  ids = jnp.asarray(np.cumsum(starts, axis=1) % 2)
  _check(backend, *data, 16, 2e-4, segment_ids=ids)


# --- extreme and non-finite inputs (issue 11) -----------------------------------------------------

# A "hard reset" gate at a chunk's first token, its last and one in the middle (chunk 16, N = 64).
RESET_TOKENS = (16, 31, 37)
HARD_GATES = {"-inf": -np.inf, "-1e9": -1e9, "-1e6": -1e6, "-1e4": -1e4}


def _hard_gate_data(backend, gate, form):
  """Mild gates everywhere and ``gate`` at RESET_TOKENS (``token``, ``channel``: half the key
  channels), or a per-head ``(H,)`` decay of ``[gate, -1e9, mild]``."""
  d = HEAD_DIM.get(backend, 16)
  heads = 3 if form == "head" else 1
  q, k, v, g, s0 = _data(8, 1, 64, heads, d, d, "token" if form == "token" else "none")
  if form == "head":
    return q, k, v, jnp.asarray([HARD_GATES[gate], -1e9, -0.3], jnp.float32), s0
  if form == "channel":
    g = jnp.asarray(np.log(np.random.default_rng(9).uniform(0.3, 1.0, (1, 64, 1, d))), jnp.float32)
    return q, k, v, g.at[:, RESET_TOKENS, :, : d // 2].set(HARD_GATES[gate]), s0
  return q, k, v, g.at[:, RESET_TOKENS].set(HARD_GATES[gate]), s0


@pytest.mark.parametrize("backend, gate", [
    (b, g) if g == "-inf" or (g, b) == ("-1e9", "xla")
    else pytest.param(b, g, marks=pytest.mark.slow)
    for b in ("xla", "gpu", "tpu") for g in HARD_GATES])
def test_hard_reset_gate_is_exact(backend, gate):
  """Very negative log-decays are exact (no cancellation of in-chunk prefix sums), -inf is an exact
  reset (no NaN), forward, final state and gradients (dg = 0 at -inf, its exact value)."""
  _check(backend, *_hard_gate_data(backend, gate, "token"), 16, 2e-4)


@pytest.mark.parametrize("backend", [
    "xla", *(pytest.param(b, marks=pytest.mark.slow) for b in ("gpu", "tpu"))])
def test_hard_reset_per_head_decay_is_exact(backend):
  """An (H,) decay of -inf resets at every token (only k_i^T v_i survives): no NaN anywhere."""
  _check(backend, *_hard_gate_data(backend, "-inf", "head"), 16, 2e-4)


@pytest.mark.parametrize("gate", list(HARD_GATES))
def test_hard_reset_per_channel_decay_is_exact(gate):
  """The per-channel (GLA) decay goes to the XLA path, with its own (c, c, Dk) weights."""
  _check("xla", *_hard_gate_data("xla", gate, "channel"), 16, 2e-4)


@pytest.mark.parametrize("backend", ["xla", "gpu", "tpu"])
def test_nonfinite_input_never_reaches_earlier_positions(backend):
  """A NaN (or inf) in q, k, v or the decay at token t leaves every output before t exact (masks
  select; a zero weight times a NaN is NaN) and shows as non-finite at t."""
  d = HEAD_DIM.get(backend, 16)
  t = 37
  q, k, v, g, _ = _data(10, 1, 64, 1, d, d, "token")
  o_ref = f64(lambda *a: linear_recurrence(*a)[0], q, k, v, g)
  for name, bad in (("q", np.nan), ("k", np.nan), ("v", np.nan), ("v", np.inf), ("g", np.nan)):
    args = dict(q=q, k=k, v=v, g=g)
    args[name] = args[name].at[:, t].set(bad)
    o = np.asarray(kernels.chunk_linear_attention(
        args["q"], args["k"], args["v"], args["g"], chunk_size=16, backend=backend,
        interpret=True)[0], np.float64)
    assert np.all(np.isfinite(o[:, :t])), (name, bad)
    assert rel_err(o[:, :t], o_ref[:, :t]) < 2e-4, (name, bad)
    assert not np.any(np.isfinite(o[:, t])), (name, bad)


def test_positive_log_decay_is_a_value_error_and_checkify_catches_it_under_jit():
  from jax.experimental import checkify
  q, k, v, g, _ = _data(11, 1, 32, 2, 16, 16, "token")
  bad = g.at[0, 5, 1].set(0.75)         # the decay, not its log
  for backend in ("xla", "gpu"):
    with pytest.raises(ValueError, match=r"max 0\.75 at index \(0, 5, 1\)"):
      kernels.chunk_linear_attention(q, k, v, bad, chunk_size=16, backend=backend)
  with pytest.raises(ValueError, match=r"max 0\.5 at index \(1,\)"):
    kernels.chunk_linear_attention(q, k, v, jnp.asarray([-0.1, 0.5]), chunk_size=16)

  from lasp_jax.kernels.linear_attention import check_log_decay

  def f(q, k, v, g):
    check_log_decay(g)
    return kernels.chunk_linear_attention(q, k, v, g, chunk_size=16, backend="xla")[0]
  checked = checkify.checkify(jax.jit(f))
  err, _ = checked(q, k, v, bad)
  assert "max 0.75 at index (0, 5, 1)" in err.get()
  err, o = checked(q, k, v, g.at[0, 7, 0].set(-jnp.inf))
  assert err.get() is None and np.all(np.isfinite(np.asarray(o)))


@pytest.mark.parametrize("backend", ["xla", "gpu"])
def test_scale_none_is_dk_to_the_minus_half_and_bad_scale_is_a_type_error(backend):
  """scale=None means Dk ** -0.5, as in LASP-2H; the default stays 1.0 (design §2)."""
  q, k, v, g, _ = _data(12, 1, 32, 1, 32, 32, "token")
  run = functools.partial(kernels.chunk_linear_attention, q, k, v, g, chunk_size=16,
                          backend=backend, interpret=True)
  o_none, o_ref = run(scale=None)[0], f64(
      lambda *a: linear_recurrence(*a, scale=32 ** -0.5)[0], q, k, v, g)
  assert rel_err(o_none, o_ref) < 2e-4
  for bad in ("0.5", [0.5], True):
    with pytest.raises(TypeError, match="scale"):
      run(scale=bad)


def test_float64_and_bad_chunk_size_are_refused():
  q, k, v, _, _ = _data(13, 1, 32, 1, 16, 16, "none")
  with jax.enable_x64(True):
    q64 = jnp.asarray(np.asarray(q), jnp.float64)
    with pytest.raises(TypeError, match="q has dtype float64.*float32 or bfloat16"):
      kernels.chunk_linear_attention(q64, q64, q64, chunk_size=16, backend="xla")
  for chunk in (0, -16, 16.0, True):
    with pytest.raises(ValueError, match="chunk_size"):
      kernels.chunk_linear_attention(q, k, v, chunk_size=chunk, backend="xla")


# --- non-finite inputs in the backward pass, across resets (issue 23, item 7) --------------------

# Documents [0, 20), [20, 44), [44, 64) (chunk 16: both starts inside a chunk); the middle one
# holds a NaN in q (token 24), k (28), v (33) and the gate (38).
NAN_DOC, NAN_AT = (20, 44), {"q": 24, "k": 28, "v": 33, "g": 38}


@functools.lru_cache(maxsize=None)
def _op_and_ref(backend, starts=()):
  """The kernel and the float64 recurrence, documents starting at ``starts`` (one function object
  per case, so that the jitted ``_outputs_and_vjp`` compiles once per case)."""
  ids = jnp.asarray(np.searchsorted(starts, np.arange(64), side="right")[None]) if starts else None

  def kernel(q, k, v, g, s0):
    return kernels.chunk_linear_attention(q, k, v, g, scale=0.8, initial_state=s0,
                                          segment_ids=ids, chunk_size=16, backend=backend,
                                          interpret=True)

  def ref(q, k, v, g, s0):
    return linear_recurrence(q, k, v, g, scale=0.8, initial_state=s0, segment_ids=ids)
  return kernel, ref


@functools.partial(jax.jit, static_argnums=0)
def _outputs_and_vjp(fn, *a):
  """``fn(*a[:5])`` and its pullback of the cotangents ``a[5:]``."""
  out, pullback = jax.vjp(fn, *a[:5])
  return out, pullback(tuple(a[5:]))


def _vjp_both(backend, args, cts, starts=()):
  """``((o, s_final), (dq, dk, dv, dg, ds0))`` of the kernel and of the float64 recurrence on the
  same inputs with every NaN replaced by 0, for cotangents ``cts = (do, ds_final)`` (NaN
  cotangents also 0 for the reference)."""
  kernel, ref = _op_and_ref(backend, starts)
  clean = lambda xs: [jnp.where(jnp.isnan(x), 0.0, x) for x in xs]  # noqa: E731
  return (_outputs_and_vjp(kernel, *args, *cts),
          f64(_outputs_and_vjp, ref, *clean(args), *clean(cts)))


def _assert_exact(name, got, want, rows=slice(None)):
  got = np.asarray(got, np.float64)[:, rows]
  want = np.asarray(want)[:, rows]
  assert np.all(np.isfinite(got)), f"{name}: a NaN reached it"
  assert rel_err(got, want) < 2e-4, (name, rel_err(got, want))


@pytest.mark.parametrize("reset", ["segment_ids", "-inf gate"])
@pytest.mark.parametrize("backend", ["xla", "gpu", "tpu"])
def test_nan_in_a_document_stays_in_it_forward_and_backward(backend, reset):
  """A NaN in one document's q, k, v and gate, and NaN cotangents on its non-finite outputs (what
  a masked loss behind a norm hands back): the other documents' outputs, final state and every
  gradient (dq, dk, dv, dg, d initial_state) stay finite and equal the float64 recurrence's
  without the NaN (a reset is an exact zero: nothing crosses it, in either direction). Was: NaN
  in every later document's outputs and every earlier one's gradients (0 * NaN at the reset)."""
  d = HEAD_DIM.get(backend, 16)
  q, k, v, g, s0 = _data(14, 1, 64, 1, d, d, "token")
  starts = NAN_DOC if reset == "segment_ids" else ()
  if not starts:
    g = g.at[:, list(NAN_DOC)].set(-jnp.inf)
  args = dict(q=q, k=k, v=v, g=g)
  for name, t in NAN_AT.items():
    args[name] = args[name].at[:, t].set(jnp.nan)
  rng = np.random.default_rng(15)
  do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32).at[:, NAN_AT["q"]:NAN_DOC[1]].set(
      jnp.nan)
  ds = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)
  ((o, s), grads), ((o_ref, s_ref), grads_ref) = _vjp_both(
      backend, (args["q"], args["k"], args["v"], args["g"], s0), (do, ds), starts)
  before, after = slice(0, NAN_DOC[0]), slice(NAN_DOC[1], None)
  for name, got, want in zip(("o", "dq", "dk", "dv", "dg"), (o, *grads[:4]),
                             (o_ref, *grads_ref[:4])):
    _assert_exact(f"{name} (earlier document)", got, want, before)
    _assert_exact(f"{name} (later document)", got, want, after)
  _assert_exact("final state", s, s_ref)
  _assert_exact("d initial_state", grads[4], grads_ref[4])
  # Inside the NaN's document: exact before the first NaN, non-finite from each NaN on.
  _assert_exact("o (NaN document, before the NaN)", o, o_ref, slice(NAN_DOC[0], NAN_AT["q"]))
  o = np.asarray(o)
  assert not np.any(np.isfinite(o[:, NAN_AT["q"]]))
  assert not np.any(np.isfinite(o[:, NAN_AT["k"]:NAN_DOC[1]]))


@pytest.mark.parametrize("backend", ["xla", "gpu", "tpu"])
def test_nan_with_a_zero_cotangent_leaves_the_other_gradients_exact(backend):
  """A NaN q at token t whose output's cotangent is 0 (a masked loss): no gradient depends on it,
  so every gradient of the other tokens (and d initial_state, dg) is finite and exact (was NaN:
  0 * NaN in the backward carry dS += q^T dO). A NaN k and v at t with a zero cotangent at t:
  dq before t, dk and dv of every other token, dg up to t and d initial_state do not depend on it
  either (was: dq before t NaN, 0 * NaN in [(dO v^T) * W] k)."""
  d = HEAD_DIM.get(backend, 16)
  q, k, v, g, s0 = _data(16, 1, 64, 1, d, d, "token")
  rng = np.random.default_rng(17)
  ds = jnp.asarray(rng.standard_normal(s0.shape), jnp.float32)
  t = 30
  do = jnp.asarray(rng.standard_normal(v.shape), jnp.float32).at[:, t].set(0.0)
  others = np.arange(64) != t

  (_, grads), (_, want) = _vjp_both(backend, (q.at[:, t].set(jnp.nan), k, v, g, s0), (do, ds))
  for name, got, ref in zip(("dq", "dk", "dv", "dg"), grads, want):
    _assert_exact(f"{name} (NaN q)", got, ref, others)
  _assert_exact("d initial_state (NaN q)", grads[4], want[4])

  (_, grads), (_, want) = _vjp_both(
      backend, (q, k.at[:, t].set(jnp.nan), v.at[:, t].set(jnp.nan), g, s0), (do, 0 * ds))
  _assert_exact("dq (NaN k, v)", grads[0], want[0], slice(0, t))
  _assert_exact("dk (NaN k, v)", grads[1], want[1], others)
  _assert_exact("dv (NaN k, v)", grads[2], want[2], others)
  _assert_exact("dg (NaN k, v)", grads[3], want[3], slice(0, t + 1))
  _assert_exact("d initial_state (NaN k, v)", grads[4], want[4])
