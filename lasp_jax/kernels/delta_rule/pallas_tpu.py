"""The delta rule's state pass (stage 2) as Pallas Mosaic kernels (TPU; interpret mode on CPU).

Grid ``(B, H, NC)`` with the chunk axis last and ``"arbitrary"`` (sequential): the float32 state
(or its cotangent) lives in a VMEM scratch buffer across chunk steps, initialised at the first step
and written out at the last, as in ``kernels/linear_attention/pallas_tpu.py``. Three kernels (math
in ``_pallas_common``): forward (``u`` and ``s_final``); ``states`` (the backward's first step:
the state before every chunk, rebuilt from the saved ``u``, one ``(Dk, Dv)`` block per chunk);
``reverse`` (backward over chunks via a reversed index map, carrying ``dS``).

The inputs' layout ``(B, H, NC, C, D)`` gives ``(C, D)`` blocks, last two dims equal to the
array's. The per-channel log-decay comes in as one ``(1, Dk)`` row per chunk (lanes, padded to 8
sublanes in HBM; a ``(Dk, 1)`` column would be padded to 128 lanes); the kernels turn it into the
``(Dk, 1)`` column that scales the state's rows with a diagonal select and a lane sum (exact: one
nonzero per row), and ``d gamma`` back into a row with a sublane sum, instead of a transpose.
Checked tiling rules (:func:`check_shapes`): the chunk size ``C`` a multiple of 8 (float32
sublanes). Head dims off the 128-lane tiling are zero-padded to it around the kernels (exact; costs
the padded traffic), as the linear-attention kernels do. Only the plain and the TPU-semantics
interpreters and the Mosaic lowering (``jax.export`` for "tpu") have run these kernels; no TPU
compile or timing yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lasp_jax.kernels._pallas_util import chunk_block, state_block, tpu_chunk_call
from lasp_jax.kernels.delta_rule import _pallas_common as common
from lasp_jax.kernels.delta_rule._pallas_common import F32

LANES = 128
SUBLANES = 8   # float32


def check_shapes(w, u0, k_end, gamma, s0=None):
  """Raises ValueError for inputs the Mosaic kernels cannot tile, naming the offending value."""
  _, _, _, c, _, _ = common.check_inputs("tpu", w, u0, k_end, gamma, s0)
  if c % SUBLANES:
    raise ValueError(f"backend 'tpu' needs the chunk size C to be a multiple of {SUBLANES} "
                     f"(float32 sublane tiling), got C={c}")


def _eye(d):
  rows = jax.lax.broadcasted_iota(jnp.int32, (d, d), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (d, d), 1)
  return rows == cols


def _row_to_col(row):
  """``(1, D) -> (D, 1)`` by a diagonal select and a lane sum (no lane/sublane transpose)."""
  return jnp.sum(jnp.where(_eye(row.shape[-1]), row, 0.0), axis=1, keepdims=True)


def _col_to_row(col):
  """``(D, 1) -> (1, D)`` by a diagonal select and a sublane sum."""
  return jnp.sum(jnp.where(_eye(col.shape[0]), col, 0.0), axis=0, keepdims=True)


def _decay_col(lg_ref):
  return jnp.exp(_row_to_col(lg_ref[...]))


def _forward_kernel(w_ref, u0_ref, k_ref, lg_ref, s0_ref, u_ref, sf_ref, s_scr, *, nc):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    s_scr[...] = s0_ref[...]

  u, s = common.forward_chunk(w_ref[...], u0_ref[...], k_ref[...], _decay_col(lg_ref), s_scr[...])
  u_ref[...] = u
  s_scr[...] = s

  @pl.when(i == nc - 1)
  def _():
    sf_ref[...] = s


def _states_kernel(k_ref, u_ref, lg_ref, s0_ref, st_ref, s_scr):
  @pl.when(pl.program_id(2) == 0)
  def _():
    s_scr[...] = s0_ref[...]

  s = s_scr[...]
  st_ref[...] = s                                      # the state *before* this chunk
  s_scr[...] = common.state_step(s, k_ref[...], u_ref[...], _decay_col(lg_ref))


def _reverse_kernel(w_ref, k_ref, u_ref, du_ref, lg_ref, st_ref, dsf_ref,
                    dw_ref, du0_ref, dk_ref, dlg_ref, ds0_ref, ds_scr, *, nc):
  j = pl.program_id(2)   # step j handles chunk nc - 1 - j (the index maps reverse it)

  @pl.when(j == 0)
  def _():
    ds_scr[...] = dsf_ref[...]

  def emit(name, value):
    if name == "dlg":
      dlg_ref[...] = _col_to_row(value)
    else:
      {"dw": dw_ref, "du0": du0_ref, "dk_end": dk_ref}[name][...] = value

  ds = common.reverse_chunk(w_ref[...], k_ref[...], u_ref[...], du_ref[...], _decay_col(lg_ref),
                            st_ref[...], ds_scr[...], emit)
  ds_scr[...] = ds

  @pl.when(j == nc - 1)
  def _():
    ds0_ref[...] = ds


# ------------------------------------------------------------------------- pallas_call builders


def _chunk_spec(rows, cols, nc, reverse):
  """One chunk's ``(rows, cols)`` block of a ``(B, H, NC, rows, cols)`` array."""
  return chunk_block((None, None, None, rows, cols), nc, reverse)


