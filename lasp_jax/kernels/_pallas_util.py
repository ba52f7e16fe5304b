"""What every family's Pallas kernels share: the tensor-core matmul, the Triton tiling rule and
the TPU kernels' chunk-by-chunk block specs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32

_CONTRACT = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}


def matmul(a, b, contract, dtype=F32):
  """``a @ b`` with ``dtype`` operands and float32 accumulation (design §15).

  ``contract``: "nn" a @ b, "nt" a @ b^T, "tn" a^T @ b. bf16 operands run on the tensor cores /
  MXU; float32 ones ask for full precision (IEEE on CUDA cores: TPU would otherwise use bf16
  passes and Triton TF32), so keep those off hot paths.
  """
  precision = jax.lax.Precision.HIGHEST if dtype == F32 else None
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (_CONTRACT[contract], ((), ())),
                             precision=precision, preferred_element_type=F32)


def matmul_split(a, b, contract, dtype=F32):
  """``a @ b`` for float32 values ``a``, ``b`` to about float32 accuracy on tensor cores.

  With ``dtype`` bfloat16, each operand is split into a bf16 head and a bf16 tail (``x - head``)
  and three bf16 dots with float32 accumulation add up ``head head + head tail + tail head``:
  a relative error near ``2**-16`` instead of bf16's ``2**-9``, at three tensor-core dots (the
  idea of ``DotAlgorithmPreset.BF16_BF16_F32_X3``, written out because Triton's lowering takes
  only TF32 presets). With ``dtype`` float32: one IEEE dot (:func:`matmul`).
  """
  if dtype == F32:
    return matmul(a, b, contract, F32)
  a, b = a.astype(F32), b.astype(F32)
  a_hi, b_hi = a.astype(dtype), b.astype(dtype)
  a_lo, b_lo = (a - a_hi.astype(F32)).astype(dtype), (b - b_hi.astype(F32)).astype(dtype)
  return (matmul(a_hi, b_hi, contract, dtype) + matmul(a_hi, b_lo, contract, dtype)
          + matmul(a_lo, b_hi, contract, dtype))


def is_pow2_at_least_16(x: int) -> bool:
  """Triton loads power-of-two tiles and its dots need sides >= 16."""
  return x >= 16 and (x & (x - 1)) == 0


def chunk_block(block, nc: int, reverse: bool) -> pl.BlockSpec:
  """One chunk's block on the TPU kernels' grid ``(b, h, i)``: ``block`` is the block shape, None
  for the squeezed batch and head dims, and the chunk is the third block index (the backward
  passes walk the ``nc`` chunks from the last one)."""
  rest = (0,) * (len(block) - 3)
  if reverse:
    return pl.BlockSpec(block, lambda b, h, i: (b, h, nc - 1 - i, *rest))
  return pl.BlockSpec(block, lambda b, h, i: (b, h, i, *rest))


def chunk_tokens(c: int, d: int | None = None) -> pl.BlockSpec:
  """A chunk-parallel program's block on the grid ``(b, h, i)``: chunk ``i`` of one (batch, head)
  of a ``(B, N, H)`` or ``(B, N, H, D)`` array, read in place (no transpose to head-major)."""
  if d is None:
    return pl.BlockSpec((None, c, None), lambda b, h, i: (b, i, h))
  return pl.BlockSpec((None, c, None, d), lambda b, h, i: (b, i, h, 0))


def state_block(dk: int, dv: int) -> pl.BlockSpec:
  """A ``(B, H, Dk, Dv)`` state, one ``(Dk, Dv)`` block per ``(b, h)``, the same at every chunk."""
  return pl.BlockSpec((None, None, dk, dv), lambda b, h, i: (b, h, 0, 0))


def tpu_chunk_call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, interpret):
  """A Mosaic ``pallas_call`` over ``(b, h, chunk)``: batch and heads in parallel, the chunks in
  order, because the state is carried from one to the next in scratch memory."""
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )
