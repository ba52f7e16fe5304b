"""Benchmark of the chunked linear-attention kernels: Pallas vs the XLA path, side by side.

Times forward and forward+backward (gradients of q, k, v and the decay) for each shape, prints a
table and writes it as JSON. Imports only jax and numpy (runs on a bare GPU/TPU image).

  PYTHONPATH=. python benchmarks/kernels.py                     # on whatever backend JAX has
  PYTHONPATH=. python benchmarks/kernels.py --small             # CPU: toy shapes, interpret mode
  PYTHONPATH=. python benchmarks/kernels.py --check             # also check the compiled kernels
  PYTHONPATH=. python benchmarks/kernels.py --compile-sm90      # no GPU: sm_90a compile (pip: sm90)

Yardsticks (per call, for the chunked algorithm at chunk size c, whatever the implementation):
- FLOPs: forward ``B H N (2 c (Dk + Dv) + 4 Dk Dv)`` (full c x c tiles, as computed), and
  forward+backward three times that (the usual backward = 2 x forward convention).
- bytes: the fewest possible: forward reads q, k, v (+ decay) and writes o; forward+backward adds
  reading q, k, v, dO and writing dq, dk, dv.
- roofline time = max(FLOPs / peak, bytes / bandwidth); ``roofline %`` = roofline time / time.
Peaks default to an H200's measured 790 TFLOP/s (bf16) and 4300 GB/s; pass --peak-* elsewhere.

The delta rule (``lasp_jax.kernels.delta_rule.chunk_delta_rule``, design §11: rows ``delta-pallas`` with the
Pallas state pass and output kernels, ``delta-xla``) runs on the main shape with the per-token decay
(Gated DeltaNet), unit-norm keys and a fixed ``beta = 0.5``; gradients of q, k, v and the decay. Its
rows keep the linear-attention yardstick above (the delta rule adds the WY solve, ``~c^2 (Dk + Dv)``
more FLOPs per token), so their roofline % is of that yardstick, a lower bound of the delta rule's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lasp_jax.kernels.delta_rule import api as delta_api  # noqa: E402
from lasp_jax.kernels.linear_attention import pallas_gpu, pallas_tpu, reference  # noqa: E402

MAIN_SHAPE = (8, 8192, 16, 128, 128)
OTHER_SHAPES = [(4, 16384, 16, 128, 128), (16, 4096, 32, 64, 64), (8, 8192, 16, 64, 128)]
SMALL_SHAPES = [(1, 256, 2, 128, 128)]


def _hardware():
  platform = jax.default_backend()
  return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform, "cpu")


def _pallas_fn(backend, block_sizes, interpret):
  mod = pallas_gpu if backend == "gpu" else pallas_tpu
  entry = (pallas_gpu.chunk_linear_attention_gpu if backend == "gpu"
           else pallas_tpu.chunk_linear_attention_tpu)

  def fn(q, k, v, g):
    return entry(q, k, v, g, block_sizes=block_sizes, interpret=interpret)
  del mod
  return fn


def _xla_fn(chunk):
  def fn(q, k, v, g):
    return reference.chunk_linear_attention_xla(q, k, v, g, chunk_size=chunk)
  return fn


def _delta_fn(backend, chunk, interpret):
  """The delta rule with ``beta = 0.5`` and unit-norm keys, ``(q, k, v, g) -> (o, S)``."""
  def fn(q, k, v, g):
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(q.dtype)
    beta = jnp.full(q.shape[:3], 0.5, q.dtype)
    return delta_api.chunk_delta_rule(q, k, v, beta, g, chunk_size=chunk, backend=backend,
                                      interpret=interpret if backend == "gpu" else None)
  return fn


def _inputs(shape, dtype, decay, seed=0):
  bsz, n, h, dk, dv = shape
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = (jax.random.normal(keys[0], (bsz, n, h, dk), jnp.float32) * dk ** -0.5).astype(dtype)
  k = (jax.random.normal(keys[1], (bsz, n, h, dk), jnp.float32) * dk ** -0.5).astype(dtype)
  v = jax.random.normal(keys[2], (bsz, n, h, dv), jnp.float32).astype(dtype)
  do = jax.random.normal(keys[3], (bsz, n, h, dv), jnp.float32).astype(dtype)
  if decay == "none":
    g = None
  elif decay == "head":
    g = -jnp.linspace(0.01, 0.1, h, dtype=jnp.float32)
  else:
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (bsz, n, h), jnp.float32) + 4.0)
  return q, k, v, g, do


def _timed(fn, args, iters, warmup=2):
  out = fn(*args)
  jax.block_until_ready(out)
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _train_step(fn):
  """fwd+bwd: the VJP of ``o`` (with a fixed cotangent) wrt q, k, v and the decay."""
  def step(q, k, v, g, do):
    (o, _), vjp = jax.vjp(fn, q, k, v, g)
    return vjp((do, jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)))
  return step


def _counts(shape, chunk, itemsize, decay):
  bsz, n, h, dk, dv = shape
  flops = bsz * h * n * (2 * chunk * (dk + dv) + 4 * dk * dv)
  arr_k, arr_v = bsz * n * h * dk * itemsize, bsz * n * h * dv * itemsize
  g_bytes = 0 if decay != "token" else bsz * n * h * 4
  fwd_bytes = 2 * arr_k + 2 * arr_v + g_bytes
  bwd_bytes = 4 * arr_k + 3 * arr_v + 2 * g_bytes   # read q k v dO, write dq dk dv (+ g, dg)
  return flops, fwd_bytes, 3 * flops, fwd_bytes + bwd_bytes


def bench_one(name, fn, shape, dtype, decay, chunk, iters, peaks):
  q, k, v, g, do = _inputs(shape, dtype, decay)
  row = dict(impl=name, shape=list(shape), dtype=jnp.dtype(dtype).name, decay=decay, chunk=chunk)
  flops, fwd_bytes, tflops, t_bytes = _counts(shape, chunk, jnp.dtype(dtype).itemsize, decay)
  try:
    fwd = jax.jit(fn)
    t_f = _timed(fwd, (q, k, v, g), iters)
    step = jax.jit(_train_step(fn))
    t_t = _timed(step, (q, k, v, g, do), iters)
  except Exception as e:  # noqa: BLE001  (a failing variant must not kill the table)
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row
  for tag, t, fl, by in (("fwd", t_f, flops, fwd_bytes), ("fwdbwd", t_t, tflops, t_bytes)):
    roof = max(fl / (peaks[0] * 1e12), by / (peaks[1] * 1e9))
    row[f"{tag}_ms"] = t * 1e3
    row[f"{tag}_tflops"] = fl / t / 1e12
    row[f"{tag}_gbs"] = by / t / 1e9
    row[f"{tag}_roofline_pct"] = 100.0 * roof / t
  return row


CHECK_CONFIGS = (  # (dtype, decay, shape B N H Dk Dv, chunk): float32 IEEE dots compile slowly at
    # Dk = 128 with Triton, so the tight float32 checks use a small head dim.
    (jnp.float32, "none", (2, 512, 4, 32, 32), 16),
    (jnp.float32, "token", (2, 512, 4, 32, 32), 16),
    (jnp.float32, "head", (2, 512, 4, 32, 32), 32),
    (jnp.bfloat16, "none", (2, 512, 4, 128, 128), 64),
    (jnp.bfloat16, "token", (2, 512, 4, 128, 128), 64),
    (jnp.bfloat16, "head", (2, 512, 4, 128, 128), 64),
    # The (H,) decay's gradient cancels over the whole row: long enough to show it (issue 22).
    (jnp.bfloat16, "head", (1, 8192, 4, 128, 128), 64),
)
# The delta rule, compiled: (dtype, shape, chunk, with segment ids).
DELTA_CHECK_CONFIGS = ((jnp.float32, (2, 256, 2, 32, 32), 16, True),
                       (jnp.bfloat16, (2, 1024, 4, 128, 128), 64, True))
SMALL_DELTA_CHECK_CONFIGS = ((jnp.float32, (1, 64, 1, 32, 32), 16, True),)
SMALL_CHECK_CONFIGS = ((jnp.float32, "token", (1, 64, 1, 32, 32), 16),
                       (jnp.bfloat16, "token", (1, 64, 1, 32, 32), 16))


def check_delta(backend, interpret, configs):
  """The delta rule (per-token decay, beta in [0, 2], initial state, packed documents): Pallas
  (``backend``: its state pass and output kernels) vs XLA vs the float64 recurrence, forward and
  the gradients of q, k, v, beta, the decay and the initial state."""
  from tests.references import delta_recurrence, f64, rel_err  # only for --check
  rows = []
  for dtype, shape, chunk, packed in configs:
    bsz, n, h, dk, dv = shape
    q, k, v, g, do = _inputs(shape, dtype, "token", seed=3)
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dtype)
    beta = jax.random.uniform(jax.random.PRNGKey(4), (bsz, n, h), jnp.float32, 0.0, 2.0)
    s0 = jax.random.normal(jax.random.PRNGKey(5), (bsz, h, dk, dv)) * 0.1
    ids = (jnp.arange(n)[None, :] * 3 // n + jnp.arange(bsz)[:, None]) if packed else None

    def make(be):
      def go(q, k, v, beta, g, s0):
        fn = lambda *a: delta_api.chunk_delta_rule(  # noqa: E731
            *a[:4], a[4], initial_state=a[5], segment_ids=ids, chunk_size=chunk, backend=be,
            interpret=interpret if be != "xla" else None)
        (o, sf), vjp = jax.vjp(fn, q, k, v, beta, g, s0)
        return (o, sf) + vjp((do.astype(o.dtype), jnp.ones_like(sf)))
      return jax.jit(go)

    tag = dict(kernel="delta_rule", dtype=jnp.dtype(dtype).name, decay="token",
               shape=list(shape), chunk=chunk, segment_ids=packed)
    try:
      got = make(backend)(q, k, v, beta, g, s0)
    except Exception as e:  # noqa: BLE001  (report, keep going)
      print(f"check {tag}: Pallas FAILED {type(e).__name__}: {e}"[:2000])
      rows.append(dict(tag, error=str(e)[:2000]))
      continue
    xla = make("xla")(q, k, v, beta, g, s0)

    def ref(q, k, v, beta, g, s0):
      fn = lambda *a: delta_recurrence(*a[:4], a[4], initial_state=a[5], segment_ids=ids)  # noqa
      (o, sf), vjp = jax.vjp(fn, q, k, v, beta, g, s0)
      return (o, sf) + vjp((do.astype(o.dtype), jnp.ones_like(sf)))
    want = f64(ref, q, k, v, beta, g, s0)
    for nm, a, x, w in zip(["o", "final_state", "dq", "dk", "dv", "dbeta", "dg", "ds0"],
                           got, xla, want):
      rows.append(dict(tag, out=nm, pallas_vs_f64=rel_err(a, w), xla_vs_f64=rel_err(x, w),
                       pallas_vs_xla=rel_err(a, x),
                       finite=bool(np.all(np.isfinite(np.asarray(a, np.float32))))))
      r = rows[-1]
      print(f"delta {r['dtype']:9s} {'x'.join(map(str, shape)):16s} {nm:12s} "
            f"{r['pallas_vs_f64']:9.2e} {r['xla_vs_f64']:9.2e} {r['finite']}", flush=True)
  return rows


def check_compiled(backend, interpret, configs):
  """Pallas fwd+grads (compiled, or interpreted on CPU) vs the XLA path and float64 recurrence."""
  from tests.references import f64, linear_recurrence, rel_err  # only for --check
  rows = []
  for dtype, decay, shape, chunk in configs:
    q, k, v, g, do = _inputs(shape, dtype, decay, seed=1)
    s0 = jax.random.normal(jax.random.PRNGKey(7), (shape[0], shape[2], shape[3], shape[4]))
    dsf = jax.random.normal(jax.random.PRNGKey(8), s0.shape)
    mod = pallas_gpu if backend == "gpu" else pallas_tpu
    bs = dataclasses.replace(mod.DEFAULT_BLOCK_SIZES, chunk_size=chunk)
    entry = (pallas_gpu.chunk_linear_attention_gpu if backend == "gpu"
             else pallas_tpu.chunk_linear_attention_tpu)
    variants = [("default", bs)]
    parallel = dataclasses.replace(bs, chunk_parallel_forward=True, chunk_parallel_backward=True)
    if backend == "gpu" and decay != "none" and parallel != bs:
      variants.append(("chunk-parallel", parallel))

    def run_xla(q, k, v, g, s0):
      with jax.default_matmul_precision("highest"):
        return reference.chunk_linear_attention_xla(q, k, v, g, initial_state=s0,
                                                    chunk_size=chunk)

    def grads(fn):
      def go(q, k, v, g, s0):
        (o, sf), vjp = jax.vjp(fn, q, k, v, g, s0)
        return (o, sf) + vjp((do.astype(o.dtype), dsf.astype(sf.dtype)))
      return jax.jit(go)

    xla = grads(run_xla)(q, k, v, g, s0)
    want = f64(lambda *a: grads(lambda q, k, v, g, s0: linear_recurrence(
        q, k, v, g, initial_state=s0))(*a), q, k, v, g, s0)
    for variant, block_sizes in variants:
      tag = dict(dtype=jnp.dtype(dtype).name, decay=decay, shape=list(shape), chunk=chunk,
                 variant=variant)

      def run_pallas(q, k, v, g, s0, block_sizes=block_sizes):
        return entry(q, k, v, g, initial_state=s0, block_sizes=block_sizes, interpret=interpret)
      try:
        got = grads(run_pallas)(q, k, v, g, s0)
      except Exception as e:  # noqa: BLE001  (report, keep going)
        print(f"check {tag}: Pallas FAILED {type(e).__name__}: {e}"[:2000])
        rows.append(dict(tag, error=str(e)[:2000]))
        continue
      names = ["o", "final_state", "dq", "dk", "dv", "dg", "ds0"]
      for nm, a, x, w in zip(names, got, xla, want):
        if w is None or a is None:
          continue
        rows.append(dict(tag, out=nm, pallas_vs_f64=rel_err(a, w), xla_vs_f64=rel_err(x, w),
                         pallas_vs_xla=rel_err(a, x),
                         finite=bool(np.all(np.isfinite(np.asarray(a, np.float32))))))
  print(f"\ncorrectness ({backend}, interpret={interpret}): max|err| / max|ref|")
  print(f"{'dtype':9s} {'decay':6s} {'BxNxHxDkxDv':16s} {'c':>4s} {'variant':18s} {'out':12s} "
        f"{'pal-f64':>9s} {'xla-f64':>9s} {'pal-xla':>9s} finite")
  for r in rows:
    if "error" in r:
      continue
    print(f"{r['dtype']:9s} {r['decay']:6s} {'x'.join(map(str, r['shape'])):16s} {r['chunk']:4d} "
          f"{r['variant']:18s} {r['out']:12s} {r['pallas_vs_f64']:9.2e} {r['xla_vs_f64']:9.2e} "
          f"{r['pallas_vs_xla']:9.2e} {r['finite']}")
  return rows


# ------------------------------------------------------------------ --compile-sm90 (issue 22)
# Without a GPU: every Pallas Triton kernel of both GPU families, forward and backward, lowered via
# jax.export for "cuda" and compiled for sm_90a by the `triton` package (the `sm90` extra), with
# ptxas' register and spill report. A proxy for the GPU build: on a GPU, XLA compiles the same
# Triton IR with the Triton and ptxas bundled in jaxlib, whose versions differ.

SM90_SHARED_LIMIT = 232448   # bytes of shared memory one H100/H200 block may use
SM90_OUT = "benchmarks/results/kernels_sm90.json"


@contextlib.contextmanager
def _lowered_triton_kernels():
  """Collects the Pallas Triton kernels lowered inside the block: a list of dicts with the kernel
  name, its Triton IR (text), grid, and the num_warps / num_stages the GPU build would use.

  The only code here that reaches into JAX internals (``jax._src.pallas``, JAX 0.10-0.11): it
  wraps the Triton backend's ``pallas_call`` lowering rule (for the compiler params; JAX finds it
  in a registry keyed by the params' class, or as a module attribute without params) and its
  jaxpr -> Triton IR function (for the IR), restoring all three on exit.
  """
  from jax._src.pallas import core as pallas_core
  from jax._src.pallas.triton import core as triton_core, lowering
  from jax._src.pallas.triton import pallas_call_registration as registration
  rules = getattr(pallas_core, "_backend_lowering_rules", {})
  key = triton_core.CompilerParams
  lower_rule, to_triton = registration.pallas_call_lowering, lowering.lower_jaxpr_to_triton_module
  registered = rules.get(key)
  kernels, params = [], []

  def rule(ctx, *args, compiler_params=None, **kw):
    # JAX's defaults on CUDA: 4 warps, 3 stages.
    params.append((getattr(compiler_params, "num_warps", None) or 4,
                   getattr(compiler_params, "num_stages", None) or 3))
    try:
      return lower_rule(ctx, *args, compiler_params=compiler_params, **kw)
    finally:
      params.pop()

  def capture(*args, **kw):
    res = to_triton(*args, **kw)
    op = res.module.operation
    warps, stages = params[-1]
    kernels.append(dict(kernel=op.attributes["sym_name"].value, grid=list(res.grid),
                        num_warps=warps, num_stages=stages,
                        ttir=op.get_asm(enable_debug_info=False)))
    return res

  if registered is not None:
    rules[key] = (rule, registered[1])
  registration.pallas_call_lowering, lowering.lower_jaxpr_to_triton_module = rule, capture
  try:
    yield kernels
  finally:
    registration.pallas_call_lowering, lowering.lower_jaxpr_to_triton_module = lower_rule, to_triton
    if registered is not None:
      rules[key] = registered


def _export_for_cuda(fn, *args):
  """``jax.export`` of ``jit(fn)`` for CUDA on any machine; its Triton kernels are not compiled."""
  # JAX 0.11's Triton lowering reads the compute capability off the (abstract) device.
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)


def _sm90_exports(variants, shape):
  """What --compile-sm90 exports: ``(labels, fwd+bwd fn, abstract args, keep(kernel name))``.

  Linear attention: each block-size variant without and with a per-token decay, bf16, gradients
  of q, k, v, the decay and the initial state. The delta rule (Gated DeltaNet: per-token decay)
  through ``chunk_delta_rule(backend="gpu")``: bf16 inputs (bf16 dot operands in the state pass,
  what models run) and float32 inputs (float32 IEEE operands, for comparison); only its WY-prepare
  and state-pass kernels are kept, its output stage being the linear-attention kernels with a
  per-token decay.
  """
  bsz, n, h, dk, dv = shape
  sds = jax.ShapeDtypeStruct
  s0 = sds((bsz, h, dk, dv), jnp.float32)
  g = sds((bsz, n, h), jnp.float32)
  bf = jnp.bfloat16

  def linear_attention(bs, decay):
    def loss(q, k, v, g, s0):
      o, s = pallas_gpu.chunk_linear_attention_gpu(q, k, v, g, initial_state=s0, block_sizes=bs)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4) if decay else (0, 1, 2, 4))

  def delta_rule(chunk):
    def loss(q, k, v, beta, g, s0):
      # interpret=False: lower the Triton kernels even on this CPU-only machine.
      o, s = delta_api.chunk_delta_rule(q, k, v, beta, g, initial_state=s0, chunk_size=chunk,
                                        backend="gpu", interpret=False)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))

  for name, bs in variants:
    for decay in ("none", "token"):
      yield (dict(family="linear_attention", variant=name, decay=decay, dtype="bfloat16"),
             linear_attention(bs, decay == "token"),
             (sds((bsz, n, h, dk), bf), sds((bsz, n, h, dk), bf), sds((bsz, n, h, dv), bf),
              g if decay == "token" else None, s0),
             lambda kernel: True)
  chunk = variants[0][1].chunk_size
  for dtype, name in ((bf, "delta bf16-operands"), (jnp.float32, "delta f32-operands")):
    yield (dict(family="delta_rule", variant=name, decay="token", dtype=jnp.dtype(dtype).name),
           delta_rule(chunk),
           (sds((bsz, n, h, dk), dtype), sds((bsz, n, h, dk), dtype), sds((bsz, n, h, dv), dtype),
            sds((bsz, n, h), dtype), g, s0),
           lambda kernel: kernel.startswith(("delta_state_pass", "delta_prepare")))


def _find_ptxas():
  """The ptxas Triton runs for sm_90 (it ships its own), or None."""
  try:
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415
    path = get_ptxas(90).path
  except Exception:  # noqa: BLE001  (another Triton layout: look in its bin/)
    import triton.backends.nvidia as nvidia  # noqa: PLC0415
    bin_dir = os.path.join(os.path.dirname(nvidia.__file__), "bin")
    path = next((os.path.join(bin_dir, b) for b in ("ptxas-blackwell", "ptxas")
                 if os.path.exists(os.path.join(bin_dir, b))), None)
  return path if path and os.access(path, os.X_OK) else None


def _ptxas_version(ptxas):
  """E.g. ``ptxas-blackwell, Cuda compilation tools, release 13.4, V13.4.x``; None without one."""
  if ptxas is None:
    return None
  try:
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"{os.path.basename(ptxas)}: {type(e).__name__}"
  release = [line for line in out.splitlines() if "release" in line]
  return ", ".join([os.path.basename(ptxas)] + release[:1])


def _ptxas_usage(ptxas, ptx):
  """Registers per thread and spilled bytes, from ``ptxas -v`` with Triton's own flags."""
  if ptxas is None:
    return dict(ptxas_error="ptxas not found (Triton ships one in triton/backends/nvidia/bin)")
  arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "k.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    try:
      proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                             src, "-o", os.path.join(tmp, "k.cubin")],
                            capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
      return dict(ptxas_error=f"{type(e).__name__}: {e}"[:300])
  log = proc.stdout + proc.stderr
  regs = re.search(r"Used (\d+) registers", log)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  stack = re.search(r"(\d+) bytes stack frame", log)
  if proc.returncode or not regs:
    return dict(ptxas_error=f"rc {proc.returncode}: {log[-300:]}")
  return dict(regs=int(regs.group(1)),
              spill_stores=int(spills.group(1)) if spills else 0,
              spill_loads=int(spills.group(2)) if spills else 0,
              stack_frame=int(stack.group(1)) if stack else 0)


def _dot_counts(ttir, ttgir, ptx):
  """The ``tt.dot`` ops of the Triton IR: all, by operand type, and the float32 ones at IEEE
  precision (``inputPrecision``'s default, omitted from the text; CUDA-core FMA); how Triton
  lowered them for sm_90 (TTGIR: a ``warp_group_dot`` is wgmma, a ``tt.dot`` left is mma.sync or
  FMA); and the static count of wgmma / mma.sync instructions in the PTX."""
  dots = re.findall(r"= tt\.dot (.*)", ttir)
  operand = [re.search(r": tensor<[\dx]*x(\w+)>", d).group(1) for d in dots]
  found = [re.search(r"inputPrecision = (\w+)", d) for d in dots]
  precision = [m.group(1) if m else "ieee" for m in found]
  return dict(dots=len(dots),
              ieee_dots=sum(t == "f32" and p == "ieee" for t, p in zip(operand, precision)),
              dot_operands=dict(collections.Counter(operand)),
              wgmma_dots=len(re.findall(r"= ttng\.warp_group_dot ", ttgir)),
              other_dots=len(re.findall(r"= tt\.dot ", ttgir)),
              wgmma=ptx.count("wgmma.mma_async"),
              mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)))


def _compile_sm90a(k, ptxas):
  """One lowered kernel (from :func:`_lowered_triton_kernels`) compiled for sm_90a: its row."""
  import triton  # noqa: PLC0415  (optional dependency of --compile-sm90 only)
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  row = dict(kernel=k["kernel"], grid=k["grid"], num_warps=k["num_warps"],
             num_stages=k["num_stages"])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, k["kernel"] + ".ttir")
    with open(path, "w") as f:
      f.write(k["ttir"])
    t0 = time.perf_counter()
    try:
      kern = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(
          num_warps=k["num_warps"], num_stages=k["num_stages"], enable_fp_fusion=True))
    except Exception as e:  # noqa: BLE001  (report, keep going)
      return dict(row, error=f"triton: {type(e).__name__}: {e}"[:500])
  shared = int(kern.metadata.shared)
  return dict(row, compile_s=round(time.perf_counter() - t0, 1), shared=shared,
              fits=shared <= SM90_SHARED_LIMIT, **_ptxas_usage(ptxas, kern.asm["ptx"]),
              **_dot_counts(k["ttir"], kern.asm["ttgir"], kern.asm["ptx"]))


