"""Short causal depthwise convolution, sequence parallel by a halo exchange (design §12).

    y_t = act(bias + sum_{j=0}^{K-1} weight[j] * x_{t-(K-1)+j})      (the last tap is token t)

with zeros before the sequence and before every document start (``segment_ids``). Two entry points,
as for LASP-2:
- ``causal_conv1d``: global ``(B, N, C)`` arrays; splits N over a mesh axis when there is one.
- ``causal_conv1d_shard``: the per-shard op, inside the caller's own ``jax.shard_map``.

Under sequence parallelism each segment needs the ``K - 1`` tokens before it in natural order: its
halo. Contiguous: device ``r`` receives the tail of device ``r - 1`` (one ``ppermute``). Zigzag:
device ``r`` holds ``z_r`` and ``z_{2W-1-r}``; the predecessor of ``z_r`` is the first half of
device ``r - 1`` and that of ``z_{2W-1-r}`` the second half of device ``r + 1``, except on the last
device, whose second segment follows its own first (two ``ppermute``s, opposite directions). Each
sends ``(K - 1) B C`` values (plus ``(K - 1) B`` ids with segment ids), whatever N; the backward is
the transposed ``ppermute``. A device with no predecessor receives zeros, which is the zero padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lasp_jax.kernels._checks import check_float_array
from lasp_jax.sequence_parallel import layout as layout_lib
from lasp_jax.sequence_parallel import sharding

ACTIVATIONS = (None, "silu")


def _validate(x, weight, bias, activation, segment_ids, layout):
  check_float_array("x", x, "(B, N, C)")
  channels = x.shape[-1]
  if not hasattr(weight, "shape") or weight.ndim != 2 or weight.shape[1] != channels:
    raise ValueError(f"weight must have shape (K, C) = (K, {channels}) for x {x.shape}, got "
                     f"{getattr(weight, 'shape', type(weight).__name__)}")
  if weight.shape[0] < 1:
    raise ValueError(f"kernel size K must be >= 1, got weight of shape {weight.shape}")
  if bias is not None and getattr(bias, "shape", None) != (channels,):
    raise ValueError(f"bias must have shape (C,) = ({channels},), got "
                     f"{getattr(bias, 'shape', type(bias).__name__)}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if segment_ids is not None:
    if getattr(segment_ids, "shape", None) != x.shape[:2]:
      raise ValueError(f"segment_ids must have shape (B, N) = {x.shape[:2]}, got "
                       f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise TypeError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")
  layout_lib.check_layout(layout)


def _conv_segment(x_BxLxC, halo_BxHxC, weight_KxC, seg_BxL=None, halo_seg_BxH=None):
  """The taps of one contiguous run of tokens given the ``H = K - 1`` tokens before it, float32.

  A tap ``d`` tokens back is kept only if no document starts in ``(t - d, t]``; dropped taps are
  selected away (``where``), so a NaN or inf in another document never reaches this one.
  """
  k = weight_KxC.shape[0]
  length = x_BxLxC.shape[1]
  xx = jnp.concatenate([halo_BxHxC, x_BxLxC], axis=1).astype(jnp.float32)
  w = weight_KxC.astype(jnp.float32)
  y = xx[:, k - 1:] * w[k - 1]
  if seg_BxL is not None:
    ids = jnp.concatenate([halo_seg_BxH, seg_BxL], axis=1)
    same_as_prev = ids[:, 1:] == ids[:, :-1]                      # (B, H + L - 1): i continues i-1
    keep = jnp.ones(seg_BxL.shape, bool)
  for d in range(1, k):  # d tokens back: tap j = K - 1 - d
    tap = xx[:, k - 1 - d: k - 1 - d + length]
    if seg_BxL is not None:
      # token t - d + 1 continues t - d, on top of every token in between (d - 1 checked before)
      keep = keep & same_as_prev[:, k - 1 - d: k - 1 - d + length]
      tap = jnp.where(keep[..., None], tap, 0.0)
    y = y + tap * w[k - 1 - d]
  return y


def _finish(y, bias, activation, dtype):
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  if activation == "silu":
    y = jax.nn.silu(y)
  return y.astype(dtype)


def _halos(tails, axis_name, layout):
  """Each local segment's predecessor tail, by ``ppermute`` over ``axis_name`` (see module doc).

  ``tails``: per local segment, its last ``K - 1`` tokens (any pytree, e.g. values and ids).
  """
  w = jax.lax.axis_size(axis_name)
  down = [(r, r + 1) for r in range(w - 1)]   # r's tail -> r + 1
  if layout == "contiguous":
    return [jax.lax.ppermute(tails[0], axis_name, down)]
  up = [(r + 1, r) for r in range(w - 1)]     # r + 1's second-half tail -> r
  first = jax.lax.ppermute(tails[0], axis_name, down)
  second = jax.lax.ppermute(tails[1], axis_name, up)
  # The last device's second segment z_W follows its own first segment z_{W-1}.
  last = jax.lax.axis_index(axis_name) == w - 1
  second = jax.tree.map(lambda own, got: jnp.where(last, own, got), tails[0], second)
  return [first, second]


def causal_conv1d_shard(x, weight, bias=None, *, axis_name=None, activation=None,
                        segment_ids=None, layout="contiguous"):
  """The short causal conv on local shards, inside the caller's ``jax.shard_map``.

  Args:
    x: ``(B, L, C)``: this device's shard of the sequence (``layout`` order); float.
    weight: ``(K, C)`` depthwise taps, ``weight[K-1]`` on the current token; bias: None or ``(C,)``.
    axis_name: the mesh axis the sequence is split over; None: the whole sequence is local.
    activation: None or ``"silu"``.
    segment_ids: None or ``(B, L)`` int, this shard's ids: taps never cross a document start.
    layout: ``"contiguous"`` or ``"zigzag"`` (two segments per shard, design §5).

  Returns:
    ``y (B, L, C)`` in x's dtype, the matching rows of the unsplit convolution.
  """
  _validate(x, weight, bias, activation, segment_ids, layout)
  k = weight.shape[0]
  nseg = layout_lib.segments_per_shard(layout) if axis_name is not None else 1
  seg_len = x.shape[1] // nseg
  if axis_name is not None and seg_len < k - 1:
    raise ValueError(
        f"each local segment has {seg_len} tokens (local length {x.shape[1]}, layout {layout!r}) "
        f"but kernel size K={k} needs K-1={k - 1} tokens from one predecessor: use fewer devices "
        f"or a longer sequence")
  bsz, h = x.shape[0], k - 1
  # Segments stacked on the batch axis: one use of the weight, so one gradient all-reduce.
  x_s = layout_lib.to_segments(x, nseg)                                    # (S B, L, C)
  ids_s = layout_lib.to_segments(segment_ids, nseg)
  if axis_name is None or h == 0:
    halo = jnp.zeros((x_s.shape[0], h, x_s.shape[2]), x.dtype)
    halo_ids = None if ids_s is None else jnp.zeros((x_s.shape[0], h), ids_s.dtype)
  else:
    per_segment = lambda a: [None if a is None else a[s * bsz:(s + 1) * bsz]  # noqa: E731
                             for s in range(nseg)]
    tail_ids = None if ids_s is None else ids_s[:, seg_len - h:]
    with jax.named_scope("conv_halo_exchange"):
      halos = _halos(list(zip(per_segment(x_s[:, seg_len - h:]), per_segment(tail_ids))),
                     axis_name, layout)
    halo = jnp.concatenate([hx for hx, _ in halos])
    halo_ids = None if ids_s is None else jnp.concatenate([hi for _, hi in halos])
  # Without a predecessor the halo is zeros, so its taps add nothing whatever its ids say.
  y = layout_lib.from_segments(_conv_segment(x_s, halo, weight, ids_s, halo_ids), nseg)
  return _finish(y, bias, activation, x.dtype)


def causal_conv1d_step(x_BxC, state_BxHxC, weight, bias=None, *, activation=None):
  """One token of the short causal conv: the decode step (design §14).

  Args:
    x_BxC: ``(B, C)``, the new token's inputs.
    state_BxHxC: ``(B, K - 1, C)``, the ``K - 1`` inputs before it in order (zeros before a
      document's start: ``conv_state``).
    weight, bias, activation: as ``causal_conv1d``.

  Returns:
    ``(y (B, C) in x's dtype, the new state (B, K - 1, C))``.
  """
  check_float_array("x", x_BxC, "(B, C)")
  _validate(x_BxC[:, None], weight, bias, activation, None, "contiguous")
  want = (x_BxC.shape[0], weight.shape[0] - 1, x_BxC.shape[1])
  if getattr(state_BxHxC, "shape", None) != want:
    raise ValueError(f"state must have shape (B, K - 1, C) = {want}, got "
                     f"{getattr(state_BxHxC, 'shape', type(state_BxHxC).__name__)}")
  y = _conv_segment(x_BxC[:, None], state_BxHxC, weight)[:, 0]
  window = jnp.concatenate([state_BxHxC, x_BxC[:, None].astype(state_BxHxC.dtype)], axis=1)
  return _finish(y, bias, activation, x_BxC.dtype), window[:, 1:]


def conv_state(x_BxNxC, kernel_size: int, *, segment_ids=None, layout="contiguous",
               num_shards: int = 1):
  """The decode state after a prefill: the last ``K - 1`` inputs in natural order, ``(B, K-1, C)``.

  Inputs outside the last token's document (``segment_ids (B, N)``) and before the sequence are
  zeros, the conv's zero padding. ``x`` may be in ``layout`` order over ``num_shards`` shards.
  """
  h = kernel_size - 1
  bsz, n, c = x_BxNxC.shape
  take = min(h, n)
  tail = layout_lib.natural_rows(x_BxNxC, n - take, n, layout, num_shards)
  if segment_ids is not None:
    ids = layout_lib.natural_rows(segment_ids, n - take, n, layout, num_shards)
    # Row r is in the last document when no document starts after it.
    cont = jnp.concatenate([ids[:, 1:] == ids[:, :-1], jnp.ones_like(ids[:, :1], bool)], axis=1)
    keep = jnp.flip(jnp.cumprod(jnp.flip(cont, 1).astype(jnp.int32), axis=1), 1) > 0
    tail = jnp.where(keep[..., None], tail, jnp.zeros_like(tail))
  if take < h:
    tail = jnp.concatenate([jnp.zeros((bsz, h - take, c), tail.dtype), tail], axis=1)
  return tail


def _sequence_mesh(mesh, seq_axis):
  """The mesh to split over, or None for one device: an explicit mesh must have ``seq_axis``; the
  ``jax.set_mesh`` context is used only when it has it."""
  if mesh is not None:
    sharding.axis_size(mesh, seq_axis, "seq_axis")
    return mesh
  ctx = jax.sharding.get_abstract_mesh()
  if ctx is not None and seq_axis in getattr(ctx, "axis_names", ()):
    return ctx
  return None


def causal_conv1d(x, weight, bias=None, *, activation=None, segment_ids=None, mesh=None,
                  seq_axis="sp", batch_axis=None, layout="contiguous"):
  """Short causal depthwise conv1d (design §12) on global arrays.

  Args:
    x: ``(B, N, C)`` float, sequence in ``layout`` order (sharded or not: it is resharded).
    weight: ``(K, C)``: ``y_t = act(bias + sum_j weight[j] * x_{t-(K-1)+j})``; bias: None or ``(C,)``.
    activation: None or ``"silu"``.
    segment_ids: None or ``(B, N)`` int in the layout of x; a document starts wherever the id
      differs from the previous token's in natural order, and no tap reaches before it.
    mesh: a mesh with axis ``seq_axis`` to split N over; None: the ``jax.set_mesh`` context if it
      has ``seq_axis``, else one device. ``batch_axis``: optional mesh axis that splits B.
    layout: ``"contiguous"`` or ``"zigzag"`` (``lasp_jax.zigzag``); with one device both are the
      natural order.

  Returns:
    ``y (B, N, C)`` in x's dtype (sharded like x under a mesh).
  """
  _validate(x, weight, bias, activation, segment_ids, layout)
  mesh = _sequence_mesh(mesh, seq_axis)
  if mesh is None:
    return causal_conv1d_shard(x, weight, bias, activation=activation, segment_ids=segment_ids)
  w = sharding.axis_size(mesh, seq_axis, "seq_axis")
  nb = sharding.axis_size(mesh, batch_axis, "batch_axis")
  bsz, n = x.shape[:2]
  nseg = layout_lib.segments_per_shard(layout)
  if n % (w * nseg):
    raise ValueError(f"sequence length N={n} must be a multiple of {'2 * ' if nseg == 2 else ''}"
                     f"the {seq_axis!r} axis size {w}")
  if bsz % nb:
    raise ValueError(f"batch size B={bsz} is not a multiple of the {batch_axis!r} axis size {nb}")
  x_spec, seq_spec = P(batch_axis, seq_axis, None), P(batch_axis, seq_axis)
  fn = functools.partial(causal_conv1d_shard, axis_name=seq_axis, activation=activation,
                         layout=layout)
  return sharding.shard_map(
      lambda x, wt, b, s: fn(x, wt, b, segment_ids=s), mesh,
      (x_spec, P(None, None), P(None), seq_spec), x_spec, (x, weight, bias, segment_ids))
