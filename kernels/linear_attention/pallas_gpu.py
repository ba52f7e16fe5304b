"""Chunked linear attention as Pallas Triton kernels (GPU; interpret mode on CPU for tests).

Layout stays SPEC's ``(B, N, H, D)``: a program owns one (batch, head) and walks its chunks in a
``fori_loop`` that carries the float32 state in registers (Triton programs cannot share a grid
axis sequentially the way Mosaic does). Three kernels (math in ``_pallas_common``):

- forward, grid ``(B, H, Dv / block_v)``: each program keeps a ``(Dk, block_v)`` slice of the state;
- ``dq``, grid ``(B, H, Dk / block_k)``: recomputes a ``(block_k, Dv)`` slice of the state forward;
- ``dk, dv``, grid ``(B, H)``: walks the chunks backward carrying ``dS (Dk, Dv)``; or, with
  ``BlockSizes.split_backward``, a ``dk`` kernel over Dk blocks (rows of ``dS``) and a ``dv`` kernel
  over Dv blocks (columns of ``dS``).

Every kernel of every variant that ``benchmarks/kernels.py`` runs compiles for sm_90 (wgmma) within
the shared-memory limit (``benchmarks/kernels.py --compile-sm90``); GPU speed is not measured yet.

Triton needs every loaded tile to have power-of-two sides and its dot operands sides >= 16, so
``chunk_size``, ``Dk``, ``Dv`` and the block sizes must be powers of two >= 16
(:func:`check_shapes`); element offsets are int32, so an array may hold at most 2**31 - 1 elements.
Float32 inputs use IEEE-precision dots (exact, but slow to compile and to run at Dk = 128).
Pallas' Triton backend is deprecated from JAX 0.11 (Mosaic GPU succeeds it) but still ships; these
kernels run on JAX 0.10 and 0.11.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.linear_attention import _pallas_common as common
from kernels.linear_attention._pallas_common import F32, BlockSizes

DEFAULT_BLOCK_SIZES = BlockSizes(chunk_size=64, block_k=64, block_v=64, num_warps=4, num_stages=2)


def _is_pow2_at_least_16(x: int) -> bool:
  return x >= 16 and (x & (x - 1)) == 0


def check_shapes(q, v, block_sizes: BlockSizes):
  """Raises ValueError for shapes the Triton kernels cannot tile, naming the offending value."""
  dk, dv = q.shape[-1], v.shape[-1]
  c = block_sizes.chunk_size
  for name, val in (("chunk_size", c), ("head dim Dk", dk), ("head dim Dv", dv)):
    if not _is_pow2_at_least_16(val):
      raise ValueError(f"backend 'gpu' needs {name} to be a power of two >= 16 (Triton tiles), "
                       f"got {val}")
  for name, blk, full in (("block_k", block_sizes.block_k, dk),
                          ("block_v", block_sizes.block_v, dv)):
    if blk is not None and not (_is_pow2_at_least_16(blk) and full % blk == 0):
      raise ValueError(f"backend 'gpu' needs {name} to be a power of two >= 16 dividing {full}, "
                       f"got {blk}")
  for name, x in (("q", q), ("v", v)):
    if x.size >= 2 ** 31:  # the Triton lowering computes element offsets in int32
      raise ValueError(f"backend 'gpu' indexes with int32 offsets: {name} has {x.size} elements "
                       f"(shape {x.shape}), at most 2**31 - 1 allowed; split the batch")
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"backend 'gpu' takes float32 or bfloat16 inputs, got {q.dtype}")


def _chunk_decay(g_ref, start, c):
  """Decay factors of the chunk of log-decays ``g[start : start + c]``."""
  return common.chunk_decay(g_ref[pl.ds(start, c)][None, :])


def _compiler_params(bs: BlockSizes):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _split(refs, n_in, has_decay):
  """Kernel refs are (inputs..., [g], outputs...)."""
  g_ref = refs[n_in] if has_decay else None
  return refs[:n_in], g_ref, refs[n_in + has_decay:]


def _forward_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, k_ref, v_ref, s0_ref), g_ref, (o_ref, sf_ref) = _split(refs, 4, has_decay)

  def body(i, s):
    start = pl.multiple_of(i * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(g_ref, start, c) if has_decay else None
    o, s = common.forward_chunk(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], s, decay,
                                scale=scale, dtype=dtype)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return s

  sf_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...].astype(F32))


def _dq_kernel(*refs, has_decay, nc, c, scale, dtype):
  (k_ref, v_ref, do_ref, s0_ref), g_ref, (dq_ref,) = _split(refs, 4, has_decay)

  def body(i, s):
    start = pl.multiple_of(i * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(g_ref, start, c) if has_decay else None
    dq, s = common.dq_chunk(k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], s, decay,
                            scale=scale, dtype=dtype)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    return s

  jax.lax.fori_loop(0, nc, body, s0_ref[...].astype(F32))


def _dkv_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, k_ref, v_ref, do_ref, dsf_ref), g_ref, (dk_ref, dv_ref, ds0_ref) = _split(
      refs, 5, has_decay)

  def body(j, ds):
    start = pl.multiple_of((nc - 1 - j) * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(g_ref, start, c) if has_decay else None
    dk, dv, ds = common.dkv_chunk(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :],
                                  ds, decay, scale=scale, dtype=dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return ds

  ds0_ref[...] = jax.lax.fori_loop(0, nc, body, dsf_ref[...].astype(F32))


def _dk_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, v_ref, do_ref, dsf_ref), g_ref, (dk_ref,) = _split(refs, 4, has_decay)

  def body(j, ds):
    start = pl.multiple_of((nc - 1 - j) * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(g_ref, start, c) if has_decay else None
    dk, ds = common.dk_chunk(q_ref[rows, :], v_ref[rows, :], do_ref[rows, :], ds, decay,
                             scale=scale, dtype=dtype)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    return ds

  jax.lax.fori_loop(0, nc, body, dsf_ref[...].astype(F32))


def _dv_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, k_ref, do_ref, dsf_ref), g_ref, (dv_ref, ds0_ref) = _split(refs, 4, has_decay)

  def body(j, ds):
    start = pl.multiple_of((nc - 1 - j) * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(g_ref, start, c) if has_decay else None
    dv, ds = common.dv_chunk(q_ref[rows, :], k_ref[rows, :], do_ref[rows, :], ds, decay,
                             scale=scale, dtype=dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return ds

  ds0_ref[...] = jax.lax.fori_loop(0, nc, body, dsf_ref[...].astype(F32))


# ------------------------------------------------------------------------- pallas_call builders


def _seq(n, d, channel_block=False):
  """Block: the whole sequence of one (batch, head); all ``d`` channels or block ``j`` of them."""
  if channel_block:
    return pl.BlockSpec((None, n, None, d), lambda b, h, j: (b, 0, h, j))
  return pl.BlockSpec((None, n, None, d), lambda b, h, *_: (b, 0, h, 0))


def _state(dk, dv, block_axis=None):
  """Block: one (batch, head)'s ``(Dk, Dv)`` state, or a slice of it along ``block_axis``."""
  if block_axis == 0:
    return pl.BlockSpec((None, None, dk, dv), lambda b, h, j: (b, h, j, 0))
  if block_axis == 1:
    return pl.BlockSpec((None, None, dk, dv), lambda b, h, j: (b, h, 0, j))
  return pl.BlockSpec((None, None, dk, dv), lambda b, h, *_: (b, h, 0, 0))


