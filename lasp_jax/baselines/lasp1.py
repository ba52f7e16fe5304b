"""Baseline: LASP-1, the ring of states (causal linear attention, contiguous layout).

LASP-1 is what LASP-2 replaces. Each device computes its local zero-initial state ``St_t`` and the
local chunked attention exactly as LASP-2 does (the same kernels, so only the communication
differs); the incoming state ``S_in(t)`` then travels device to device:

    S_in(0) = 0,    S_out(t) = diag(exp(gamma_t)) S_in(t) + St_t,    S_in(t + 1) = S_out(t)

realised as ``W - 1`` sequential ``ppermute`` steps of one float32 state ``(B, H, Dk, Dv)`` each
(every device sends at every step in SPMD; after step ``s`` devices ``0..s+1`` hold their final
``S_in``). Only the state travels: each device's own total decay ``gamma_t`` is local. The backward
pass is autodiff, whose transpose of each ``ppermute`` is a ``ppermute`` the other way: ``W - 1``
sequential steps back. design §9 lists the cost next to LASP-2's single all-gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax import kernels
from lasp_jax.kernels.linear_attention.api import check_chunk_size, resolve_backend, validate_inputs
from lasp_jax.baselines import _common
from lasp_jax.sequence_parallel import lasp2 as lasp2_lib


def lasp1(q, k, v, log_decay=None, *, axis_name, causal=True, scale=1.0, chunk_size=64,
          backend="auto"):
  """LASP-1 on local shards, inside the caller's ``jax.shard_map`` over ``axis_name``.

  Args:
    q, k: ``(B, C, H, Dk)``; v: ``(B, C, H, Dv)``: this device's contiguous shard.
    log_decay: None, ``(H,)`` (replicated), ``(B, C, H)`` or ``(B, C, H, Dk)`` (sharded like q).
    causal: must be True (LASP-1 is a causal method).
    Others as ``lasp_jax.lasp2``.

  Returns:
    ``o (B, C, H, Dv)`` in q's dtype.
  """
  validate_inputs(q, k, v, log_decay, scale=scale)
  check_chunk_size(chunk_size)
  _common.check_causal_linear(log_decay, causal, "lasp1")
  bsz, c_local, heads, _ = q.shape
  if c_local % chunk_size:
    raise ValueError(f"local sequence length {c_local} is not a multiple of chunk_size={chunk_size}")
  w_size = jax.lax.axis_size(axis_name)
  b_in, to_end, gamma = lasp2_lib.segment_decays(log_decay, bsz, c_local, heads)

  with jax.named_scope("lasp1_state_ring"):
    st = lasp2_lib.local_state(k, v, to_end)                                 # (B, H, Dk, Dv)
    decay = None if gamma is None else jnp.exp(gamma)[..., None]             # (B, H, Dg, 1)
    forward = [(i, i + 1) for i in range(w_size - 1)]   # device 0 receives nothing: zeros
    s_out, s_in = st, jnp.zeros_like(st)
    for _ in range(w_size - 1):
      s_in = jax.lax.ppermute(s_out, axis_name, forward)
      s_out = st + (s_in if decay is None else decay * s_in)

  with jax.named_scope("lasp1_local"):
    o_local, _ = kernels.chunk_linear_attention(
        q, k, v, log_decay, scale=scale, chunk_size=chunk_size,
        backend=resolve_backend(backend, q, v, log_decay, chunk_size))

  with jax.named_scope("lasp1_combine"):
    return lasp2_lib.add_incoming(o_local, q, b_in, s_in, scale).astype(q.dtype)


def lasp1_attention(q, k, v, log_decay=None, *, mesh=None, seq_axis="sp", batch_axis=None,
                    causal=True, scale=1.0, chunk_size=64, backend="auto"):
  """LASP-1 on global arrays ``(B, N, H, D)`` (contiguous layout); arguments as
  ``lasp_jax.lasp2_attention``. Returns ``o (B, N, H, Dv)`` sharded like q."""
  validate_inputs(q, k, v, log_decay, scale=scale)
  check_chunk_size(chunk_size)
  _common.check_causal_linear(log_decay, causal, "lasp1_attention")
  mesh, _ = _common.mesh_sizes(mesh, seq_axis, batch_axis, q.shape[1], q.shape[0], chunk_size,
                               "chunk_size")
  kb = resolve_backend(backend, q, v, log_decay, chunk_size)
  return _common.run_sharded(lasp1, mesh, seq_axis, batch_axis, q, k, v, log_decay,
                             check_vma=kb == "xla", causal=causal, scale=scale,
                             chunk_size=chunk_size, backend=backend)
