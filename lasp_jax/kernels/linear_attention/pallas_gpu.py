"""Chunked linear attention as Pallas Triton kernels (GPU; interpret mode on CPU for tests).

Layout stays ``(B, N, H, D)`` (design §1): a program owns one (batch, head) and walks its chunks
in a ``fori_loop`` that carries the float32 state in registers (Triton programs cannot share a
grid axis sequentially the way Mosaic does). Three kernels (math in ``_pallas_common``):

- forward, grid ``(B, H, Dv / block_v)``: each program keeps a ``(Dk, block_v)`` slice of the state;
- ``dq``, grid ``(B, H, Dk / block_k)``: recomputes a ``(block_k, Dv)`` slice of the state forward;
- ``dk, dv``, grid ``(B, H)``: walks the chunks backward carrying ``dS (Dk, Dv)``; or, with
  ``BlockSizes.split_backward``, a ``dk`` kernel over Dk blocks (rows of ``dS``) and a ``dv`` kernel
  over Dv blocks (columns of ``dS``).

With a decay and ``BlockSizes.chunk_parallel_forward`` / ``chunk_parallel_backward`` (not yet timed
on a GPU, so off by default), the sequential kernels only carry states (``states``: the state
before every chunk; ``dstates``: the cotangent after it) into HBM and one program per chunk, grid
``(B, H, NC)``, does the rest (``fwd_chunks``: the output; ``bwd_chunks``: dq, dk, dv and the
decay rows).

Measured on an H200 (``benchmarks/results/kernels_gpu.json``, B8 N8192 H16 D128 bf16 fwd+bwd):
no decay 1.52 ms (45% of the roofline, 8.6x the XLA path), per-token decay 5.88 ms (3.0x XLA).
With a decay, the kernels read per-chunk prefix sums (``_pallas_common.chunk_prefix``) as rows and
columns; the dq pass also writes each chunk's incoming state for the decay gradient.

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

from lasp_jax.kernels._pallas_util import chunk_tokens, is_pow2_at_least_16
from lasp_jax.kernels.linear_attention import _pallas_common as common
from lasp_jax.kernels.linear_attention._pallas_common import F32, BlockSizes

# split_backward: H200, 2026-12-04 (benchmarks/results/kernels_gpu_sweep.json), B8 N8192 H16 D128
# bf16 fwd+bwd: no decay 1.54 ms split vs 2.53 ms fused, per-token decay 7.51 vs 7.87 ms.
# The chunk-parallel backward's kernel holds q, k, v, dO and two (Dk, Dv) states per program.
CHUNK_PARALLEL_NUM_WARPS = 8
DEFAULT_BLOCK_SIZES = BlockSizes(chunk_size=64, block_k=64, block_v=64, num_warps=4, num_stages=2,
                                 split_backward=True)


def check_shapes(q, v, block_sizes: BlockSizes):
  """Raises ValueError for shapes the Triton kernels cannot tile, naming the offending value."""
  dk, dv = q.shape[-1], v.shape[-1]
  c = block_sizes.chunk_size
  for name, val in (("chunk_size", c), ("head dim Dk", dk), ("head dim Dv", dv)):
    if not is_pow2_at_least_16(val):
      raise ValueError(f"backend 'gpu' needs {name} to be a power of two >= 16 (Triton tiles), "
                       f"got {val}")
  for name, blk, full in (("block_k", block_sizes.block_k, dk),
                          ("block_v", block_sizes.block_v, dv)):
    if blk is not None and not (is_pow2_at_least_16(blk) and full % blk == 0):
      raise ValueError(f"backend 'gpu' needs {name} to be a power of two >= 16 dividing {full}, "
                       f"got {blk}")
  for name, x in (("q", q), ("v", v)):
    if x.size >= 2 ** 31:  # the Triton lowering computes element offsets in int32
      raise ValueError(f"backend 'gpu' indexes with int32 offsets: {name} has {x.size} elements "
                       f"(shape {x.shape}), at most 2**31 - 1 allowed; split the batch")
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"backend 'gpu' takes float32 or bfloat16 inputs, got {q.dtype}")


def _chunk_decay(decay_refs, start, c):
  """Decay factors of the chunk of tokens ``[start, start + c)`` (None without a decay)."""
  if decay_refs is None:
    return None
  b_ref, seg_ref = decay_refs
  rows, last = pl.ds(start, c), pl.ds(start + c - 1, 1)
  b, seg = b_ref[rows], seg_ref[rows]
  return common.chunk_decay(b[None, :], seg[None, :], columns=(
      b[:, None], seg[:, None], b_ref[last][None, :], seg_ref[last][None, :]))


def _compiler_params(bs: BlockSizes):
  return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _split(refs, n_in, has_decay):
  """Kernel refs are (inputs..., [b, seg], outputs...)."""
  decay_refs = tuple(refs[n_in:n_in + 2]) if has_decay else None
  return refs[:n_in], decay_refs, refs[n_in + 2 * has_decay:]


def _forward_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, k_ref, v_ref, s0_ref), decay_refs, (o_ref, sf_ref, flag_ref) = _split(refs, 4,
                                                                                 has_decay)

  def body(i, carry):
    s, flag = carry
    start = pl.multiple_of(i * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(decay_refs, start, c)
    o, s = common.forward_chunk(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], s, decay,
                                scale=scale, dtype=dtype)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return s, jnp.maximum(flag, common.nonfinite_flag(o))

  sf_ref[...], flag_ref[...] = jax.lax.fori_loop(
      0, nc, body, (s0_ref[...].astype(F32), jnp.zeros((1, 1), F32)))


def _dq_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, k_ref, v_ref, do_ref, s0_ref), decay_refs, out = _split(refs, 5, has_decay)
  dq_ref = out[0]
  dv = v_ref.shape[-1]

  def body(i, s):
    start = pl.multiple_of(i * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(decay_refs, start, c)
    if has_decay:   # the state before chunk i, for the dkv pass's flux term of dg
      q_state_ref, states_ref = out[1:]
      states_ref[:, pl.ds(pl.multiple_of(i * dv, dv), dv)] = s.astype(states_ref.dtype)
    dq, dq_state, s = common.dq_chunk(k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], s, decay,
                                      scale=scale, dtype=dtype)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    if has_decay:
      q_state_ref[rows] = common.row_dot(q_ref[rows, :], dq_state)
    return s

  jax.lax.fori_loop(0, nc, body, s0_ref[...].astype(F32))


def _write_rows(row_refs, rows, decay_rows):
  for ref, x in zip(row_refs, decay_rows):
    ref[rows] = x


def _dk_kernel(*refs, with_dv, has_decay, nc, c, scale, dtype):
  """The reverse pass over chunks: dk, dv and dS0 (``with_dv``), or dk alone for a Dk slice (the
  split backward, whose dv and dS0 come from ``_dv_kernel``); plus the decay's row sums."""
  n_in = 6 if has_decay else 5
  ins, decay_refs, out = _split(refs, n_in, has_decay)
  q_ref, k_ref, v_ref, do_ref, dsf_ref = ins[:5]
  dk_ref, n_out = out[0], (3 if with_dv else 1)
  dv = v_ref.shape[-1]

  def body(j, ds):
    n = nc - 1 - j
    start = pl.multiple_of(n * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(decay_refs, start, c)
    s_before = ins[5][:, pl.ds(pl.multiple_of(n * dv, dv), dv)] if has_decay else None
    chunk = (q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], ds, decay)
    if with_dv:
      dk, dv_, ds, decay_rows = common.dkv_chunk(*chunk, scale=scale, dtype=dtype,
                                                 s_before=s_before)
      out[1][rows, :] = dv_.astype(out[1].dtype)
    else:
      dk, ds, decay_rows = common.dk_chunk(*chunk, scale=scale, dtype=dtype, s_before=s_before)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    if has_decay:
      _write_rows(out[n_out:], rows, decay_rows)
    return ds

  ds0 = jax.lax.fori_loop(0, nc, body, dsf_ref[...].astype(F32))
  if with_dv:
    out[2][...] = ds0