def _decay_spec(n):
  return pl.BlockSpec((None, n, None), lambda b, h, *_: (b, 0, h))


def _static(q, g, cfg):
  c = cfg.block_sizes.chunk_size
  return dict(has_decay=g is not None, nc=q.shape[1] // c, c=c, scale=cfg.scale, dtype=q.dtype)


def _grad_dtype(x, g):
  return F32 if g is not None else x.dtype


def _call(kernel, name, like, g, cfg, *, grid, in_specs, args, out_specs, out_shape):
  """One Triton kernel over ``grid``; the decay, when there is one, is its last input."""
  if g is not None:
    in_specs = [*in_specs, _decay_spec(like.shape[1])]
    args = [*args, g]
  return pl.pallas_call(
      functools.partial(kernel, **_static(like, g, cfg)),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(cfg.block_sizes),
      interpret=cfg.interpret,
      name=name,
  )(*args)


def forward(q, k, v, g, s0, cfg):
  """``(o (B, N, H, Dv) in q's dtype, s_final (B, H, Dk, Dv) float32)``."""
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  bv = cfg.block_sizes.block_v or dv
  return _call(
      _forward_kernel, "linear_attention_fwd", q, g, cfg, grid=(bsz, h, dv // bv),
      in_specs=[_seq(n, dk), _seq(n, dk), _seq(n, bv, True), _state(dk, bv, 1)],
      args=[q, k, v, s0],
      out_specs=[_seq(n, bv, True), _state(dk, bv, 1)],
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)])


