"""The GPU kernels' chunk-parallel passes for decays (``BlockSizes.chunk_parallel_forward`` /
``chunk_parallel_backward``; interpret mode) vs the float64 recurrence: the exactness cases of
``test_linear_attention_kernels`` with them as the default, and Dv blocks with Dk != Dv. A module
of its own so that pytest-xdist's ``--dist loadfile`` can run it beside the sequential kernels'.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lasp_jax import kernels
from lasp_jax.kernels.linear_attention import pallas_gpu
from tests.kernels import test_linear_attention_kernels as la_tests
from tests.references import f64, linear_recurrence, rel_err

CHUNK_PARALLEL_CASES = [
    ("packed documents, token decay",
     lambda: la_tests.test_packed_documents_restart_the_state("gpu", "token")),
    pytest.param("-inf gates", lambda: la_tests.test_hard_reset_gate_is_exact("gpu", "-inf"),
                 marks=pytest.mark.slow),
    pytest.param("bf16 (H,) decay gradient", lambda: la_tests.test_bfloat16_head_decay_gradient(),
                 marks=pytest.mark.slow),
    pytest.param("bf16 token decay", lambda: la_tests.test_bfloat16_token_decay("gpu"),
                 marks=pytest.mark.slow),
    pytest.param("NaN in a document",
                 lambda: la_tests.test_nan_in_a_document_stays_in_it_forward_and_backward(
                     "gpu", "-inf gate"),
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,case", CHUNK_PARALLEL_CASES)
def test_gpu_chunk_parallel_passes_the_exactness_cases(monkeypatch, name, case):
  """``BlockSizes.chunk_parallel_forward`` and ``chunk_parallel_backward`` (stored states, one
  program per chunk) as the GPU default, through the same float64 checks as the sequential
  kernels."""
  bs = pallas_gpu.DEFAULT_BLOCK_SIZES
  monkeypatch.setattr(pallas_gpu, "DEFAULT_BLOCK_SIZES", dataclasses.replace(
      bs, chunk_parallel_forward=True, chunk_parallel_backward=True))
  q, k, v, g, s0 = la_tests._data(3, 1, 64, 1, 32, 32, "token")
  grad = jax.grad(lambda q: jnp.sum(kernels.chunk_linear_attention(
      q, k, v, g, chunk_size=16, backend="gpu", interpret=True)[0]))
  jaxpr = str(jax.make_jaxpr(grad)(q))
  assert "linear_attention_fwd_chunks" in jaxpr and "linear_attention_bwd_chunks" in jaxpr
  case()


@pytest.mark.parametrize("forward", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gpu_chunk_parallel_with_channel_blocks_is_exact(forward):
  """The state passes over two Dv blocks each, Dk != Dv, an initial state, the chunk-parallel
  backward with either forward: float64 recurrence."""
  q, k, v, g, s0 = la_tests._data(5, 2, 64, 2, 32, 64, "token")
  bs = pallas_gpu.BlockSizes(chunk_size=16, block_k=16, block_v=32, chunk_parallel_forward=forward,
                             chunk_parallel_backward=True)

  def fn(q, k, v, g, s0):
    return pallas_gpu.chunk_linear_attention_gpu(q, k, v, g, initial_state=s0, block_sizes=bs,
                                                 interpret=True)
  weights = (np.cos(np.arange(v.size)).reshape(v.shape), np.ones(s0.shape))
  got = (*fn(q, k, v, g, s0), *jax.grad(la_tests._loss(fn, weights), argnums=(0, 1, 2, 3, 4))(
      q, k, v, g, s0))
  ref = lambda q, k, v, g, s0: linear_recurrence(q, k, v, g, initial_state=s0)  # noqa: E731
  want = (*f64(ref, q, k, v, g, s0), *f64(lambda *a: jax.grad(
      la_tests._loss(ref, weights), argnums=(0, 1, 2, 3, 4))(*a), q, k, v, g, s0))
  for name, a, b in zip(("o", "final_state", "dq", "dk", "dv", "dg", "ds0"), got, want):
    assert rel_err(a, b) < 2e-4, (name, rel_err(a, b))
