"""Flash-style softmax attention in pure jnp: blockwise over keys with an online softmax.

Queries ``(B, Nq, H, D)`` attend to keys/values ``(B, Nk, Hkv, D)`` (grouped-query: query head ``h``
uses key head ``h // (H / Hkv)``), masked by *positions* (a query at position i sees keys at
positions <= i when causal) and optionally by segment ids (packed documents). Positions are
arbitrary integer vectors, so the same kernel serves a device's own queries against keys gathered
from the whole sequence in any layout (contiguous or zigzag): the mask is always by true global
positions.

Work: the score matrix is cut into ``block_q x block_k`` tiles; tiles with no visible entry are
*skipped* (a ``lax.switch`` branch that does nothing, so the work really is not done, which is what
makes the zigzag layout balance causal attention), tiles with every entry visible are computed
without a mask, and only the tiles that straddle the causal diagonal or a document boundary are
masked. At no time is more than one ``(B, H, block_q, block_k)`` tile of scores alive.

Backward: a ``custom_vjp`` that saves only ``o`` and the row logsumexp and recomputes each tile's
probabilities from them (FlashAttention-2's backward), with the loop over key blocks outside so that
``dK, dV`` of a key block are accumulated in tile-sized loop carries.

Backend choice: this XLA path, on every backend, for now. Measured on this project's 2-core CPU
machine, shared with other jobs (``python benchmarks/lasp2h.py --compare-dpa``; one device, causal,
B=1 N=4096 H=4 D=64 f32, forward+backward): ``jax.nn.dot_product_attention(implementation="xla")``
took 7.6 to 14.4 s (three runs) with 1032 MiB of temporaries (it builds the full score matrix: not
flash), this kernel 1.6 to 2.2 s with 36 MiB. On GPU the cuDNN implementation of
``jax.nn.dot_product_attention`` is flash, but its masks are the standard causal one in *local*
indices, sliding windows and sequence lengths: a device's queries at true positions (an offset that
is the traced device index, or two zigzag segments) against the gathered keys, and segment ids, need
a dense ``(Nq, Nk)`` mask or bias, which is what flash must avoid. So it is not a correct choice for
LASP-2H as specified; not measured on GPU here (no GPU in this task). A Pallas kernel is the next
step for GPU/TPU speed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lasp_jax.kernels._checks import check_float_array

DEFAULT_BLOCK = 512
_NEG_INF = -jnp.inf


class _Config(NamedTuple):
  causal: bool
  scale: float
  block_q: int
  block_k: int
  has_segments: bool


def check_positive_int(name, value):
  """ValueError naming ``name`` unless ``value`` is a positive int (a tile size, a length)."""
  # bool is an int to Python, but block_q=True is a bug, not a tile size of 1.
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_block(name, block, n):
  """A tile size: a positive int that divides the length ``n`` it tiles."""
  check_positive_int(name, block)
  if n % block:
    raise ValueError(f"{name}={block} does not divide the sequence length {n}")


def pick_block(n: int, target: int = DEFAULT_BLOCK) -> int:
  """The largest divisor of ``n`` that is <= ``target`` (``n`` itself when ``n <= target``).

  When that divisor is below ``target / 8`` (an awkward ``n`` such as a prime), ``n`` itself: one
  large tile costs memory, but thousands of tiny ones would cost a loop step per tile pair.
  """
  check_positive_int("n", n)
  check_positive_int("target", target)
  if n <= target:
    return n
  best = next(b for b in range(target, 0, -1) if n % b == 0)
  return n if best < target // 8 else best


def _block_reduce(x, block, fn):
  """``fn`` over consecutive blocks of the last axis: ``(..., n) -> (..., n / block)``."""
  return fn(x.reshape(*x.shape[:-1], x.shape[-1] // block, block), axis=-1)


def block_classes(q_positions, kv_positions, block_q, block_k, *, causal=True,
                  q_segment_ids=None, kv_segment_ids=None, xp=jnp):
  """What the kernel does with each score tile: 0 skip, 1 compute with a mask, 2 compute unmasked.

  Args:
    q_positions: ``(Nq,)`` int; kv_positions: ``(Nk,)`` int.
    block_q, block_k: tile sizes (must divide Nq, Nk).
    q_segment_ids: ``(B, Nq)`` int or None; kv_segment_ids: ``(B, Nk)`` int or None.
    xp: ``jnp`` (inside the kernel, traced) or ``np`` (to count work on the host).

  Returns:
    ``(Nq / block_q, Nk / block_k)`` int32. A tile is skipped only when no entry of it is visible
    for any batch element (a conservative test on per-tile min/max, exact for sorted positions).
  """
  qp = xp.asarray(q_positions)
  kp = xp.asarray(kv_positions)
  nq, nk = qp.shape[0] // block_q, kp.shape[0] // block_k
  any_visible = xp.ones((nq, nk), bool)
  all_visible = xp.ones((nq, nk), bool)
  if causal:
    q_max = _block_reduce(qp, block_q, xp.max)
    q_min = _block_reduce(qp, block_q, xp.min)
    k_max = _block_reduce(kp, block_k, xp.max)
    k_min = _block_reduce(kp, block_k, xp.min)
    any_visible = any_visible & (q_max[:, None] >= k_min[None, :])
    all_visible = all_visible & (q_min[:, None] >= k_max[None, :])
  if q_segment_ids is not None:
    qs, ks = xp.asarray(q_segment_ids), xp.asarray(kv_segment_ids)
    qs_min, qs_max = _block_reduce(qs, block_q, xp.min), _block_reduce(qs, block_q, xp.max)
    ks_min, ks_max = _block_reduce(ks, block_k, xp.min), _block_reduce(ks, block_k, xp.max)
    overlap = ((qs_min[:, :, None] <= ks_max[:, None, :])
               & (ks_min[:, None, :] <= qs_max[:, :, None]))
    one_doc = ((qs_min == qs_max)[:, :, None] & (ks_min == ks_max)[:, None, :]
               & (qs_min[:, :, None] == ks_min[:, None, :]))
    any_visible = any_visible & xp.any(overlap, axis=0)
    all_visible = all_visible & xp.all(one_doc, axis=0)
  return (any_visible.astype(xp.int32) + (any_visible & all_visible).astype(xp.int32))


def validate_inputs(q, k, v, q_positions=None, kv_positions=None, q_segment_ids=None,
                    kv_segment_ids=None, block_q=None, block_k=None):
  """Shape/dtype checks; raises ValueError/TypeError naming the offending value."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_float_array(name, x, "(B, N, H, D)")
    # B = 0 is just an empty result, but N, H or D = 0 would reach a division by zero.
    if 0 in x.shape[1:]:
      raise ValueError(f"{name} must have N, H, D > 0, got shape {tuple(x.shape)}")
  bsz, nq, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and "
                     f"v {tuple(v.shape)}")
  if k.shape[0] != bsz or k.shape[3] != d:
    raise ValueError(f"k must have shape (B={bsz}, Nk, Hkv, D={d}), got {tuple(k.shape)}")
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f"query heads H={h} must be a multiple of key/value heads Hkv={hkv}")
  nk = k.shape[1]
  for name, pos, n in (("q_positions", q_positions, nq), ("kv_positions", kv_positions, nk)):
    if pos is None:
      continue
    if tuple(pos.shape) != (n,):
      raise ValueError(f"{name} must have shape ({n},), got {tuple(pos.shape)}")
    if not jnp.issubdtype(pos.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer array, got dtype {pos.dtype}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  for name, seg, n in (("q_segment_ids", q_segment_ids, nq),
                       ("kv_segment_ids", kv_segment_ids, nk)):
    if seg is None:
      continue
    if tuple(seg.shape) != (bsz, n):
      raise ValueError(f"{name} must have shape (B, N)={(bsz, n)}, got {tuple(seg.shape)}")
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array, got dtype {seg.dtype}")
  for name, blk, n in (("block_q", block_q, nq), ("block_k", block_k, nk)):
    if blk is not None:
      _check_block(name, blk, n)


def _tile_mask(cfg, qp, kp, qs, ks):
  """``(B or 1, 1, 1, bq, bk)`` bool visibility of one tile."""
  mask = jnp.ones((1, 1, 1, qp.shape[0], kp.shape[0]), bool)
  if cfg.causal:
    mask = mask & (qp[:, None] >= kp[None, :])[None, None, None]
  if cfg.has_segments:
    mask = mask & (qs[:, :, None] == ks[:, None, :])[:, None, None]
  return mask


def _scores(cfg, qb, kb):
  """``qb (B, bq, G, R, D)``, ``kb (B, bk, G, D)`` -> float32 ``(B, G, R, bq, bk)``."""
  s = jnp.einsum("bqgrd,bkgd->bgrqk", qb, kb, preferred_element_type=jnp.float32)
  return s * cfg.scale


def _split_heads(x, hkv):
  """``(B, N, H, D) -> (B, N, Hkv, H / Hkv, D)``."""
  return x.reshape(*x.shape[:2], hkv, x.shape[2] // hkv, x.shape[3])


def _to_blocks(x, block, axis=1):
  """Split ``axis`` into ``(n / block, block)`` and move the block index to the front."""
  shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


def _from_blocks(x, axis=1):
  """Inverse of ``_to_blocks``."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _filled(value, shape, refs):
  """float32 ``full(shape, value)`` that varies over every manual mesh axis any of ``refs`` does.

  Inside a ``shard_map`` with ``check_vma=True``, loop carries and switch branches must agree on
  which mesh axes a value varies over; a bare ``jnp.zeros`` varies over none, while tiles computed
  from sharded inputs vary over the sequence axis. ``lax.full_like`` inherits that property from
  its argument (public API on JAX 0.10 and 0.11); outside a ``shard_map`` this is a plain fill.
  """
  out = jnp.full(shape, value, jnp.float32)
  for r in refs:
    if r is not None:
      out = out + jax.lax.full_like(r, 0, jnp.float32, shape=())
  return out


def _segment_blocks(cfg, q_seg, kv_seg, nq, nk):
  """Segment ids per tile, ``(nq, B, bq)`` and ``(nk, B, bk)``; placeholders when absent."""
  if q_seg is None:  # scan needs something to slice; the tiles never read it
    return (jnp.zeros((nq // cfg.block_q, 1, 1), jnp.int32),
            jnp.zeros((nk // cfg.block_k, 1, 1), jnp.int32))
  return _to_blocks(q_seg, cfg.block_q), _to_blocks(kv_seg, cfg.block_k)


def _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  """Returns ``o (B, Nq, H, D)`` in q's dtype and ``lse (B, Hkv, R, Nq)`` float32."""
  bsz, nq_len, h, d = q.shape
  hkv = k.shape[2]
  rep = h // hkv
  classes = block_classes(q_pos, kv_pos, cfg.block_q, cfg.block_k, causal=cfg.causal,
                          q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  q_blocks = _to_blocks(_split_heads(q, hkv), cfg.block_q)                 # (nq, B, bq, G, R, D)
  k_blocks = _to_blocks(k, cfg.block_k)                                   # (nk, B, bk, G, D)
  v_blocks = _to_blocks(v, cfg.block_k)
  qp_blocks = q_pos.reshape(-1, cfg.block_q)
  kp_blocks = kv_pos.reshape(-1, cfg.block_k)
  qs_blocks, ks_blocks = _segment_blocks(cfg, q_seg, kv_seg, q_pos.shape[0], kv_pos.shape[0])
  num_k = k_blocks.shape[0]
  refs = (q, k, v, q_pos, kv_pos, q_seg, kv_seg)

  def q_step(_, xs):
    qb, qp, qs, cls_row = xs

    def tile(masked, j, carry):
      m, l, acc = carry
      kb, vb = k_blocks[j], v_blocks[j]
      s = _scores(cfg, qb, kb)
      if masked:
        mask = _tile_mask(cfg, qp, kp_blocks[j], qs, ks_blocks[j])
        s = jnp.where(mask, s, _NEG_INF)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      # A row that has seen no visible key yet keeps m = -inf; exponentiate against 0 instead so
      # that exp(-inf - (-inf)) never makes a NaN.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), vb,
                      preferred_element_type=jnp.float32)
      return m_new, l, alpha[..., None] * acc + pv

    def k_step(j, carry):
      return jax.lax.switch(cls_row[j], [lambda j, c: c, functools.partial(tile, True),
                                         functools.partial(tile, False)], j, carry)

    init = (_filled(_NEG_INF, (bsz, hkv, rep, cfg.block_q), refs),
            _filled(0.0, (bsz, hkv, rep, cfg.block_q), refs),
            _filled(0.0, (bsz, hkv, rep, cfg.block_q, d), refs))
    m, l, acc = jax.lax.fori_loop(0, num_k, k_step, init)
    visible = l > 0  # rows that saw no key at all give o = 0 (and zero gradients)
    o = acc / jnp.where(visible, l, 1.0)[..., None]
    lse = jnp.where(visible, m + jnp.log(jnp.where(visible, l, 1.0)), _NEG_INF)
    o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(bsz, cfg.block_q, h, d)   # (B, bq, H, D)
    return None, (o.astype(q.dtype), lse)

  _, (o_blocks, lse_blocks) = jax.lax.scan(q_step, None,
                                           (q_blocks, qp_blocks, qs_blocks, classes))
  o = _from_blocks(o_blocks)                                                  # (B, Nq, H, D)
  lse = jnp.moveaxis(lse_blocks, 0, 3).reshape(bsz, hkv, rep, nq_len)
  return o, lse


def _backward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do):
  """Float32 ``(dq, dk, dv)`` from the saved ``o`` and ``lse``, recomputing tiles."""
  bsz, nq_len, h, d = q.shape
  hkv = k.shape[2]
  rep = h // hkv
  f32 = jnp.float32
  classes = block_classes(q_pos, kv_pos, cfg.block_q, cfg.block_k, causal=cfg.causal,
                          q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax Jacobian's row term.
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)                    # (B, Nq, H)
  delta = jnp.transpose(delta.reshape(bsz, nq_len, hkv, rep), (0, 2, 3, 1))   # (B, G, R, Nq)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  q_blocks = _to_blocks(_split_heads(q, hkv), cfg.block_q)                  # (nq, B, bq, G, R, D)
  do_blocks = _to_blocks(_split_heads(do.astype(q.dtype), hkv), cfg.block_q)
  lse_blocks = _to_blocks(lse_safe, cfg.block_q, axis=3)                    # (nq, B, G, R, bq)
  delta_blocks = _to_blocks(delta, cfg.block_q, axis=3)
  qp_blocks = q_pos.reshape(-1, cfg.block_q)
  kp_blocks = kv_pos.reshape(-1, cfg.block_k)
  num_q = q_blocks.shape[0]
  qs_blocks, ks_blocks = _segment_blocks(cfg, q_seg, kv_seg, nq_len, kv_pos.shape[0])
  k_blocks = _to_blocks(k, cfg.block_k)
  v_blocks = _to_blocks(v, cfg.block_k)
  dq_shape = (bsz, cfg.block_q, hkv, rep, d)
  refs = (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do)

  def k_step(dq_acc, xs):
    kb, vb, kp, ks, cls_col = xs

    def tile(masked, i, carry):
      dk, dv = carry
      qb, dob = q_blocks[i], do_blocks[i]
      s = _scores(cfg, qb, kb)
      if masked:
        mask = _tile_mask(cfg, qp_blocks[i], kp, qs_blocks[i], ks)
        s = jnp.where(mask, s, _NEG_INF)
      p = jnp.exp(s - lse_blocks[i][..., None])                              # (B, G, R, bq, bk)
      dv = dv + jnp.einsum("bgrqk,bqgrd->bkgd", p.astype(do.dtype), dob,
                           preferred_element_type=f32)
      dp = jnp.einsum("bqgrd,bkgd->bgrqk", dob, vb, preferred_element_type=f32)
      ds = p * (dp - delta_blocks[i][..., None]) * cfg.scale
      dk = dk + jnp.einsum("bgrqk,bqgrd->bkgd", ds.astype(q.dtype), qb, preferred_element_type=f32)
      dq = jnp.einsum("bgrqk,bkgd->bqgrd", ds.astype(k.dtype), kb, preferred_element_type=f32)
      return (dk, dv), dq

    def skip(i, carry):
      return carry, _filled(0.0, dq_shape, refs)

    def q_step(i, carry):
      dk_dv, dq_acc = carry
      dk_dv, dq = jax.lax.switch(cls_col[i], [skip, functools.partial(tile, True),
                                              functools.partial(tile, False)], i, dk_dv)
      # The dq update stays outside the switch so the full dq buffer is updated in place rather
      # than threaded (and possibly copied) through both branches.
      return dk_dv, dq_acc.at[i].add(dq)

    zeros_kv = _filled(0.0, kb.shape, refs)
    (dk, dv), dq_acc = jax.lax.fori_loop(0, num_q, q_step, ((zeros_kv, zeros_kv), dq_acc))
    return dq_acc, (dk, dv)

  dq0 = _filled(0.0, (num_q,) + dq_shape, refs)
  dq_blocks, (dk_blocks, dv_blocks) = jax.lax.scan(
      k_step, dq0, (k_blocks, v_blocks, kp_blocks, ks_blocks, classes.T))
  dq = _from_blocks(dq_blocks).reshape(bsz, nq_len, h, d)
  return dq, _from_blocks(dk_blocks), _from_blocks(dv_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  return _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]


def _flash_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
  o, lse = _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
  return o, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  dq, dk, dv = _backward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do)
  # Positions and segment ids are integers: no cotangent (None means zero).
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def segment_ids_for_kernel(*named_ids):
  """Segment ids as jax arrays of one integer dtype that holds every id: no two documents merge.

  Args:
    named_ids: ``(name, ids)`` pairs; ids an integer array (numpy or jax, concrete or traced) or
      None. They are compared with one another, so they get one dtype.

  Returns:
    The ids in order (None stays None) in their common dtype when JAX holds it, so their width
    is kept (uint32 stays uint32; int64 stays int64 under ``jax_enable_x64``). Where JAX would
    narrow it (int64/uint64 numpy ids with x64 off; uint32 beside signed ids, whose common type is
    int64) they become int32 after a check of concrete ids: ValueError naming the max and min when
    they leave the int32 range. Contract for traced ids: JAX has already given them a dtype it
    holds, which is kept; only traced ids of mixed dtypes needing int64 are refused, unchecked.
  """
  present = [(name, ids) for name, ids in named_ids if ids is not None]
  if not present:
    return tuple(None for _ in named_ids)
  # numpy's promotion, not JAX's: with x64 off JAX would already answer the narrowed int32.
  dtypes = [np.dtype(ids.dtype) for _, ids in present]
  dtype = np.result_type(*dtypes)
  # (uint64 with int64 promotes to float64: not an id type either.)
  if jax.dtypes.canonicalize_dtype(dtype) != dtype or not np.issubdtype(dtype, np.integer):
    info = np.iinfo(np.int32)
    for name, ids in present:
      if isinstance(ids, jax.core.Tracer):
        raise ValueError(f"{name}: traced segment ids of dtypes {[str(d) for d in dtypes]} are "
                         f"compared as {dtype}, which JAX holds only with jax_enable_x64; pass "
                         f"ids of one dtype")
      ids = np.asarray(ids)
      if ids.size and (ids.max() > info.max or ids.min() < info.min):
        raise ValueError(f"{name} must lie in the int32 range [{info.min}, {info.max}] (dtype "
                         f"{ids.dtype}, x64 off), got max {ids.max()} and min {ids.min()}; "
                         f"renumber the documents or enable jax_enable_x64")
    dtype = np.dtype(np.int32)

  def convert(ids):
    if ids is None or isinstance(ids, jax.Array):
      return None if ids is None else ids.astype(dtype)
    return jnp.asarray(np.asarray(ids).astype(dtype))  # on the host: JAX never narrows it itself

  return tuple(convert(ids) for _, ids in named_ids)