def _dv_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, k_ref, do_ref, dsf_ref), decay_refs, (dv_ref, ds0_ref) = _split(refs, 4, has_decay)

  def body(j, ds):
    start = pl.multiple_of((nc - 1 - j) * c, c)
    rows = pl.ds(start, c)
    decay = _chunk_decay(decay_refs, start, c)
    dv, ds = common.dv_chunk(q_ref[rows, :], k_ref[rows, :], do_ref[rows, :], ds, decay,
                             scale=scale, dtype=dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return ds

  ds0_ref[...] = jax.lax.fori_loop(0, nc, body, dsf_ref[...].astype(F32))


def _chunk_states_kernel(*refs, has_decay, nc, c, scale, dtype):
  """The state before every chunk and the final state, for the chunk-parallel passes (a Dv slice
  per program)."""
  del scale
  (k_ref, v_ref, s0_ref), decay_refs, (st_ref, sf_ref) = _split(refs, 3, has_decay)
  dk = k_ref.shape[-1]

  def body(i, s):
    start = pl.multiple_of(i * c, c)
    rows = pl.ds(start, c)
    st_ref[pl.ds(pl.multiple_of(i * dk, dk), dk), :] = s.astype(st_ref.dtype)
    return common.state_step(s, k_ref[rows, :], v_ref[rows, :],
                              _chunk_decay(decay_refs, start, c), dtype)

  sf_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...].astype(F32))


