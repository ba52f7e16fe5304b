"""Chunked linear attention as Pallas Mosaic kernels (TPU; interpret mode on CPU for tests).

Grid ``(B, H, N / chunk_size)`` with the chunk axis last and ``"arbitrary"`` (sequential): the
float32 state (or its cotangent) lives in a VMEM scratch buffer across chunk steps, initialised at
the first step and written out at the last, the pattern of JAX's TPU flash attention. Three kernels
(math in ``_pallas_common``): forward; ``dq`` (forward over chunks, recomputing the state; with a
decay it also writes the state before every chunk); ``dk, dv`` (backward over chunks via a
reversed index map, carrying ``dS``; with a decay it reads those states and writes the column
sums of ``P`` and the flux per chunk, for the chunk-local decay gradient of the GPU kernels).

Mosaic blocks must have their last two dims divisible by (8, 128) or equal to the array's, so the
kernels work on ``(B, H, N, D)`` (a transpose in XLA around the calls): a block is one chunk of one
head, ``(chunk_size, D)``. The decay comes in as one ``(1, chunk_size)`` row per chunk of each of
``_pallas_common.chunk_prefix``'s ``b`` and ``seg``; the kernel builds its column forms with lane
sums (``_pallas_common.chunk_decay``) instead of a lane/sublane transpose, and no matmul.
Checked tiling rules (:func:`check_shapes`): ``chunk_size`` a multiple of 8 (16 for bfloat16, which
packs two rows per sublane). Head dims ``Dk``, ``Dv`` off the 128-lane width are zero-padded to it
around the kernels (exact; costs the padded traffic). Only the plain and the TPU-semantics
interpreters and the Mosaic lowering have run these kernels; no TPU compile or timing yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lasp_jax.kernels._pallas_util import chunk_block, state_block, tpu_chunk_call
from lasp_jax.kernels.linear_attention import _pallas_common as common
from lasp_jax.kernels.linear_attention._pallas_common import F32, BlockSizes

DEFAULT_BLOCK_SIZES = BlockSizes(chunk_size=128)
LANES = 128


def check_shapes(q, v, block_sizes: BlockSizes):
  """Raises ValueError for shapes the Mosaic kernels cannot tile, naming the offending value."""
  dk, dv = q.shape[-1], v.shape[-1]
  c = block_sizes.chunk_size
  sublanes = 16 if q.dtype == jnp.bfloat16 else 8
  if c % sublanes:
    raise ValueError(f"backend 'tpu' needs chunk_size to be a multiple of {sublanes} for "
                     f"{jnp.dtype(q.dtype).name} inputs (sublane tiling), got {c}")
  for name, val in (("head dim Dk", dk), ("head dim Dv", dv)):
    if val < 1:
      raise ValueError(f"backend 'tpu' needs {name} >= 1, got {val}")
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"backend 'tpu' takes float32 or bfloat16 inputs, got {q.dtype}")


def _chunk_decay(decay_refs):
  """Decay factors of the chunk from its ``(1, c)`` rows of ``b`` and ``seg`` (lanes)."""
  if decay_refs is None:
    return None
  b_ref, seg_ref = decay_refs
  return common.chunk_decay(b_ref[...], seg_ref[...])


def _split(refs, n_in, has_decay):
  """Kernel refs are (inputs..., [b, seg], outputs..., scratch)."""
  decay_refs = tuple(refs[n_in:n_in + 2]) if has_decay else None
  return refs[:n_in], decay_refs, refs[n_in + 2 * has_decay:]


def _forward_kernel(*refs, has_decay, nc, c, scale, dtype):
  (q_ref, k_ref, v_ref, s0_ref), decay_refs, (o_ref, sf_ref, flag_ref, s_scr) = _split(
      refs, 4, has_decay)
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    s_scr[...] = s0_ref[...]
    flag_ref[...] = jnp.zeros(flag_ref.shape, F32)

  decay = _chunk_decay(decay_refs)
  o, s = common.forward_chunk(q_ref[...], k_ref[...], v_ref[...], s_scr[...], decay,
                              scale=scale, dtype=dtype)
  o_ref[...] = o.astype(o_ref.dtype)
  s_scr[...] = s
  # The block's index is the same at every chunk: it stays in VMEM, written back at the end.
  flag_ref[...] = jnp.maximum(flag_ref[...], common.nonfinite_flag(o))

  @pl.when(i == nc - 1)
  def _():
    sf_ref[...] = s


def _dq_kernel(*refs, has_decay, nc, c, scale, dtype):
  (k_ref, v_ref, do_ref, s0_ref), decay_refs, (dq_ref, *st_ref, s_scr) = _split(refs, 4, has_decay)

  @pl.when(pl.program_id(2) == 0)
  def _():
    s_scr[...] = s0_ref[...]

  if has_decay:   # the state before the chunk, for the dkv pass's flux term of dg
    st_ref[0][...] = s_scr[...].astype(st_ref[0].dtype)
  decay = _chunk_decay(decay_refs)
  dq, _, s = common.dq_chunk(k_ref[...], v_ref[...], do_ref[...], s_scr[...], decay,
                             scale=scale, dtype=dtype)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  s_scr[...] = s


def _dkv_kernel(*refs, has_decay, nc, c, scale, dtype):
  ins, decay_refs, (dk_ref, dv_ref, ds0_ref, *decay_out, ds_scr) = _split(
      refs, 6 if has_decay else 5, has_decay)
  q_ref, k_ref, v_ref, do_ref, dsf_ref = ins[:5]
  j = pl.program_id(2)   # step j handles chunk nc - 1 - j (the index maps reverse it)

  @pl.when(j == 0)
  def _():
    ds_scr[...] = dsf_ref[...]

  decay = _chunk_decay(decay_refs)
  chunk = (q_ref[...], k_ref[...], v_ref[...], do_ref[...], ds_scr[...], decay)
  if has_decay:
    dk, dv, ds, col_p, flux = common.dkv_chunk_lanes(*chunk, ins[5][...], scale=scale,
                                                     dtype=dtype)
    decay_out[0][...], decay_out[1][...] = col_p, flux
  else:
    dk, dv, ds, _ = common.dkv_chunk(*chunk, scale=scale, dtype=dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  ds_scr[...] = ds

  @pl.when(j == nc - 1)
  def _():
    ds0_ref[...] = ds


# ------------------------------------------------------------------------- pallas_call builders


def _chunk_spec(c, d, nc, reverse):
  """One chunk's ``(c, d)`` rows of a ``(B, H, N, d)`` array."""
  return chunk_block((None, None, c, d), nc, reverse)


def _decay_spec(c, nc, reverse):
  """One chunk's decay row of a ``(B, H, NC, 1, c)`` array."""
  return chunk_block((None, None, None, 1, c), nc, reverse)


def _bhnd(x):
  return jnp.swapaxes(x, 1, 2)


def _call(kernel, cfg, x_bhnd, g, ins, in_specs, out_specs, out_shape, scratch, reverse=False):
  bsz, h, n, _ = x_bhnd.shape
  c = cfg.block_sizes.chunk_size
  nc = n // c
  args = list(ins)
  in_specs = list(in_specs)
  if g is not None:
    # One (1, c) row per chunk: a block whose last two dims equal the array's, padded to 8
    # sublanes in HBM (a (B, H, N, 1) column would be padded to 128 lanes).
    for x in g:
      args.append(_bhnd(x).reshape(bsz, h, nc, 1, c))
      in_specs.append(_decay_spec(c, nc, reverse))
  kernel = functools.partial(kernel, has_decay=g is not None, nc=nc, c=c, scale=cfg.scale,
                             dtype=x_bhnd.dtype)
  return tpu_chunk_call(kernel, grid=(bsz, h, nc), in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, scratch=scratch, interpret=cfg.interpret)(*args)


def forward(q, k, v, g, s0, cfg):
  """``(o (B, N, H, Dv) in q's dtype, s_final (B, H, Dk, Dv) float32, flag (B, H, 1, 1)
  float32)``: ``flag`` > 0 where a non-finite output was written."""
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  c = cfg.block_sizes.chunk_size
  nc = n // c
  q_t, k_t, v_t = _bhnd(q), _bhnd(k), _bhnd(v)
  o_t, s_final, flag = _call(
      _forward_kernel, cfg, q_t, g, (q_t, k_t, v_t, s0),
      [_chunk_spec(c, dk, nc, False)] * 2 + [_chunk_spec(c, dv, nc, False), state_block(dk, dv)],
      [_chunk_spec(c, dv, nc, False), state_block(dk, dv), state_block(1, 1)],
      [jax.ShapeDtypeStruct((bsz, h, n, dv), q.dtype),
       jax.ShapeDtypeStruct((bsz, h, dk, dv), F32),
       jax.ShapeDtypeStruct((bsz, h, 1, 1), F32)],
      [pltpu.VMEM((dk, dv), F32)])
  return _bhnd(o_t), s_final, flag


def _per_chunk(rows, cols, nc, reverse):
  """One chunk's ``(rows, cols)`` block of a ``(B, H, NC, rows, cols)`` array."""
  return chunk_block((None, None, None, rows, cols), nc, reverse)


def dq(q, k, v, do, g, s0, cfg):
  """``(dq (B, N, H, Dk) in k's dtype, aux)``: None without a decay, else ``(q.dq (B, N, H)
  float32, the state before every chunk (B, H, NC, Dk, Dv) in k's dtype)``.

  ``q`` is only read (in XLA) for the decay gradient's row sums; the kernel takes k, v, dO."""
  bsz, n, h, dk = k.shape
  dv = v.shape[-1]
  c = cfg.block_sizes.chunk_size
  nc = n // c
  k_t = _bhnd(k)
  out_specs = [_chunk_spec(c, dk, nc, False)]
  out_shape = [jax.ShapeDtypeStruct((bsz, h, n, dk), F32 if g is not None else k.dtype)]
  if g is not None:
    out_specs.append(_per_chunk(dk, dv, nc, False))
    out_shape.append(jax.ShapeDtypeStruct((bsz, h, nc, dk, dv), k.dtype))
  dq_t, *states = _call(
      _dq_kernel, cfg, k_t, g, (k_t, _bhnd(v), _bhnd(do), s0),
      [_chunk_spec(c, dk, nc, False)] + [_chunk_spec(c, dv, nc, False)] * 2
      + [state_block(dk, dv)],
      out_specs, out_shape, [pltpu.VMEM((dk, dv), F32)])
  dq_, qdq = _with_row_sum(q, _bhnd(dq_t), g)
  return dq_, (None if g is None else (qdq, states[0]))


def _with_row_sum(x, dx, g):
  """``(dx in x's dtype, x.dx (B, N, H) or None)``: the row sums are taken in XLA here, from the
  float32 gradient that the kernels return when there is a decay."""
  if g is None:
    return dx, None
  return dx.astype(x.dtype), jnp.sum(x.astype(F32) * dx, axis=-1)


def dkv(q, k, v, do, g, ds_final, s_final, aux, cfg):
  """``(dk, dv, d initial_state, dg)``: dk, dv in the input dtype, dS0 float32, ``dg`` (None
  without a decay) by ``common.decay_grad_flux`` from :func:`dq`'s ``aux`` and this pass's column
  sums and flux (``common.dkv_chunk_lanes``)."""
  del s_final   # the final state's part of dg is the last chunk's flux
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  c = cfg.block_sizes.chunk_size
  nc = n // c
  q_t = _bhnd(q)
  ins = [q_t, _bhnd(k), _bhnd(v), _bhnd(do), ds_final]
  in_specs = ([_chunk_spec(c, dk, nc, True)] * 2 + [_chunk_spec(c, dv, nc, True)] * 2
              + [state_block(dk, dv)])
  out_specs = [_chunk_spec(c, dk, nc, True), _chunk_spec(c, dv, nc, True), state_block(dk, dv)]
  out_shape = [jax.ShapeDtypeStruct((bsz, h, n, dk), F32 if g is not None else k.dtype),
               jax.ShapeDtypeStruct((bsz, h, n, dv), v.dtype),
               jax.ShapeDtypeStruct((bsz, h, dk, dv), F32)]
  if g is not None:
    ins.append(aux[1])
    in_specs.append(_per_chunk(dk, dv, nc, True))
    out_specs += [_per_chunk(1, c, nc, True), _per_chunk(1, 1, nc, True)]
    out_shape += [jax.ShapeDtypeStruct((bsz, h, nc, 1, c), F32),
                  jax.ShapeDtypeStruct((bsz, h, nc, 1, 1), F32)]
  dk_t, dv_t, ds0, *decay_out = _call(_dkv_kernel, cfg, q_t, g, ins, in_specs, out_specs,
                                      out_shape, [pltpu.VMEM((dk, dv), F32)], reverse=True)
  dk_, kdk = _with_row_sum(k, _bhnd(dk_t), g)
  if g is None:
    return dk_, _bhnd(dv_t), ds0, None
  col_p, flux = decay_out
  per_token = lambda x: _bhnd(jnp.broadcast_to(x, (bsz, h, nc, 1, c)).reshape(bsz, h, n))  # noqa
  col_p, flux = per_token(col_p), per_token(flux)
  rows = common.DecayRows(in_chunk=jnp.zeros_like(col_p), k_state=kdk - col_p, flux=flux)
  return dk_, _bhnd(dv_t), ds0, common.decay_grad_flux(c, aux[0] - col_p, rows)


def chunk_linear_attention_tpu(q, k, v, log_decay=None, *, scale=1.0, initial_state=None,
                               block_sizes: BlockSizes | None = None,
                               interpret: bool | pltpu.InterpretParams = False):
  """Causal chunked linear attention through the Mosaic kernels.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; all float32 or all bfloat16; head dims that
      are not multiples of 128 are zero-padded to one (exact).
    log_decay: None, ``(H,)`` or ``(B, N, H)`` (the per-channel form goes to the XLA path in
      ``api.chunk_linear_attention``).
    scale: multiplies q. initial_state: None or ``(B, H, Dk, Dv)``.
    block_sizes: tiling (only ``chunk_size`` is used); None uses ``DEFAULT_BLOCK_SIZES``.
    interpret: run in the Pallas interpreter (CPU): True for the plain one, or a
      ``pltpu.InterpretParams`` for the TPU-semantics one (simulated DMAs and pipelining, race
      detection; ~5x slower, and it hung inside shard_map in JAX 0.10).

  Returns:
    ``(o (B, N, H, Dv) in q's dtype, final_state (B, H, Dk, Dv) float32)``.
  """
  bs = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
  check_shapes(q, v, bs)
  if not isinstance(interpret, pltpu.InterpretParams):
    interpret = bool(interpret)
  # Head dims off the 128-lane tiling are zero-padded up to it, outside the kernels: zero key
  # channels add nothing to q.k or to the state, zero value channels give zero output columns,
  # which are cut off again (exact, gradients included). It costs the padded HBM traffic; a pad in
  # VMEM would not, but needs a TPU to check that Mosaic lowers it.
  dk, dv = q.shape[-1], v.shape[-1]
  pk, pv = -dk % LANES, -dv % LANES
  pad = lambda x, p: x if p == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, p)])  # noqa
  if initial_state is not None:
    initial_state = jnp.pad(initial_state, [(0, 0), (0, 0), (0, pk), (0, pv)])
  o, s = common.run(pad(q, pk), pad(k, pk), pad(v, pv), log_decay, initial_state, common.Config(
      forward=forward, dq=dq, dkv=dkv, block_sizes=bs, scale=float(scale), interpret=interpret))
  return o[..., :dv], s[:, :, :dk, :dv]
