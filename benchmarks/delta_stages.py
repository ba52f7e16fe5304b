"""Where the delta rule's time goes: its three stages timed apart, forward + backward, side by side.

  PYTHONPATH=. python benchmarks/delta_stages.py               # the accelerator's main shape
  PYTHONPATH=. python benchmarks/delta_stages.py --small       # CPU: toy shape (a dry run)

Stages (``lasp_jax.kernels.delta_rule`` module docstrings): 1. ``prepare`` (the WY solve per chunk,
XLA, and the chunk-parallel Triton kernels);
2. the sequential state pass (Pallas with bf16 operands, and XLA's scan); 3. the output, which is
diagonal-decay linear attention of ``(q, k, u)`` (Pallas, and XLA); and the whole op (``gpu``: every
stage on its kernels; ``auto``: as ``kernels.dispatch`` picks on this device). Each row is
the VJP of the stage's outputs against fixed random cotangents. Imports only jax and numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import MAIN_SHAPE, _inputs, _timed  # noqa: E402
from lasp_jax.kernels.delta_rule import api as delta_api  # noqa: E402
from lasp_jax.kernels.delta_rule import reference as delta_ref  # noqa: E402
from lasp_jax.kernels.linear_attention import api as la_api  # noqa: E402


def _vjp_step(fn):
  """``args -> grads`` of ``fn``'s outputs against all-ones cotangents (the work of a backward)."""
  def step(*args):
    out, vjp = jax.vjp(fn, *args)
    return vjp(jax.tree.map(jnp.ones_like, out))
  return jax.jit(step)


def stages(shape, dtype, chunk, interpret):
  q, k, v, g, _ = _inputs(shape, dtype, "token", seed=0)
  k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dtype)
  beta = jnp.full(q.shape[:3], 0.5, jnp.float32)
  def prepare(backend):
    def fn(k, v, b, g):
      return delta_api.prepare(k, v, b, g, chunk_size=chunk, backend=backend,
                               interpret=interpret if backend == "gpu" else None)
    return fn

  chunks = jax.jit(prepare("xla"))(k, v, beta, g)
  bsz, _, h, dk = q.shape
  s0 = jnp.zeros((bsz, h, dk, v.shape[-1]), jnp.float32)
  gamma = jnp.broadcast_to(chunks.gamma, chunks.gamma.shape)
  u = delta_ref.values_to_tokens(chunks.u0).astype(dtype)

  def state_pass(backend):
    def fn(w, u0, k_end, gamma):
      if backend == "xla":
        return delta_ref.delta_state_pass_xla(w, u0, k_end, gamma, s0)
      from lasp_jax.kernels.delta_rule import pallas_gpu
      return pallas_gpu.delta_state_pass_gpu(w, u0, k_end, gamma, s0, interpret=interpret,
                                             operand_dtype=dtype)
    return fn

  def output(backend):
    def fn(q, k, u, g):
      return la_api.chunk_linear_attention(q, k, u, g, chunk_size=chunk, backend=backend,
                                           interpret=interpret if backend != "xla" else None)
    return fn

  def whole(backend):
    def fn(q, k, v, beta, g):
      return delta_api.chunk_delta_rule(q, k, v, beta, g, chunk_size=chunk, backend=backend,
                                        interpret=interpret if backend != "xla" else None)
    return fn

  cw = (chunks.w, chunks.u0, chunks.k_end, gamma)
  yield "1 prepare (XLA)", prepare("xla"), (k, v, beta, g)
  yield "1 prepare (Pallas)", prepare("gpu"), (k, v, beta, g)
  yield "2 state pass (Pallas bf16)", state_pass("gpu"), cw
  yield "2 state pass (XLA scan)", state_pass("xla"), cw
  yield "3 output (Pallas)", output("gpu"), (q, k, u, g)
  yield "3 output (XLA)", output("xla"), (q, k, u, g)
  yield "all (backend gpu)", whole("gpu"), (q, k, v, beta, g)
  yield "all (backend auto)", whole("auto"), (q, k, v, beta, g)
  yield "all (backend xla)", whole("xla"), (q, k, v, beta, g)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="toy shape, Pallas in interpret mode")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", default="benchmarks/results/delta_stages.json")
  args = p.parse_args(argv)
  shape = (1, 128, 1, 32, 32) if args.small else MAIN_SHAPE
  chunk = 16 if args.small else 64
  interpret = args.small
  rows = []
  print(f"delta rule stages, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"B N H Dk Dv = {shape}, bf16, chunk {chunk}")
  print(f"{'stage':30s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
  for name, fn, args_ in stages(shape, jnp.bfloat16, chunk, interpret):
    fwd = _timed(jax.jit(fn), args_, args.iters)
    both = _timed(_vjp_step(fn), args_, args.iters)
    rows.append(dict(stage=name, fwd_ms=fwd * 1e3, fwd_bwd_ms=both * 1e3))
    print(f"{name:30s} {fwd * 1e3:9.3f} {both * 1e3:11.3f}", flush=True)
    with open(args.out, "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                     shape=list(shape), chunk=chunk, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