def decay_of_chunk(b_ref, seg_ref, c):
  """:class:`common.Decay` of the one chunk a chunk-parallel program holds, from the refs of its
  ``(c,)`` prefix sums (:func:`common.chunk_prefix`)."""
  b, seg = b_ref[...], seg_ref[...]
  last = pl.ds(c - 1, 1)
  return common.chunk_decay(b[None, :], seg[None, :], columns=(
      b[:, None], seg[:, None], b_ref[last][None, :], seg_ref[last][None, :]))


def _parallel_fwd_kernel(q_ref, k_ref, v_ref, st_ref, b_ref, seg_ref, o_ref, flag_ref, *, c,
                         scale, dtype):
  o = common.output_chunk(q_ref[...], k_ref[...], v_ref[...], st_ref[...],
                          decay_of_chunk(b_ref, seg_ref, c), scale=scale, dtype=dtype)
  o_ref[...] = o.astype(o_ref.dtype)
  flag_ref[...] = common.nonfinite_flag(o)


def _chunk_dstates_kernel(*refs, has_decay, nc, c, scale, dtype):
  """The state cotangent after every chunk, walking back from ``dS_final``, and ``dS0``."""
  (q_ref, do_ref, dsf_ref), decay_refs, (dst_ref, ds0_ref) = _split(refs, 3, has_decay)
  dk = q_ref.shape[-1]

  def body(j, ds):
    n = nc - 1 - j
    start = pl.multiple_of(n * c, c)
    rows = pl.ds(start, c)
    dst_ref[pl.ds(pl.multiple_of(n * dk, dk), dk), :] = ds.astype(dst_ref.dtype)
    decay = _chunk_decay(decay_refs, start, c)
    return common.state_cotangent_step(q_ref[rows, :], do_ref[rows, :], ds, decay, scale=scale,
                                       dtype=dtype)

  ds0_ref[...] = jax.lax.fori_loop(0, nc, body, dsf_ref[...].astype(F32))


def _parallel_bwd_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, dst_ref, b_ref, seg_ref,
                         dq_ref, dk_ref, dv_ref, qs_ref, inc_ref, ks_ref, flux_ref, *, c, scale,
                         dtype):
  decay = decay_of_chunk(b_ref, seg_ref, c)
  out = dict(dq=dq_ref, dk=dk_ref, dv=dv_ref, q_state=qs_ref, in_chunk=inc_ref, k_state=ks_ref,
             flux=flux_ref)

  def emit(name, value):
    out[name][...] = value.astype(out[name].dtype)

  common.parallel_bwd_chunk(q_ref[...], k_ref[...], v_ref[...], do_ref[...], st_ref, dst_ref,
                            decay, emit, scale=scale, dtype=dtype)


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


def _per_token(n):
  """Block: one (batch, head)'s ``(N,)`` per-token floats of a ``(B, N, H)`` array."""
  return pl.BlockSpec((None, n, None), lambda b, h, *_: (b, 0, h))


def _row_sums(x, blocks):
  """Output block and shape of per-token row sums, one column per channel block (the caller adds
  them up): ``(B, N, H, blocks)`` float32."""
  bsz, n, h = x.shape[:3]
  spec = pl.BlockSpec((None, n, None, None), lambda b, h, *j: (b, 0, h, j[0] if j else 0))
  return spec, jax.ShapeDtypeStruct((bsz, n, h, blocks), F32)


