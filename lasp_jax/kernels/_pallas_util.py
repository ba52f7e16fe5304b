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