def _rows(gamma):
  """``(B, H, NC, Dk) -> (B, H, NC, 1, Dk)``: one lane row per chunk."""
  return gamma[:, :, :, None, :]


def _call(kernel, cfg, grid, args, in_specs, out_specs, out_shape, scratch):
  return tpu_chunk_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, scratch=scratch, interpret=cfg.interpret)(*args)


def forward(w, u0, k_end, gamma, s0, cfg):
  """``(u (B, H, NC, C, Dv), s_final (B, H, Dk, Dv))``, float32."""
  bsz, h, nc, c, dk = w.shape
  dv = u0.shape[-1]
  ck, cv, row = (_chunk_spec(c, dk, nc, False), _chunk_spec(c, dv, nc, False),
                 _chunk_spec(1, dk, nc, False))
  return _call(
      functools.partial(_forward_kernel, nc=nc), cfg, (bsz, h, nc),
      (w, u0, k_end, _rows(gamma), s0),
      [ck, cv, ck, row, state_block(dk, dv)],
      [cv, state_block(dk, dv)],
      [jax.ShapeDtypeStruct(u0.shape, F32), jax.ShapeDtypeStruct(s0.shape, F32)],
      [pltpu.VMEM((dk, dv), F32)])


def states(k_end, u, gamma, s0, cfg):
  """The state before each chunk, ``(B, H, NC, Dk, Dv)`` float32."""
  bsz, h, nc, c, dk = k_end.shape
  dv = u.shape[-1]
  return _call(
      _states_kernel, cfg, (bsz, h, nc),
      (k_end, u, _rows(gamma), s0),
      [_chunk_spec(c, dk, nc, False), _chunk_spec(c, dv, nc, False),
       _chunk_spec(1, dk, nc, False), state_block(dk, dv)],
      _chunk_spec(dk, dv, nc, False),
      jax.ShapeDtypeStruct((bsz, h, nc, dk, dv), F32),
      [pltpu.VMEM((dk, dv), F32)])


def reverse(w, k_end, u, du, gamma, st, ds_final, cfg):
  """``(dw, du0, dk_end, dgamma (B, H, NC, Dk), ds0)``, float32."""
  bsz, h, nc, c, dk = w.shape
  dv = u.shape[-1]
  ck, cv, row = (_chunk_spec(c, dk, nc, True), _chunk_spec(c, dv, nc, True),
                 _chunk_spec(1, dk, nc, True))
  dw, du0, dk_end, dgamma, ds0 = _call(
      functools.partial(_reverse_kernel, nc=nc), cfg, (bsz, h, nc),
      (w, k_end, u, du, _rows(gamma), st, ds_final),
      [ck, ck, cv, cv, row, _chunk_spec(dk, dv, nc, True), state_block(dk, dv)],
      [ck, cv, ck, row, state_block(dk, dv)],
      [jax.ShapeDtypeStruct(w.shape, F32), jax.ShapeDtypeStruct(u.shape, F32),
       jax.ShapeDtypeStruct(w.shape, F32), jax.ShapeDtypeStruct((bsz, h, nc, 1, dk), F32),
       jax.ShapeDtypeStruct(ds_final.shape, F32)],
      [pltpu.VMEM((dk, dv), F32)])
  return dw, du0, dk_end, dgamma[:, :, :, 0, :], ds0


def delta_state_pass_tpu(w, u0, k_end, gamma, s0=None, *,
                         interpret: bool | pltpu.InterpretParams = False):
  """The delta rule's sequential state pass over chunks through the Mosaic kernels.

  The arguments, the recurrence and the result are those of
  :func:`lasp_jax.kernels.delta_rule.pallas_gpu.delta_state_pass_gpu`, except: ``C`` a multiple of
  8 and any head dims (zero-padded to 128 lanes around the kernels); the dots always take float32
  operands; ``interpret``: True for the plain interpreter, or a ``pltpu.InterpretParams`` for the
  TPU-semantics one.
  """
  if s0 is None:
    s0 = jnp.zeros(w.shape[:2] + (w.shape[-1], u0.shape[-1]), F32)
  check_shapes(w, u0, k_end, gamma, s0)
  if not isinstance(interpret, pltpu.InterpretParams):
    interpret = bool(interpret)
  cfg = common.Config(forward=forward, states=states, reverse=reverse, interpret=interpret)
  return common.run(w, u0, k_end, gamma, s0, cfg, pad_to=LANES)
