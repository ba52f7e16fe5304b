"""Baselines: Ulysses (DeepSpeed-Ulysses style) sequence parallelism, all-to-all over heads.

Each device trades its sequence shard of all heads for the full sequence of ``H / W`` heads (one
all-to-all per input), attends locally over the whole sequence, and trades back (one all-to-all):
4 all-to-alls of ``B C H D (W - 1) / W`` elements forward (design §9), mirrored backward.
Needs ``H % W == 0``. Contiguous layout.

- ``ulysses_softmax``: local attention is the flash kernel (``lasp_jax.kernels.attention``) LASP-2H uses. With GQA,
  key/value heads are repeated up to ``H`` first when ``Hkv % W != 0`` (more traffic, as
  Ulysses needs whole heads per device).
- ``ulysses_linear``: local attention is ``lasp_jax.linear_attention`` (the chunked kernels);
  a per-token decay travels with its heads (a fifth all-to-all), a per-head one is sliced locally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lasp_jax.kernels.attention import flash
from lasp_jax.kernels.linear_attention.api import resolve_backend, validate_inputs
from lasp_jax.baselines import _common
from lasp_jax.sequence_parallel.lasp2 import linear_attention


def _check_heads(heads, w_size, what="query heads H"):
  if heads % w_size:
    raise ValueError(f"Ulysses needs {what}={heads} to be a multiple of the sequence-parallel "
                     f"axis size W={w_size} (H % W == 0)")


def _seq_to_heads(x, axis_name):
  """``(B, C, H, ...) -> (B, N, H / W, ...)``: one all-to-all."""
  return jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def _heads_to_seq(x, axis_name):
  """``(B, N, H / W, D) -> (B, C, H, D)``: one all-to-all."""
  return jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_softmax(q, k, v, *, axis_name, causal=True, scale=None):
  """Ulysses softmax attention on local shards, inside a ``jax.shard_map`` over ``axis_name``.

  Args:
    q: ``(B, C, H, D)``; k, v: ``(B, C, Hkv, D)``; ``H % W == 0`` and ``H % Hkv == 0``.
    causal: mask by global position. scale: defaults to ``D ** -0.5``.

  Returns:
    ``o (B, C, H, D)`` in q's dtype.
  """
  flash.validate_inputs(q, k, v)
  w_size = jax.lax.axis_size(axis_name)
  heads, hkv = q.shape[2], k.shape[2]
  _check_heads(heads, w_size)
  if hkv % w_size:
    k, v = (jnp.repeat(x, heads // hkv, axis=2) for x in (k, v))
  with jax.named_scope("ulysses_softmax"):
    q_h, k_h, v_h = (_seq_to_heads(x, axis_name) for x in (q, k, v))
    o_h = flash.flash_attention(q_h, k_h, v_h, causal=causal, scale=scale)
    return _heads_to_seq(o_h, axis_name)


def ulysses_softmax_attention(q, k, v, *, mesh=None, seq_axis="sp", batch_axis=None, causal=True,
                              scale=None):
  """``ulysses_softmax`` on global arrays ``q (B, N, H, D)``, ``k, v (B, N, Hkv, D)``; mesh
  arguments as ``lasp_jax.lasp2_attention``."""
  flash.validate_inputs(q, k, v)
  mesh, w = _common.mesh_sizes(mesh, seq_axis, batch_axis, q.shape[1], q.shape[0], 1, "")
  _check_heads(q.shape[2], w)

  def fn(q, k, v, _g, **kw):
    return ulysses_softmax(q, k, v, **kw)

  return _common.run_sharded(fn, mesh, seq_axis, batch_axis, q, k, v, None, causal=causal,
                             scale=scale)


def ulysses_linear(q, k, v, log_decay=None, *, axis_name, causal=True, scale=1.0, chunk_size=64,
                   backend="auto"):
  """Ulysses linear attention on local shards, inside a ``jax.shard_map`` over ``axis_name``.

  Args:
    q, k: ``(B, C, H, Dk)``; v: ``(B, C, H, Dv)``; ``H % W == 0``; ``N = W C`` a multiple of
      ``chunk_size``.
    log_decay: None, ``(H,)`` (replicated), ``(B, C, H)`` or ``(B, C, H, Dk)`` (sharded like q).
    Others as ``lasp_jax.linear_attention``.

  Returns:
    ``o (B, C, H, Dv)`` in q's dtype.
  """
  validate_inputs(q, k, v, log_decay)
  w_size = jax.lax.axis_size(axis_name)
  heads = q.shape[2]
  _check_heads(heads, w_size)
  with jax.named_scope("ulysses_linear"):
    q_h, k_h, v_h = (_seq_to_heads(x, axis_name) for x in (q, k, v))
    if log_decay is None:
      g_h = None
    elif log_decay.ndim == 1:
      local = heads // w_size
      g_h = jax.lax.dynamic_slice_in_dim(log_decay, jax.lax.axis_index(axis_name) * local, local)
    else:
      g_h = _seq_to_heads(log_decay, axis_name)
    o_h = linear_attention(q_h, k_h, v_h, g_h, causal=causal, scale=scale, chunk_size=chunk_size,
                           backend=backend)
    return _heads_to_seq(o_h, axis_name)


def ulysses_linear_attention(q, k, v, log_decay=None, *, mesh=None, seq_axis="sp",
                             batch_axis=None, causal=True, scale=1.0, chunk_size=64,
                             backend="auto"):
  """``ulysses_linear`` on global arrays ``(B, N, H, D)``; arguments as
  ``lasp_jax.lasp2_attention`` (contiguous layout)."""
  validate_inputs(q, k, v, log_decay)
  if log_decay is not None and not causal:
    raise ValueError("log_decay must be None when causal=False")
  n = q.shape[1]
  mesh, w = _common.mesh_sizes(mesh, seq_axis, batch_axis, n, q.shape[0], 1, "")
  _check_heads(q.shape[2], w)
  if n % chunk_size:
    raise ValueError(f"sequence length N={n} is not a multiple of chunk_size={chunk_size}")
  kb = resolve_backend(backend, q, v, log_decay, chunk_size)
  return _common.run_sharded(ulysses_linear, mesh, seq_axis, batch_axis, q, k, v, log_decay,
                             check_vma=kb == "xla", causal=causal, scale=scale,
                             chunk_size=chunk_size, backend=backend)