def make_config(q, k, *, causal, scale, block_q, block_k, has_segments):
  """Resolves defaults (``scale=D**-0.5``, tile sizes that divide the lengths) into a config."""
  d = q.shape[-1]
  scale = float(d ** -0.5 if scale is None else scale)
  block_q = pick_block(q.shape[1]) if block_q is None else block_q
  block_k = pick_block(k.shape[1]) if block_k is None else block_k
  _check_block("block_q", block_q, q.shape[1])
  _check_block("block_k", block_k, k.shape[1])
  return _Config(bool(causal), scale, int(block_q), int(block_k), bool(has_segments))


def forward(cfg, q, k, v, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
  """The kernel's forward pass alone: ``(o, lse)``. For ops that wrap it in their own custom_vjp."""
  return _forward(cfg, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)


def backward(cfg, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, o, lse, do):
  """The kernel's backward pass alone: float32 ``(dq, dk, dv)``."""
  return _backward(cfg, q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, o,
                   lse, do)


def flash_attention(q, k, v, *, causal=True, scale=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, block_q=None, block_k=None):
  """Softmax attention, blockwise with an online softmax, and its flash backward.

  Args:
    q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, Hkv, D)`` with ``H % Hkv == 0``; float32, bfloat16 or
      float16.
    causal: a query sees keys whose position is <= its own.
    scale: multiplies the scores; None means ``D ** -0.5``.
    q_positions: ``(Nq,)`` int, default ``arange(Nq)``; kv_positions: ``(Nk,)`` int, default
      ``arange(Nk)``. The causal mask compares these, so they must be true global positions.
    q_segment_ids, kv_segment_ids: ``(B, Nq)``, ``(B, Nk)`` int, both or neither: a query sees
      only keys of its own segment. Compared at their common width (``segment_ids_for_kernel``).
    block_q, block_k: tile sizes; None picks the largest divisor of the length <= 512.

  Returns:
    ``o (B, Nq, H, D)`` in q's dtype. Rows that see no key give 0.
  """
  validate_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, block_q,
                  block_k)
  cfg = make_config(q, k, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                    has_segments=q_segment_ids is not None)
  q_pos = jnp.arange(q.shape[1], dtype=jnp.int32) if q_positions is None else q_positions
  kv_pos = jnp.arange(k.shape[1], dtype=jnp.int32) if kv_positions is None else kv_positions
  q_seg, kv_seg = segment_ids_for_kernel(("q_segment_ids", q_segment_ids),
                                         ("kv_segment_ids", kv_segment_ids))
  return _flash(cfg, q, k, v, q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32), q_seg, kv_seg)
