"""The delta rule's WY prepare (stage 1) and state pass (stage 2) as Pallas Triton kernels (GPU;
interpret mode on CPU). Stage 1 is chunk-parallel (its section at the end of this module); the
rest of this docstring is stage 2.

A program owns one (batch, head) and a block of ``block_v`` value channels, and walks the chunks
in a ``fori_loop`` carrying that ``(Dk, block_v)`` slice of the float32 state (or its cotangent)
in registers: Triton programs cannot share a grid axis sequentially the way Mosaic does. The
columns of ``S`` never mix (``u = u0 - w S`` and ``S <- a S + k_end^T u`` act on each column), nor
do those of ``dS``, so the grid is ``(B, H, Dv / block_v)`` for all three kernels (math in
``_pallas_common``): forward; ``states`` (the state before every chunk, rebuilt from the saved
``u``); ``reverse``. In the reverse kernel ``d w``, ``d k_end`` and ``d gamma`` sum over value
channels: each Dv block writes its partial sums and XLA adds them (no cross-program atomics).

Layout: ``(B, H, NC, C, D)`` is viewed as ``(B, H, NC * C, D)`` (a free reshape) and a chunk is
the rows ``pl.ds(n * C, C)``, the pattern of ``kernels/linear_attention/pallas_gpu.py``; the
states as ``(B, H, NC * Dk, Dv)``; the log-decay as ``(B, H, NC * Dk)``, loaded as a ``(Dk,)``
vector per chunk. Triton needs every loaded tile to have power-of-two sides and its dot operands
sides >= 16, so ``C``, ``Dk``, ``Dv`` and ``block_v`` must be powers of two >= 16, and
``C * Dk <= 128 * 128`` (shared memory, ``MAX_CHUNK_TIMES_DK``) (:func:`check_shapes`); element
offsets are int32, so an array may hold at most 2**31 - 1 elements. The dots take ``operand_dtype``:
float32 (IEEE, CUDA cores: the whole Gated DeltaNet op took 523 ms on an H200) or bfloat16 (tensor
cores, float32 accumulation and state: 26.2 ms, against 52.1 ms all-XLA;
``benchmarks/results/kernels_gpu.json``). Pallas' Triton backend is deprecated from JAX 0.11
(Mosaic GPU succeeds it) but still ships.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lasp_jax.kernels._pallas_util import chunk_tokens, is_pow2_at_least_16
from lasp_jax.kernels.delta_rule import _pallas_common as common
from lasp_jax.kernels.delta_rule import reference
from lasp_jax.kernels.delta_rule._pallas_common import F32
from lasp_jax.kernels.linear_attention import _pallas_common as la_common
from lasp_jax.kernels.linear_attention import pallas_gpu as la_gpu

NUM_WARPS = 4
NUM_STAGES = 2
# Shared memory per block that Triton 3.9 reports compiling the reverse kernel (the largest) for
# sm_90 at 4 warps, 2 stages, from jax.export's Triton IR; the H100/H200 limit is 232448 bytes.
# With the default block_v (2026-12-05): C=64, Dk=128, block_v 64: 147456; C=128, Dk=128,
# block_v 32: 204800; C=64, Dk=256, block_v 32: 229376. An earlier version of the kernel:
#   C=64,  Dk=128: block_v 32: 122880, 64: 180224, 128: 294912
#   C=128, Dk=128: block_v 32: 212992, 64: 294912;   C=64, Dk=256: block_v 32: 221184, 64: 311296
#   C=128, Dk=256: block_v 16: 319488 (nothing fits)
# Hence the default block_v (:func:`default_block_v`) and the bound on C * Dk in check_shapes.
# jaxlib's bundled Triton may differ a little.
MAX_CHUNK_TIMES_DK = 128 * 128
PREPARE_NUM_WARPS = 8


def default_block_v(c: int, dk: int, dv: int) -> int:
  """Value channels per program: 64 up to ``C * Dk = 64 * 128``, else 32 (shared memory of the
  reverse kernel, table above); at most Dv."""
  return min(64 if c * dk <= 64 * 128 else 32, dv)


def check_shapes(w, u0, k_end, gamma, s0=None, block_v=None):
  """Raises ValueError for inputs the Triton kernels cannot tile, naming the offending value."""
  bsz, h, nc, c, dk, dv = common.check_inputs("gpu", w, u0, k_end, gamma, s0)
  for name, val in (("the chunk size C", c), ("head dim Dk", dk), ("head dim Dv", dv)):
    if not is_pow2_at_least_16(val):
      raise ValueError(f"backend 'gpu' needs {name} to be a power of two >= 16 (Triton tiles), "
                       f"got {val}")
  if c * dk > MAX_CHUNK_TIMES_DK:
    raise ValueError(f"backend 'gpu' needs C * Dk <= {MAX_CHUNK_TIMES_DK} (the reverse kernel's "
                     f"float32 tiles overflow an sm_90 block's shared memory beyond), got "
                     f"C={c}, Dk={dk}: use a smaller chunk")
  if block_v is not None and not (is_pow2_at_least_16(block_v) and dv % block_v == 0):
    raise ValueError(f"backend 'gpu' needs block_v to be a power of two >= 16 dividing Dv={dv}, "
                     f"got {block_v}")
  # The largest array a kernel indexes: the chunk states of the backward, (B, H, NC, Dk, Dv).
  for name, size in (("w", w.size), ("u0", u0.size), ("the chunk states", bsz * h * nc * dk * dv)):
    if size >= 2 ** 31:   # the Triton lowering computes element offsets in int32
      raise ValueError(f"backend 'gpu' indexes with int32 offsets: {name} has {size} elements, "
                       f"at most 2**31 - 1 allowed; split the batch")


def _decay_col(lg_ref, n, dk):
  """``exp(gamma)`` of chunk ``n`` as a ``(Dk, 1)`` column."""
  return jnp.exp(lg_ref[pl.ds(pl.multiple_of(n * dk, dk), dk)])[:, None]


def _forward_kernel(w_ref, u0_ref, k_ref, lg_ref, s0_ref, u_ref, sf_ref, *, nc, c, dk, dtype):
  def body(n, s):
    rows = pl.ds(pl.multiple_of(n * c, c), c)
    u, s = common.forward_chunk(w_ref[rows, :], u0_ref[rows, :], k_ref[rows, :],
                                _decay_col(lg_ref, n, dk), s, dtype)
    u_ref[rows, :] = u
    return s

  sf_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...])


def _states_kernel(k_ref, u_ref, lg_ref, s0_ref, st_ref, *, nc, c, dk, dtype):
  def body(n, s):
    rows = pl.ds(pl.multiple_of(n * c, c), c)
    st_ref[pl.ds(pl.multiple_of(n * dk, dk), dk), :] = s.astype(st_ref.dtype)  # before chunk n
    return common.state_step(s, k_ref[rows, :], u_ref[rows, :], _decay_col(lg_ref, n, dk), dtype)

  jax.lax.fori_loop(0, nc, body, s0_ref[...])


def _reverse_kernel(w_ref, k_ref, u_ref, du_ref, lg_ref, st_ref, dsf_ref,
                    dw_ref, du0_ref, dk_ref, dlg_ref, ds0_ref, *, nc, c, dk, dtype):
  def body(j, ds):
    n = nc - 1 - j
    rows = pl.ds(pl.multiple_of(n * c, c), c)
    state_rows = pl.ds(pl.multiple_of(n * dk, dk), dk)
    def emit(name, value):
      if name == "dlg":
        dlg_ref[state_rows] = jnp.sum(value, axis=1)       # (Dk, 1) -> (Dk,)
      else:
        {"dw": dw_ref, "du0": du0_ref, "dk_end": dk_ref}[name][rows, :] = value

    return common.reverse_chunk(w_ref[rows, :], k_ref[rows, :], u_ref[rows, :], du_ref[rows, :],
                                _decay_col(lg_ref, n, dk), st_ref[state_rows, :], ds, emit, dtype)

  ds0_ref[...] = jax.lax.fori_loop(0, nc, body, dsf_ref[...])


# ------------------------------------------------------------------------- pallas_call builders


def _whole(rows, cols):
  """Block: all ``rows`` of one (batch, head) of a ``(B, H, rows, cols)`` array, all columns."""
  return pl.BlockSpec((None, None, rows, cols), lambda b, h, j: (b, h, 0, 0))


def _vblock(rows, bv):
  """Block: all ``rows`` of one (batch, head), value-channel block ``j`` (``bv`` columns)."""
  return pl.BlockSpec((None, None, rows, bv), lambda b, h, j: (b, h, 0, j))


def _partial(rows, cols):
  """Output block of Dv block ``j``'s partial sums, ``(B, H, Dv / bv, rows, cols)``."""
  return pl.BlockSpec((None, None, None, rows, cols), lambda b, h, j: (b, h, j, 0, 0))


