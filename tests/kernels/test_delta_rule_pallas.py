"""The delta rule's state-pass Pallas kernels (TPU-style, GPU-style; interpret mode) vs a lax.scan.

Stage 2 only (``kernels/delta_rule/_pallas_common``): ``u_n = u0_n - w_n S``,
``S <- exp(gamma_n) S + k_end_n^T u_n``. Forward ``u`` and ``s_final`` and the gradient of
every input against ``jax.vjp`` of a plain jnp ``lax.scan`` in float64. Several chunks each, so the
carried state, the rebuilt chunk states and the reversed walk of the backward all matter; one
chunk is a reset (``gamma = -1e4``, ``exp`` exactly 0).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax.kernels.delta_rule import pallas_gpu, pallas_tpu
from tests.kernels.race import races_per_call
from tests.references import f64, rel_err

TOL = 1e-5


def scan_reference(w, u0, k_end, gamma, s0):
  """Stage 2 by ``lax.scan`` over chunks, written out here independently of the package."""
  def step(s, xs):
    w_n, u0_n, k_n, lg_n = xs                       # (B, H, C, Dk), ..., (B, H, Dg)
    u_n = u0_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s)
    s = jnp.exp(lg_n)[..., None] * s + jnp.einsum("bhck,bhcv->bhkv", k_n, u_n)
    return s, u_n

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (w, u0, k_end, gamma))
  s_final, u = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(u, 0, 2), s_final


def _data(seed, bsz, h, nc, c, dk, dv, dg):
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.2, (bsz, h, nc, c, dk))
  u0 = rng.normal(0, 1.0, (bsz, h, nc, c, dv))
  k_end = rng.normal(0, 0.2, (bsz, h, nc, c, dk))
  gamma = -rng.uniform(0.0, 2.0, (bsz, h, nc, dg))
  gamma[0, -1, 1] = -1e4                   # a reset chunk: exp is exactly 0 in float32
  if dg > 1:
    gamma[-1, 0, 2, ::3] = -1e4            # a per-channel reset of some rows
  s0 = rng.normal(0, 0.5, (bsz, h, dk, dv))
  return tuple(jnp.asarray(x, jnp.float32) for x in (w, u0, k_end, gamma, s0))


def _check(fn, args, tol=TOL):
  """Forward and vjp of ``fn`` against the float64 scan reference (random cotangents)."""
  rng = np.random.default_rng(1)
  w, u0 = args[:2]
  cot = (jnp.asarray(rng.standard_normal(u0.shape), jnp.float32),
         jnp.asarray(rng.standard_normal(args[4].shape), jnp.float32))

  def fwd_bwd(f):
    def go(*a):
      out, vjp = jax.vjp(f, *a)
      return (*out, *vjp(tuple(ct.astype(o.dtype) for ct, o in zip(cot, out))))
    return go

  got = jax.jit(fwd_bwd(fn))(*args)
  want = f64(fwd_bwd(scan_reference), *args)
  names = ["u", "s_final", "dw", "du0", "dk_end", "dgamma", "ds0"]
  assert jnp.exp(args[3]).min() == 0.0                  # the reset really is an exact zero
  for name, a, b in zip(names, got, want):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    a = np.asarray(a, np.float64)
    assert np.all(np.isfinite(a)), name
    assert rel_err(a, b) < tol, (name, rel_err(a, b))


def _tpu(**kw):
  return lambda *a: pallas_tpu.delta_state_pass_tpu(*a, interpret=True, **kw)


def _gpu(**kw):
  return lambda *a: pallas_gpu.delta_state_pass_gpu(*a, interpret=True, **kw)


# (NC, C, Dv, Dg, block_v): Dk = 32 throughout; block_v 16 of Dv 32 puts two programs on the value
# channels, whose partial dw / dk_end / dgamma are summed in XLA.
CASES = [(3, 16, 16, 1, None), (4, 32, 32, 32, None), (3, 16, 32, 32, 16), (3, 32, 16, 1, None)]


@pytest.mark.parametrize("backend,nc,c,dv,dg,block_v", [
    ("gpu", *case) for case in CASES] + [("tpu", *case) for case in CASES if case[-1] is None])
def test_forward_and_every_gradient(backend, nc, c, dv, dg, block_v):
  fn = _tpu() if backend == "tpu" else _gpu(block_v=block_v)
  _check(fn, _data(0, 2, 2, nc, c, 32, dv, dg))


def test_tpu_kernels_under_tpu_semantics_interpreter(monkeypatch):
  """pltpu.InterpretParams simulates Mosaic's pipelining: an output block is written back only when
  its index changes (s_final, ds0 at the last step), scratch persists along the chunk axis,
  uninitialised memory reads as NaN. No kernel call races (each one checked: tests/kernels/race.py).
  """
  from jax.experimental.pallas import tpu as pltpu
  args = _data(2, 1, 2, 3, 8, 32, 16, 32)

  def fn(*a):
    return pallas_tpu.delta_state_pass_tpu(
        *a, interpret=pltpu.InterpretParams(detect_races=True))
  with races_per_call(monkeypatch) as races:
    _check(fn, args)
  assert len(races) >= 3 and not any(races), races   # forward, states, reverse at least


def test_s0_none_is_zeros_and_non_float32_inputs_are_cast():
  w, u0, k_end, gamma, _ = _data(3, 1, 1, 3, 16, 32, 16, 1)
  u, s = pallas_gpu.delta_state_pass_gpu(w.astype(jnp.bfloat16), u0, k_end, gamma, interpret=True)
  u_ref, s_ref = f64(scan_reference, w.astype(jnp.bfloat16), u0, k_end, gamma,
                     jnp.zeros((1, 1, 32, 16)))
  assert u.dtype == s.dtype == jnp.float32
  assert rel_err(u, u_ref) < TOL and rel_err(s, s_ref) < TOL


def _shapes(nc=3, c=16, dk=32, dv=32, dg=1, s0_dk=None):
  sds = jax.ShapeDtypeStruct
  return (sds((2, 2, nc, c, dk), jnp.float32), sds((2, 2, nc, c, dv), jnp.float32),
          sds((2, 2, nc, c, dk), jnp.float32), sds((2, 2, nc, dg), jnp.float32),
          sds((2, 2, s0_dk or dk, dv), jnp.float32))


@pytest.mark.parametrize("backend,shapes,kw,match", [
    ("tpu", _shapes(c=12), {}, "multiple of 8.*C=12"),
    ("gpu", _shapes(c=8), {}, "chunk size C to be a power of two >= 16.*got 8"),
    ("gpu", _shapes(dk=24), {}, "Dk to be a power of two >= 16.*got 24"),
    ("gpu", _shapes(dv=48), {}, "Dv to be a power of two >= 16.*got 48"),
    ("gpu", _shapes(), {"block_v": 24}, "block_v.*got 24"),
    ("gpu", _shapes(c=128, dk=256), {}, r"C \* Dk <= 16384.*C=128, Dk=256"),
    ("tpu", _shapes(dg=5), {}, r"Dg in \{1, Dk=32\}.*got \(2, 2, 3, 5\)"),
    ("gpu", _shapes(s0_dk=16), {}, r"s0 must have shape.*got \(2, 2, 16, 32\)"),
])
def test_bad_shapes_raise_value_error(backend, shapes, kw, match):
  mod = pallas_gpu if backend == "gpu" else pallas_tpu
  with pytest.raises(ValueError, match=match):
    mod.check_shapes(*shapes, **kw)
  args = [jnp.zeros(s.shape, s.dtype) for s in shapes]
  entry = getattr(mod, f"delta_state_pass_{backend}")
  with pytest.raises(ValueError, match=match):
    entry(*args, interpret=True, **kw)


def test_check_shapes_without_s0():
  """``api`` asks ``check_shapes(w, u0, k_end, gamma)`` whether a kernel tiles the chunks."""
  shapes = _shapes()[:4]
  pallas_tpu.check_shapes(*shapes)
  pallas_gpu.check_shapes(*shapes)


def _abstract_device(backend):
  """JAX 0.11's Triton lowering asks the (abstract) device for its compute capability."""
  if backend != "gpu":
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.mark.parametrize("dg", [1, 128])
@pytest.mark.parametrize("backend,platform,target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_for_the_real_hardware(backend, platform, target, dg):
  """Cross-lowers fwd+bwd at a production-like size for the device: this runs the Triton / Mosaic
  lowering of every kernel (forward, states, reverse), which interpret mode never touches. It is
  not the backend compile (no Triton / libtpu here)."""
  entry = pallas_gpu.delta_state_pass_gpu if backend == "gpu" else pallas_tpu.delta_state_pass_tpu
  sds = jax.ShapeDtypeStruct

  def step(*args):
    def loss(*args):
      u, s = entry(*args)
      return jnp.sum(u) + jnp.sum(s)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

  x = sds((2, 2, 4, 64, 128), jnp.float32)
  with _abstract_device(backend):
    exported = jax.export.export(
        jax.jit(step), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(
            x, x, x, sds((2, 2, 4, dg), jnp.float32), sds((2, 2, 128, 128), jnp.float32))
  assert exported.mlir_module().count(target.split("$")[-1]) >= 3   # fwd, states, reverse