def dq(k, v, do, g, s0, cfg):
  """``dq (B, N, H, Dk)``: float32 with a decay, else k's dtype."""
  bsz, n, h, dk = k.shape
  dv = v.shape[-1]
  bk = cfg.block_sizes.block_k or dk
  return _call(
      _dq_kernel, "linear_attention_dq", k, g, cfg, grid=(bsz, h, dk // bk),
      in_specs=[_seq(n, bk, True), _seq(n, dv), _seq(n, dv), _state(bk, dv, 0)],
      args=[k, v, do, s0],
      out_specs=_seq(n, bk, True),
      out_shape=jax.ShapeDtypeStruct(k.shape, _grad_dtype(k, g)))


def dkv(q, k, v, do, g, ds_final, cfg):
  """``(dk, dv, d initial_state)``; dk float32 with a decay, dv in v's dtype, dS0 float32."""
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  if cfg.block_sizes.split_backward:
    return _dk_split(q, v, do, g, ds_final, cfg) + _dv_split(q, k, do, g, ds_final, cfg)
  return _call(
      _dkv_kernel, "linear_attention_dkv", q, g, cfg, grid=(bsz, h),
      in_specs=[_seq(n, dk), _seq(n, dk), _seq(n, dv), _seq(n, dv), _state(dk, dv)],
      args=[q, k, v, do, ds_final],
      out_specs=[_seq(n, dk), _seq(n, dv), _state(dk, dv)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, _grad_dtype(k, g)),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)])


def _dk_split(q, v, do, g, ds_final, cfg):
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  bk = cfg.block_sizes.block_k or dk
  return (_call(
      _dk_kernel, "linear_attention_dk", q, g, cfg, grid=(bsz, h, dk // bk),
      in_specs=[_seq(n, bk, True), _seq(n, dv), _seq(n, dv), _state(bk, dv, 0)],
      args=[q, v, do, ds_final],
      out_specs=_seq(n, bk, True),
      out_shape=jax.ShapeDtypeStruct(q.shape, _grad_dtype(q, g))),)


def _dv_split(q, k, do, g, ds_final, cfg):
  bsz, n, h, dk = q.shape
  dv = do.shape[-1]
  bv = cfg.block_sizes.block_v or dv
  return tuple(_call(
      _dv_kernel, "linear_attention_dv", q, g, cfg, grid=(bsz, h, dv // bv),
      in_specs=[_seq(n, dk), _seq(n, dk), _seq(n, bv, True), _state(dk, bv, 1)],
      args=[q, k, do, ds_final],
      out_specs=[_seq(n, bv, True), _state(dk, bv, 1)],
      out_shape=[jax.ShapeDtypeStruct(do.shape, do.dtype),
                 jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)]))


def chunk_linear_attention_gpu(q, k, v, log_decay=None, *, scale=1.0, initial_state=None,
                               block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Causal chunked linear attention through the Triton kernels.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; all float32 or all bfloat16.
    log_decay: None, ``(H,)`` or ``(B, N, H)`` (the per-channel form is the caller's business:
      ``api.chunk_linear_attention`` sends it to the XLA path).
    scale: multiplies q. initial_state: None or ``(B, H, Dk, Dv)``.
    block_sizes: tiling; None uses ``DEFAULT_BLOCK_SIZES``.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    ``(o (B, N, H, Dv) in q's dtype, final_state (B, H, Dk, Dv) float32)``.
  """
  bs = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
  dk, dv = q.shape[-1], v.shape[-1]
  # Default blocks larger than a small head dim shrink to it.
  bs = dataclasses.replace(bs, block_k=min(bs.block_k or dk, dk), block_v=min(bs.block_v or dv, dv))
  check_shapes(q, v, bs)
  return common.run(q, k, v, log_decay, initial_state, common.Config(
      forward=forward, dq=dq, dkv=dkv, block_sizes=bs, scale=float(scale),
      interpret=bool(interpret)))