def _decay(nc, dk):
  """Block: one (batch, head)'s log-decays, ``(NC * Dk,)``."""
  return pl.BlockSpec((None, None, nc * dk), lambda b, h, j: (b, h, 0))


def _flat(x):
  """``(B, H, NC, R, D) -> (B, H, NC * R, D)``; ``(B, H, NC, D) -> (B, H, NC * D)``."""
  return x.reshape(x.shape[:2] + (-1,) + ((x.shape[-1],) if x.ndim == 5 else ()))


def _bv(cfg, c, dk, dv):
  return cfg.block_v or default_block_v(c, dk, dv)


def _call(kernel, name, cfg, grid, args, in_specs, out_specs, out_shape, **static):
  return pl.pallas_call(
      functools.partial(kernel, **static),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret,
      name=name,
  )(*args)


def _static(cfg, **kw):
  return dict(kw, dtype=cfg.dtype)


def forward(w, u0, k_end, gamma, s0, cfg):
  """``(u (B, H, NC, C, Dv), s_final (B, H, Dk, Dv))``, float32."""
  bsz, h, nc, c, dk = w.shape
  dv = u0.shape[-1]
  bv = _bv(cfg, c, dk, dv)
  n = nc * c
  u, s_final = _call(
      _forward_kernel, "delta_state_pass_fwd", cfg, (bsz, h, dv // bv),
      (_flat(w), _flat(u0), _flat(k_end), _flat(gamma), s0),
      [_whole(n, dk), _vblock(n, bv), _whole(n, dk),
       _decay(nc, dk), _vblock(dk, bv)],
      [_vblock(n, bv), _vblock(dk, bv)],
      [jax.ShapeDtypeStruct((bsz, h, n, dv), F32), jax.ShapeDtypeStruct(s0.shape, F32)],
      **_static(cfg, nc=nc, c=c, dk=dk))
  return u.reshape(u0.shape), s_final


def states(k_end, u, gamma, s0, cfg):
  """The state before each chunk, ``(B, H, NC, Dk, Dv)`` float32."""
  bsz, h, nc, c, dk = k_end.shape
  dv = u.shape[-1]
  bv = _bv(cfg, c, dk, dv)
  st = _call(
      _states_kernel, "delta_state_pass_states", cfg, (bsz, h, dv // bv),
      (_flat(k_end), _flat(u), _flat(gamma), s0),
      [_whole(nc * c, dk), _vblock(nc * c, bv),
       _decay(nc, dk), _vblock(dk, bv)],
      _vblock(nc * dk, bv),
      jax.ShapeDtypeStruct((bsz, h, nc * dk, dv), cfg.dtype),
      **_static(cfg, nc=nc, c=c, dk=dk))
  return st.reshape(bsz, h, nc, dk, dv)


def reverse(w, k_end, u, du, gamma, st, ds_final, cfg):
  """``(dw, du0, dk_end, dgamma (B, H, NC, Dk), ds0)``, float32."""
  bsz, h, nc, c, dk = w.shape
  dv = u.shape[-1]
  bv = _bv(cfg, c, dk, dv)
  nvb = dv // bv
  n = nc * c
  dw, du0, dk_end, dgamma, ds0 = _call(
      _reverse_kernel, "delta_state_pass_bwd", cfg, (bsz, h, nvb),
      (_flat(w), _flat(k_end), _flat(u), _flat(du), _flat(gamma), _flat(st), ds_final),
      [_whole(n, dk), _whole(n, dk), _vblock(n, bv), _vblock(n, bv),
       _decay(nc, dk), _vblock(nc * dk, bv),
       _vblock(dk, bv)],
      [_partial(n, dk), _vblock(n, bv), _partial(n, dk),
       pl.BlockSpec((None, None, None, nc * dk), lambda b, h, j: (b, h, j, 0)), _vblock(dk, bv)],
      [jax.ShapeDtypeStruct((bsz, h, nvb, n, dk), F32),
       jax.ShapeDtypeStruct((bsz, h, n, dv), F32),
       jax.ShapeDtypeStruct((bsz, h, nvb, n, dk), F32),
       jax.ShapeDtypeStruct((bsz, h, nvb, nc * dk), F32),
       jax.ShapeDtypeStruct(ds_final.shape, F32)],
      **_static(cfg, nc=nc, c=c, dk=dk))
  # Partial sums over Dv blocks (a size-1 axis, i.e. a free reshape, when block_v = Dv).
  return (jnp.sum(dw, axis=2).reshape(w.shape), du0.reshape(u.shape),
          jnp.sum(dk_end, axis=2).reshape(w.shape), jnp.sum(dgamma, axis=2).reshape(gamma.shape), ds0)


def delta_state_pass_gpu(w, u0, k_end, gamma, s0=None, *, interpret: bool = False,
                         block_v: int | None = None, operand_dtype=F32):
  """The delta rule's sequential state pass over chunks through the Triton kernels.

  ``S = s0``; per chunk ``n``: ``u_n = u0_n - w_n S``, ``S = exp(gamma_n)[:, None] S +
  k_end_n^T u_n`` (``_pallas_common``). Differentiable in every input (custom_vjp; the backward
  recomputes the chunk states).

  Args:
    w, k_end: ``(B, H, NC, C, Dk)``; u0: ``(B, H, NC, C, Dv)``; gamma: ``(B, H, NC, Dg)``,
      ``Dg`` in {1, Dk}, each chunk's total log-decay, finite and ``<= 0`` (clamped by the caller;
      ``exp`` may be exactly 0, a reset); s0: ``(B, H, Dk, Dv)`` or None (zeros). Any float
      dtype, computed in float32; ``C``, ``Dk``, ``Dv`` powers of two >= 16.
    interpret: run in the Pallas interpreter (CPU).
    block_v: value channels per program (a power of two >= 16 dividing Dv); None:
      :func:`default_block_v` (a larger one may overflow shared memory: see the table above it).
    operand_dtype: the dots' operands: float32 (IEEE; exact, slow) or bfloat16 (tensor cores,
      float32 accumulation and state; what bf16 models should use, as fla does).

  Returns:
    ``(u (B, H, NC, C, Dv), s_final (B, H, Dk, Dv))``, float32.
  """
  if s0 is None:
    s0 = jnp.zeros(w.shape[:2] + (w.shape[-1], u0.shape[-1]), F32)
  check_shapes(w, u0, k_end, gamma, s0, block_v=block_v)
  bv = block_v or default_block_v(w.shape[-2], w.shape[-1], u0.shape[-1])
  cfg = common.Config(forward=forward, states=states, reverse=reverse, interpret=bool(interpret),
                      block_v=bv, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                      dtype=jnp.dtype(operand_dtype))
  return common.run(w, u0, k_end, gamma, s0, cfg)


# ------------------------------------------------------------------ stage 1: the WY prepare
#
# Chunk-parallel: grid (B, H, NC), one program per chunk, reading k, v in their (B, N, H, D)
# layout and writing w, u0, k_end in the state pass's (B, H, NC, C, D) one. The forward also
# writes the chunk's inverse T (float32, C x C): the backward reads it instead of repeating the
# C - 1 substitution steps. Decays: none, (H,) or (B, N, H), through the per-chunk prefix sums of
# the linear-attention kernels (``linear_attention._pallas_common.chunk_prefix``; no decay is a
# zero gate, exp(0) = 1 exactly); a per-channel (KDA) decay stays on the XLA path.


def check_prepare_shapes(k, v, g, chunk):
  """Raises ValueError/TypeError for inputs the prepare kernels cannot tile, naming the value."""
  dk, dv = k.shape[-1], v.shape[-1]
  for name, val in (("the chunk size C", chunk), ("head dim Dk", dk), ("head dim Dv", dv)):
    if not is_pow2_at_least_16(val):
      raise ValueError(f"backend 'gpu' needs {name} to be a power of two >= 16 (Triton tiles), "
                       f"got {val}")
  if g is not None and g.shape[-1] != 1:
    raise ValueError(f"backend 'gpu' prepares scalar decays per token only, got a per-channel "
                     f"decay of shape {tuple(g.shape)}: use backend 'xla'")
  if k.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f"backend 'gpu' takes float32 or bfloat16 inputs, got {k.dtype}")
  bsz, n, h, _ = k.shape
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must have k's (B, N, H) = {tuple(k.shape[:3])}, got {tuple(v.shape)}")
  if n % chunk:
    raise ValueError(f"the chunk size C={chunk} must divide the sequence length N={n}")
  for name, size in (("k", k.size), ("v", v.size), ("the chunk inverses", bsz * h * n * chunk)):
    if size >= 2 ** 31:   # the Triton lowering computes element offsets in int32
      raise ValueError(f"backend 'gpu' indexes with int32 offsets: {name} has {size} elements, "
                       f"at most 2**31 - 1 allowed; split the batch")


def _prepare_kernel(k_ref, v_ref, beta_ref, b_ref, seg_ref, w_ref, u0_ref, kend_ref, t_ref, *,
                    c, dtype):
  w, u0, k_end, t = common.prepare_chunk(k_ref[...], v_ref[...], beta_ref[...][:, None],
                                         la_gpu.decay_of_chunk(b_ref, seg_ref, c), dtype)
  w_ref[...], u0_ref[...], kend_ref[...], t_ref[...] = w, u0, k_end, t


def _prepare_bwd_kernel(k_ref, v_ref, beta_ref, b_ref, seg_ref, t_ref, dw_ref, du0_ref, dkend_ref,
                        dk_ref, dv_ref, dbeta_ref, db_ref, *, c, dtype):
  beta_col, t = beta_ref[...][:, None], t_ref[...]
  dv, dbeta, x = common.prepare_chunk_bwd_values(v_ref[...], beta_col, t, du0_ref[...], dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  decay = la_gpu.decay_of_chunk(b_ref, seg_ref, c)
  dk, dbeta, db = common.prepare_chunk_bwd_keys(k_ref[...], beta_col, decay, t, dw_ref[...],
                                                dkend_ref[...], dbeta, x, dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dbeta_ref[...], db_ref[...] = dbeta, db


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  chunk: int
  dtype: object
  interpret: bool
  num_warps: int = PREPARE_NUM_WARPS
  num_stages: int = NUM_STAGES


def _chunk(c, d):
  """Block: chunk ``n`` of one (batch, head) of a ``(B, H, NC, C, D)`` array."""
  return pl.BlockSpec((None, None, None, c, d), lambda b, h, n: (b, h, n, 0, 0))


def _prepare_call(kernel, name, cfg, grid, args, in_specs, out_specs, out_shape):
  return pl.pallas_call(
      functools.partial(kernel, c=cfg.chunk, dtype=cfg.dtype),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret, name=name)(*args)


def _prepare_forward(k, v, beta, b, seg, cfg):
  bsz, n, h, dk = k.shape
  dv, c = v.shape[-1], cfg.chunk
  nc = n // c
  out = lambda d: jax.ShapeDtypeStruct((bsz, h, nc, c, d), F32)  # noqa: E731
  return _prepare_call(
      _prepare_kernel, "delta_prepare_fwd", cfg, (bsz, h, nc), (k, v, beta, b, seg),
      [chunk_tokens(c, dk), chunk_tokens(c, dv)] + [chunk_tokens(c)] * 3,
      [_chunk(c, dk), _chunk(c, dv), _chunk(c, dk), _chunk(c, c)],
      [out(dk), out(dv), out(dk), out(c)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _prepare_vjp(k, v, beta, b, seg, cfg):
  w, u0, k_end, _ = _prepare_forward(k, v, beta, b, seg, cfg)
  return w, u0, k_end


def _prepare_fwd(k, v, beta, b, seg, cfg):
  w, u0, k_end, t = _prepare_forward(k, v, beta, b, seg, cfg)
  return (w, u0, k_end), (k, v, beta, b, seg, t)


def _prepare_bwd(cfg, res, cotangents):
  k, v, beta, b, seg, t = res
  dw, du0, dk_end = (x.astype(F32) for x in cotangents)
  bsz, n, h, dk = k.shape
  dv, c = v.shape[-1], cfg.chunk
  d_k, d_v, d_beta, d_b = _prepare_call(
      _prepare_bwd_kernel, "delta_prepare_bwd", cfg, (bsz, h, n // c),
      (k, v, beta, b, seg, t, dw, du0, dk_end),
      [chunk_tokens(c, dk), chunk_tokens(c, dv)] + [chunk_tokens(c)] * 3 + [_chunk(c, c),
       _chunk(c, dk), _chunk(c, dv), _chunk(c, dk)],
      [chunk_tokens(c, dk), chunk_tokens(c, dv), chunk_tokens(c), chunk_tokens(c)],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
       jax.ShapeDtypeStruct(beta.shape, F32), jax.ShapeDtypeStruct(b.shape, F32)])
  return d_k, d_v, d_beta, d_b, jnp.zeros_like(seg)


_prepare_vjp.defvjp(_prepare_fwd, _prepare_bwd)


def prepare_chunks_gpu(k, v, beta, g, chunk, *, interpret: bool = False, operand_dtype=None):
  """Stage 1 of the delta rule (``reference.prepare_chunks``) through the Triton kernels.

  Args:
    k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``, float32 or bfloat16; beta: ``(B, N, H)``.
    g: None or the clamped per-token log-decay ``(B, N, H, 1)`` (``la_ref.per_token_log_decay``).
    chunk: tokens per chunk, a power of two >= 16 dividing N; Dk, Dv powers of two >= 16.
    interpret: run in the Pallas interpreter (CPU).
    operand_dtype: the dots' operands; None: k's dtype. bfloat16: tensor cores, the solve's dots
      split into bf16 heads and tails (``_pallas_util.matmul_split``); float32: IEEE.

  Returns:
    ``reference.DeltaChunks``, float32, differentiable in k, v, beta and g.
  """
  check_prepare_shapes(k, v, g, chunk)
  bsz, n, h, _ = k.shape
  gate = jnp.zeros((bsz, n, h), F32) if g is None else g[..., 0].astype(F32)
  b, seg = la_common.chunk_prefix(gate, chunk)
  cfg = PrepareConfig(chunk=chunk, dtype=jnp.dtype(operand_dtype or k.dtype),
                      interpret=bool(interpret))
  w, u0, k_end = _prepare_vjp(k, v, beta.astype(F32), b, seg, cfg)
  gamma = jnp.sum(gate.reshape(bsz, n // chunk, chunk, h), axis=2).transpose(0, 2, 1)[..., None]
  return reference.DeltaChunks(w=w, u0=u0, k_end=k_end, gamma=gamma)