def _static(q, decay, cfg):
  c = cfg.block_sizes.chunk_size
  return dict(has_decay=decay is not None, nc=q.shape[1] // c, c=c, scale=cfg.scale,
              dtype=q.dtype)


def _call(kernel, name, like, decay, cfg, *, grid, in_specs, args, out_specs, out_shape):
  """One Triton kernel over ``grid``; the decay's ``(b, seg)``, when there is one, come last."""
  if decay is not None:
    in_specs = [*in_specs, _per_token(like.shape[1]), _per_token(like.shape[1])]
    args = [*args, *decay]
  return pl.pallas_call(
      functools.partial(kernel, **_static(like, decay, cfg)),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(cfg.block_sizes),
      interpret=cfg.interpret,
      name=name,
  )(*args)


def forward(q, k, v, decay, s0, cfg):
  """``(o (B, N, H, Dv) in q's dtype, s_final (B, H, Dk, Dv) float32, flag)``; ``flag``
  ``(B, H, Dv / block_v, 1, 1)`` float32, > 0 where the program wrote a non-finite output."""
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  bv = cfg.block_sizes.block_v or dv
  return _call(
      _forward_kernel, "linear_attention_fwd", q, decay, cfg, grid=(bsz, h, dv // bv),
      in_specs=[_seq(n, dk), _seq(n, dk), _seq(n, bv, True), _state(dk, bv, 1)],
      args=[q, k, v, s0],
      out_specs=[_seq(n, bv, True), _state(dk, bv, 1),
                 pl.BlockSpec((None, None, None, 1, 1), lambda b, h, j: (b, h, j, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, h, dk, dv), F32),
                 jax.ShapeDtypeStruct((bsz, h, dv // bv, 1, 1), F32)])


def _states(dk, nc, dv, channel_block=False):
  """Block: one (batch, head)'s states before every chunk, ``(Dk, NC * Dv)`` (chunk n in columns
  ``n Dv ...``), or the rows of Dk block ``j``."""
  if channel_block:
    return pl.BlockSpec((None, None, dk, nc * dv), lambda b, h, j: (b, h, j, 0))
  return pl.BlockSpec((None, None, dk, nc * dv), lambda b, h, *_: (b, h, 0, 0))


def _summed(row_sums):
  return jnp.sum(row_sums, axis=-1)


def dq(q, k, v, do, decay, s0, cfg):
  """``(dq (B, N, H, Dk) in k's dtype, aux)``; ``aux`` None without a decay, else ``(q_state
  (B, N, H) float32, the state before every chunk (B, H, Dk, NC * Dv) in k's dtype)``."""
  bsz, n, h, dk = k.shape
  dv = v.shape[-1]
  bk = cfg.block_sizes.block_k or dk
  nc = n // cfg.block_sizes.chunk_size
  out_specs, out_shape = [_seq(n, bk, True)], [jax.ShapeDtypeStruct(k.shape, k.dtype)]
  if decay is not None:
    rows_spec, rows_shape = _row_sums(k, dk // bk)
    out_specs += [rows_spec, _states(bk, nc, dv, True)]
    out_shape += [rows_shape, jax.ShapeDtypeStruct((bsz, h, dk, nc * dv), k.dtype)]
  out = _call(
      _dq_kernel, "linear_attention_dq", k, decay, cfg, grid=(bsz, h, dk // bk),
      in_specs=[_seq(n, bk, True), _seq(n, bk, True), _seq(n, dv), _seq(n, dv), _state(bk, dv, 0)],
      args=[q, k, v, do, s0], out_specs=out_specs, out_shape=out_shape)
  return out[0], (None if decay is None else (_summed(out[1]), out[2]))


def _decay_grad(cfg, aux, rows):
  q_state, _ = aux
  return common.decay_grad_flux(cfg.block_sizes.chunk_size, q_state,
                                common.DecayRows(*(_summed(x) for x in rows)))


def dkv(q, k, v, do, decay, ds_final, s_final, aux, cfg):
  """``(dk, dv, d initial_state, dg)``: dk, dv in the input dtype, dS0 float32, ``dg``
  (B, N, H) float32 from :func:`dq`'s ``aux`` (None without a decay)."""
  del s_final   # the final state's part of dg is the last chunk's flux
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  nc = n // cfg.block_sizes.chunk_size
  if cfg.block_sizes.split_backward:
    dk_, rows = _dk_split(q, k, v, do, decay, ds_final, aux, cfg)
    dv_, ds0 = _dv_split(q, k, do, decay, ds_final, cfg)
    return dk_, dv_, ds0, (None if decay is None else _decay_grad(cfg, aux, rows))
  in_specs = [_seq(n, dk), _seq(n, dk), _seq(n, dv), _seq(n, dv), _state(dk, dv)]
  args = [q, k, v, do, ds_final]
  out_specs = [_seq(n, dk), _seq(n, dv), _state(dk, dv)]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
               jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)]
  if decay is not None:
    in_specs.append(_states(dk, nc, dv))
    args.append(aux[1])
    rows_spec, rows_shape = _row_sums(k, 1)
    out_specs += [rows_spec] * 3
    out_shape += [rows_shape] * 3
  out = _call(functools.partial(_dk_kernel, with_dv=True), "linear_attention_dkv", q, decay, cfg,
              grid=(bsz, h),
              in_specs=in_specs, args=args, out_specs=out_specs, out_shape=out_shape)
  dg = None if decay is None else _decay_grad(cfg, aux, out[3:])
  return out[0], out[1], out[2], dg


def _dk_split(q, k, v, do, decay, ds_final, aux, cfg):
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  bk = cfg.block_sizes.block_k or dk
  nc = n // cfg.block_sizes.chunk_size
  in_specs = [_seq(n, bk, True), _seq(n, bk, True), _seq(n, dv), _seq(n, dv), _state(bk, dv, 0)]
  args = [q, k, v, do, ds_final]
  out_specs, out_shape = [_seq(n, bk, True)], [jax.ShapeDtypeStruct(k.shape, k.dtype)]
  if decay is not None:
    in_specs.append(_states(bk, nc, dv, True))
    args.append(aux[1])
    rows_spec, rows_shape = _row_sums(k, dk // bk)
    out_specs += [rows_spec] * 3
    out_shape += [rows_shape] * 3
  out = _call(functools.partial(_dk_kernel, with_dv=False), "linear_attention_dk", q, decay, cfg,
              grid=(bsz, h, dk // bk),
              in_specs=in_specs, args=args, out_specs=out_specs, out_shape=out_shape)
  return out[0], out[1:]


def _dv_split(q, k, do, decay, ds_final, cfg):
  bsz, n, h, dk = q.shape
  dv = do.shape[-1]
  bv = cfg.block_sizes.block_v or dv
  return tuple(_call(
      _dv_kernel, "linear_attention_dv", q, decay, cfg, grid=(bsz, h, dv // bv),
      in_specs=[_seq(n, dk), _seq(n, dk), _seq(n, bv, True), _state(dk, bv, 1)],
      args=[q, k, do, ds_final],
      out_specs=[_seq(n, bv, True), _state(dk, bv, 1)],
      out_shape=[jax.ShapeDtypeStruct(do.shape, do.dtype),
                 jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)]))


def _chunk_states(q, k, v, decay, s0, cfg):
  """``(the state before every chunk (B, H, NC * Dk, Dv) in q's dtype, s_final float32)``."""
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  nc = n // cfg.block_sizes.chunk_size
  bv = cfg.block_sizes.block_v or dv
  return _call(_chunk_states_kernel, "linear_attention_states", q, decay, cfg,
               grid=(bsz, h, dv // bv),
               in_specs=[_seq(n, dk), _seq(n, bv, True), _state(dk, bv, 1)], args=[k, v, s0],
               out_specs=[_states_rows(nc, dk, bv), _state(dk, bv, 1)],
               out_shape=[jax.ShapeDtypeStruct((bsz, h, nc * dk, dv), q.dtype),
                          jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)])


def _states_rows(nc, dk, bv):
  """Block: one (batch, head)'s per-chunk states ``(NC * Dk, Dv)``, value-channel block ``j``."""
  return pl.BlockSpec((None, None, nc * dk, bv), lambda b, h, j: (b, h, 0, j))


def _chunk_parallel_call(kernel, name, q, decay, cfg, *, args, in_specs, out_specs, out_shape):
  """One program per chunk, grid ``(B, H, NC)``; the decay's ``(b, seg)`` come last."""
  bsz, n, h, _ = q.shape
  c = cfg.block_sizes.chunk_size
  return pl.pallas_call(
      functools.partial(kernel, c=c, scale=cfg.scale, dtype=q.dtype),
      grid=(bsz, h, n // c), in_specs=[*in_specs, chunk_tokens(c), chunk_tokens(c)],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=CHUNK_PARALLEL_NUM_WARPS,
                                           num_stages=cfg.block_sizes.num_stages),
      interpret=cfg.interpret, name=name)(*args, *decay)


def _chunk_state(dk, dv):
  """Block: chunk ``i``'s ``(Dk, Dv)`` state of a ``(B, H, NC * Dk, Dv)`` array."""
  return pl.BlockSpec((None, None, dk, dv), lambda b, h, i: (b, h, i, 0))


def decay_forward(q, k, v, decay, s0, cfg):
  """The chunk-parallel forward (``BlockSizes.chunk_parallel_forward``): ``(o, s_final, flag)``
  as :func:`forward`'s, ``flag`` per chunk."""
  bsz, n, h, dk = q.shape
  dv, c = v.shape[-1], cfg.block_sizes.chunk_size
  st, s_final = _chunk_states(q, k, v, decay, s0, cfg)
  o, flag = _chunk_parallel_call(
      _parallel_fwd_kernel, "linear_attention_fwd_chunks", q, decay, cfg,
      args=[q, k, v, st],
      in_specs=[chunk_tokens(c, dk), chunk_tokens(c, dk), chunk_tokens(c, dv),
                _chunk_state(dk, dv)],
      out_specs=[chunk_tokens(c, dv),
                 pl.BlockSpec((None, None, None, 1, 1), lambda b, h, i: (b, h, i, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, h, n // c, 1, 1), F32)])
  return o, s_final, flag


def decay_backward(q, k, v, do, decay, s0, ds_final, cfg):
  """The chunk-parallel backward (``BlockSizes.chunk_parallel_backward``): ``(dq, dk, dv, dS0,
  dg)``. Two sequential passes over Dv slices write the state before every chunk and the state
  cotangent after it, ``(B, H, NC * Dk, Dv)`` in the inputs' dtype each; one program per chunk
  then reads both."""
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  c = cfg.block_sizes.chunk_size
  nc = n // c
  bv = cfg.block_sizes.block_v or dv
  st, _ = _chunk_states(q, k, v, decay, s0, cfg)
  dst, ds0 = _call(_chunk_dstates_kernel, "linear_attention_dstates", q, decay, cfg,
                   grid=(bsz, h, dv // bv),
                   in_specs=[_seq(n, dk), _seq(n, bv, True), _state(dk, bv, 1)],
                   args=[q, do, ds_final], out_specs=[_states_rows(nc, dk, bv), _state(dk, bv, 1)],
                   out_shape=[jax.ShapeDtypeStruct(st.shape, q.dtype),
                              jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)])
  row = jax.ShapeDtypeStruct((bsz, n, h), F32)
  dq_, dk_, dv_, q_state, *rows = _chunk_parallel_call(
      _parallel_bwd_kernel, "linear_attention_bwd_chunks", q, decay, cfg,
      args=[q, k, v, do, st, dst],
      in_specs=[chunk_tokens(c, dk), chunk_tokens(c, dk), chunk_tokens(c, dv),
                chunk_tokens(c, dv), _chunk_state(dk, dv), _chunk_state(dk, dv)],
      out_specs=[chunk_tokens(c, dk), chunk_tokens(c, dk), chunk_tokens(c, dv)]
      + [chunk_tokens(c)] * 4,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)] + [row] * 4)
  dg = common.decay_grad_flux(c, q_state, common.DecayRows(*rows))
  return dq_, dk_, dv_, ds0, dg


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
      interpret=bool(interpret),
      decay_forward=decay_forward if bs.chunk_parallel_forward else None,
      decay_backward=decay_backward if bs.chunk_parallel_backward else None))
