"""What every family's Pallas kernels share: the tensor-core matmul and the Triton tiling rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