def _sm90_findings(rows):
  """One line per thing to look at: errors, shared memory over the limit, dots not on wgmma
  (bf16 ones: tensor-core work off the fast path; float32 IEEE ones: CUDA cores), spills."""
  def name(r):
    return f"{r['variant']} {r['decay']} {r.get('kernel', '')}".strip()
  ok = [r for r in rows if "error" not in r]
  lines = [f"error: {name(r)}: {r['error'][:120]}" for r in rows if "error" in r]
  lines += [f"over the shared-memory limit: {name(r)} ({r['shared']} B)"
            for r in ok if not r["fits"]]
  lines += [f"dots not on wgmma: {name(r)}: {r['dots'] - r['wgmma_dots']} of {r['dots']} "
            f"({r['ieee_dots']} float32 IEEE)" for r in ok if r["wgmma_dots"] < r["dots"]]
  for dtype in sorted({r["dtype"] for r in ok}):
    of_dtype = [r for r in ok if r["dtype"] == dtype]
    spilling = [r for r in of_dtype if r.get("spill_stores")]
    if spilling:
      worst = max(spilling, key=lambda r: r["spill_stores"])
      lines.append(f"spilling, {dtype}: {len(spilling)} of {len(of_dtype)} kernels; most: "
                   f"{name(worst)} ({worst['spill_stores']} B stores, {worst['regs']} registers)")
  lines += [f"no ptxas report: {name(r)}: {r['ptxas_error'][:120]}"
            for r in ok if "ptxas_error" in r][:1]
  return lines


def compile_sm90(variants, shape=MAIN_SHAPE, out=SM90_OUT):
  """Compiles every GPU kernel (linear attention and the delta rule's state pass, forward and
  backward) for sm_90a without a GPU, writing per kernel: shared memory, registers, spills, dots
  (IEEE ones, wgmma ones) and wgmma instructions. Needs the ``triton`` package (the ``sm90``
  extra); a diagnostic reaching into JAX internals (:func:`_lowered_triton_kernels`).
  """
  import triton  # noqa: PLC0415  (optional dependency of this mode only)

  ptxas = _find_ptxas()
  result = dict(jax_version=jax.__version__, triton_version=triton.__version__,
                target="cuda sm_90a", ptxas=_ptxas_version(ptxas), shape=list(shape),
                shared_limit=SM90_SHARED_LIMIT,
                note="static counts: wgmma/mma_sync are PTX instructions, dots are tt.dot ops "
                     "(a dot in a loop counts once); on a GPU, jaxlib's bundled Triton and "
                     "ptxas compile this IR and may differ",
                findings=[], kernels=[])
  for labels, fn, args, keep in _sm90_exports(variants, shape):
    with _lowered_triton_kernels() as lowered:
      try:
        _export_for_cuda(fn, *args)
      except Exception as e:  # noqa: BLE001  (report, keep going)
        lowered = [dict(kernel="-", error=f"export: {type(e).__name__}: {e}"[:500])]
    lowered = [k for k in lowered if "error" in k or keep(k["kernel"])] or [
        dict(kernel="-", error="no Triton kernel lowered (an XLA fallback?)")]
    seen = set()
    for k in lowered:
      if (k["kernel"], k.get("ttir")) in seen:
        continue
      seen.add((k["kernel"], k.get("ttir")))
      row = dict(labels, **(k if "error" in k else _compile_sm90a(k, ptxas)))
      result["kernels"].append(row)
      print(_sm90_line(row), flush=True)
      _save_json(result, out)
  result["findings"] = _sm90_findings(result["kernels"])
  _print_sm90_table(result)
  _save_json(result, out)
  print(f"wrote {out}")
  return result


def _save_json(obj, path):
  """Atomic: a kill mid-write leaves the previous complete file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


_SM90_HEAD = (f"{'variant':21s} {'decay':5s} {'dtype':8s} {'kernel':26s} {'shared':>7s} "
              f"{'regs':>4s} {'spill st/ld':>11s} {'dots':>4s} {'ieee':>4s} {'wgdot':>5s} {'wgmma':>5s}")


def _sm90_line(r):
  head = f"{r['variant']:21s} {r['decay']:5s} {r['dtype']:8s} {r.get('kernel', '-'):26s}"
  if "error" in r:
    return head + " ERROR " + r["error"][:200]
  spill = (f"{r['spill_stores']}/{r['spill_loads']}" if "regs" in r else "n/a")
  regs = r.get("regs", "n/a")
  return (head + f" {r['shared']:7d} {regs:>4} {spill:>11s} {r['dots']:4d} {r['ieee_dots']:4d} "
          f"{r['wgmma_dots']:5d} {r['wgmma']:5d}" + ("" if r["fits"] else "  OVER SHARED LIMIT"))


def _print_sm90_table(result):
  print(f"\nsm_90a compile (triton {result['triton_version']}, jax {result['jax_version']}), "
        f"B N H Dk Dv = {' '.join(map(str, result['shape']))}; shared in bytes (limit "
        f"{result['shared_limit']}), regs per thread, spilled bytes, tt.dot ops, IEEE ones, "
        "ones lowered to wgmma, wgmma PTX instructions")
  print(_SM90_HEAD)
  for r in result["kernels"]:
    print(_sm90_line(r))
  if result["ptxas"] is None:
    print("ptxas not found: no registers or spills")
  for line in result["findings"]:
    print(line)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="the JSON written (default "
                 "benchmarks/results/kernels.json; with --compile-sm90, " + SM90_OUT + ")")
  p.add_argument("--small", action="store_true", help="toy shapes, Pallas in interpret mode")
  p.add_argument("--backend", choices=("auto", "gpu", "tpu"), default="auto",
                 help="which Pallas kernels (auto: the device's; gpu-style on CPU)")
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--check", action="store_true", help="correctness check of the kernels first")
  p.add_argument("--no-sweep", action="store_true", help="only default block sizes")
  p.add_argument("--no-others", action="store_true", help="only the main shape")
  p.add_argument("--deadline", type=float, default=None,
                 help="seconds after which no new measurement starts (the table so far is kept)")
  p.add_argument("--shape", default=None, help="only this shape, 'B,N,H,Dk,Dv'")
  p.add_argument("--chunk", type=int, default=None, help="chunk size of the default variant")
  p.add_argument("--compile-sm90", action="store_true",
                 help="no GPU needed: compile every GPU kernel (each variant's linear attention, "
                      "the delta rule's state pass) for sm_90a with the triton package (the sm90 "
                      "extra); per kernel shared memory, registers, spills, dots, wgmma; no timing")
  p.add_argument("--peak-tflops", type=float, default=790.0)
  p.add_argument("--peak-gbs", type=float, default=4300.0)
  args = p.parse_args(argv)
  args.out = args.out or (SM90_OUT if args.compile_sm90 else "benchmarks/results/kernels.json")
  t_start = time.perf_counter()

  hw = _hardware()
  backend = ({"gpu": "gpu", "tpu": "tpu"}.get(hw, "gpu") if args.backend == "auto"
             else args.backend)
  interpret = hw != backend
  if interpret and not args.small and not args.compile_sm90:
    print(f"no {backend} device: running --small in interpret mode")
    args.small = True
  iters = args.iters or (2 if args.small else 10)
  peaks = (args.peak_tflops, args.peak_gbs)
  dtype = jnp.bfloat16
  result = dict(jax_version=jax.__version__, device=str(jax.devices()[0].device_kind),
                platform=jax.default_backend(), pallas_backend=backend, interpret=interpret,
                peaks=dict(tflops=peaks[0], gbs=peaks[1]), rows=[])
  def save():  # atomic: a timeout's kill mid-write leaves the previous complete table
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


  mod = pallas_gpu if backend == "gpu" else pallas_tpu
  default = mod.DEFAULT_BLOCK_SIZES
  if args.small:
    default = dataclasses.replace(default, chunk_size=64)
  if args.chunk:
    default = dataclasses.replace(default, chunk_size=args.chunk)
  variants = [("pallas", default)]
  # Not yet measured on a GPU: timed right after the default, before the sweep (issue 22).
  chunk_parallel = [
      ("pallas chunk-parallel-bwd", dataclasses.replace(default, chunk_parallel_backward=True)),
      ("pallas chunk-parallel", dataclasses.replace(default, chunk_parallel_forward=True,
                                                    chunk_parallel_backward=True))]
  chunk_parallel = [(n, bs) for n, bs in chunk_parallel if backend == "gpu" and bs != default]
  if backend == "gpu" and (not args.small or args.compile_sm90) and not args.no_sweep:
    variants += [
        ("pallas split-bwd", dataclasses.replace(default, split_backward=True)),
        ("pallas w8", dataclasses.replace(default, num_warps=8)),
        ("pallas c128 w8 split", dataclasses.replace(default, chunk_size=128, num_warps=8,
                                                     split_backward=True)),
        ("pallas bv128", dataclasses.replace(default, block_k=128, block_v=128, num_warps=8)),
    ]
  if args.compile_sm90:
    # The default, its other backward form (fused dk/dv or split), then the sweep; no duplicates.
    other_bwd = ("pallas fused-bwd" if default.split_backward else "pallas split-bwd",
                 dataclasses.replace(default, split_backward=not default.split_backward))
    unique = {}
    for name, bs in [variants[0], other_bwd] + chunk_parallel + variants[1:]:
      unique.setdefault(bs, name)
    shape = tuple(int(x) for x in args.shape.split(",")) if args.shape else MAIN_SHAPE
    return compile_sm90([(name, bs) for bs, name in unique.items()], shape, args.out)
  # (shape, decay, variants, time the XLA path too), most important first: a deadline cuts the tail.
  main_shape = SMALL_SHAPES[0] if args.small else MAIN_SHAPE
  # The delta rule before the block-size sweep: its time is a target of the device check.
  jobs = [(main_shape, "none", variants[:1], True), (main_shape, "token", variants[:1], True),
          (main_shape, "token", chunk_parallel, False),
          (main_shape, "token", [("delta-pallas", default)], "delta"),
          (main_shape, "head", variants[:1], True),
          (main_shape, "none", variants[1:], False), (main_shape, "token", variants[1:], False)]
  if not args.small and not args.no_others:
    jobs += [(shape, "token", variants[:1], True) for shape in OTHER_SHAPES]
  if args.shape:
    shape = tuple(int(x) for x in args.shape.split(","))
    jobs = [(shape, "none", variants[:1], True), (shape, "token", variants[:1], "delta")]

  def late():
    if args.deadline is not None and time.perf_counter() - t_start > args.deadline:
      result.setdefault("skipped", []).append(f"{shape} {decay} {name}")
      print(f"deadline: skipping {shape} {decay} {name}")
      return True
    return False

  for shape, decay, vs, with_xla in jobs:
    if with_xla == "delta":
      # delta-auto: each stage as kernels.dispatch says (what the models run).
      runs = [("delta-pallas", _delta_fn(backend, default.chunk_size, interpret), default),
              ("delta-auto", _delta_fn("auto", default.chunk_size, interpret), default),
              ("delta-xla", _delta_fn("xla", default.chunk_size, interpret), default)]
    else:
      runs = [(name, _pallas_fn(backend, bs, interpret), bs) for name, bs in vs]
    if with_xla is True:
      runs.append(("xla", _xla_fn(default.chunk_size), default))
    for name, fn, bs in runs:
      if late():
        continue
      row = bench_one(name, fn, shape, dtype, decay, bs.chunk_size, iters, peaks)
      if name != "xla":
        row["block_sizes"] = dataclasses.asdict(bs)
      result["rows"].append(row)
      _print_row(row)
      save()

  _print_table(result)
  save()
  if args.check:   # after the timings, one config at a time, so a timeout keeps what ran
    result["check"] = []
    for cfg in SMALL_CHECK_CONFIGS if args.small else CHECK_CONFIGS:
      result["check"] += check_compiled(backend, interpret, [cfg])
      save()
    for cfg in SMALL_DELTA_CHECK_CONFIGS if args.small else DELTA_CHECK_CONFIGS:
      result["check"] += check_delta(backend, interpret, [cfg])
      save()
  print(f"wrote {args.out}")
  return result


def _fmt(row):
  shape = "x".join(str(s) for s in row["shape"])
  head = f"{row['impl']:17s} {shape:20s} {row['decay']:5s} c={row['chunk']:<4d}"
  if "error" in row:
    return head + " ERROR " + row["error"][:120]
  return head + "".join(
      f" {row[f'{t}_ms']:9.3f} {row[f'{t}_tflops']:7.1f} {row[f'{t}_gbs']:8.1f} "
      f"{row[f'{t}_roofline_pct']:6.1f}%" for t in ("fwd", "fwdbwd"))


def _print_row(row):
  print(_fmt(row), flush=True)


def _print_table(result):
  print(f"\nchunked linear attention, {result['device']} ({result['platform']}), jax "
        f"{result['jax_version']}, Pallas '{result['pallas_backend']}'"
        f"{' (interpret)' if result['interpret'] else ''}, bf16")
  print(f"{'impl':17s} {'BxNxHxDkxDv':20s} {'decay':5s} {'chunk':6s}"
        f" {'fwd ms':>9s} {'TFLOP/s':>7s} {'GB/s':>8s} {'roof':>7s}"
        f" {'f+b ms':>9s} {'TFLOP/s':>7s} {'GB/s':>8s} {'roof':>7s}")
  for row in result["rows"]:
    print(_fmt(row))
  by_key = {}
  for row in result["rows"]:
    if "error" not in row:
      by_key.setdefault((tuple(row["shape"]), row["decay"]), []).append(row)
  for (shape, decay), rows in by_key.items():
    xla = [r for r in rows if r["impl"] == "xla"]
    pal = [r for r in rows if r["impl"] not in ("xla", "delta-xla", "delta-pallas", "delta-auto")]
    dx = [r for r in rows if r["impl"] == "delta-xla"]
    dp = [r for r in rows if r["impl"] == "delta-pallas"]
    if dx and dp:
      print(f"delta rule {shape} {decay}: Pallas vs XLA: fwd {dx[0]['fwd_ms'] / dp[0]['fwd_ms']:.2f}x, "
            f"fwd+bwd {dx[0]['fwdbwd_ms'] / dp[0]['fwdbwd_ms']:.2f}x")
    if xla and pal:
      best = min(pal, key=lambda r: r["fwdbwd_ms"])
      print(f"speed-up {shape} {decay}: best Pallas ({best['impl']}) vs XLA: fwd "
            f"{xla[0]['fwd_ms'] / best['fwd_ms']:.2f}x, fwd+bwd "
            f"{xla[0]['fwdbwd_ms'] / best['fwdbwd_ms']:.2f}x")


if __name__ == "__main__":
  main()
