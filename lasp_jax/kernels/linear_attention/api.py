"""Public entry point of the linear-attention kernels: validates inputs, picks a backend.

Input contract shared by every linear op (``chunk_linear_attention``, ``lasp_jax.linear_attention``,
``lasp2``, ``lasp2_attention``), checked by :func:`validate_inputs`:

- log-decays lie in ``[-inf, 0]``; ``-inf`` is an exact reset (``reference`` module docstring). A
  positive entry (e.g. ``0.9`` passed instead of ``log(0.9)``) is a ValueError when the decay is
  concrete; under ``jit`` nothing can be checked for free, so the contract is the caller's, and
  :func:`check_log_decay` inside ``jax.experimental.checkify.checkify`` checks it at run time.
- NaN and inf propagate forward only, and never past a reset: outputs at positions before a
  non-finite input, and in other documents, are unaffected; gradients are those of the op on the
  finite inputs (finite; exact wherever the loss does not depend on the non-finite entries), a
  non-finite cotangent counting as 0 (``reference`` module docstring).
- ``scale``: a real number or None; None means ``Dk ** -0.5``, as in LASP-2H (the default stays
  1.0, the paper's unnormalised linear attention).
- float32, bfloat16 or float16 inputs; float64 (only possible with ``jax_enable_x64``) is a
  TypeError: the ops compute and keep states in float32 (design §1), so a float64 result
  would only pretend to its precision.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from lasp_jax.kernels import dispatch
from lasp_jax.kernels._checks import check_float_array
from lasp_jax.kernels.linear_attention import pallas_gpu, pallas_tpu, reference

BACKENDS = dispatch.BACKENDS
_PALLAS = {"tpu": pallas_tpu, "gpu": pallas_gpu}


default_backend = dispatch.default_backend


def resolve_backend(backend, q, v, log_decay=None, chunk_size=64, scores="dot") -> str:
  """The lowering for these inputs. ``"auto"``/None: what ``lasp_jax.kernels.dispatch`` measured fastest
  on the default device, if that is a Pallas kernel that can tile them (head dims, chunk size,
  dtype, decay form, ``scores="dot"``), else the XLA path; an explicit backend is returned as is
  (and raises later if it cannot tile them)."""
  if backend not in (None, "auto"):
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {('auto',) + BACKENDS} or None, got {backend!r}")
    return backend
  if scores == "square":  # only the XLA path computes the square scores
    return "xla"
  backend = dispatch.auto_backend("linear_attention")
  module = _PALLAS.get(backend)
  if module is None or (log_decay is not None and log_decay.ndim == 4):
    return "xla"
  try:
    module.check_shapes(q, v, dataclasses.replace(module.DEFAULT_BLOCK_SIZES, chunk_size=chunk_size))
  except (ValueError, TypeError):
    return "xla"
  return backend


def _on_hardware(backend: str) -> bool:
  return default_backend() == backend


def check_chunk_size(chunk_size):
  """Raises ValueError unless ``chunk_size`` is a positive int."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
      or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_scale(scale):
  """Raises TypeError unless ``scale`` is None or a real number (a 0-d real array included)."""
  if scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, bool)):
    return
  if (hasattr(scale, "shape") and hasattr(scale, "dtype") and tuple(scale.shape) == ()
      and (jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer))):
    return
  raise TypeError(f"scale must be a real number or None (None: Dk ** -0.5), got "
                  f"{type(scale).__name__} {scale!r}")


def _index_str(flat, shape):
  return str(tuple(int(i) for i in np.unravel_index(int(flat), shape)))


def check_log_decay(log_decay):
  """Checks that ``log_decay`` (None or an array) is <= 0 everywhere; NaN is not checked.

  Concrete input: raises ValueError naming the largest entry and its index. Traced input (under
  ``jit``): adds a ``checkify`` check, which only works inside ``checkify.checkify``; the input may
  be sharded on any mesh (only reductions, no flattening or indexing of a sharded axis)::

    def f(q, k, v, g):
      check_log_decay(g)
      return lasp_jax.lasp2_attention(q, k, v, g, mesh=mesh)

    err, o = checkify.checkify(jax.jit(f))(q, k, v, g)     # or jax.jit(checkify.checkify(f))
    jax.device_get(err).throw()  # raises naming the max value and its index

  ``jax.device_get(err)`` first: after a ``shard_map`` (every op given a mesh) ``checkify`` returns
  one error per device, sharded over the mesh, and ``err.get()`` / ``err.throw()`` index it, which
  JAX refuses on ``jax.make_mesh`` (Explicit) axes (a ShardingTypeError, JAX 0.10 and 0.11);
  on host copies they work, and on errors from one device too.
  """
  if log_decay is None:
    return
  shape = tuple(log_decay.shape)
  if isinstance(log_decay, jax.core.Tracer):
    g = log_decay.astype(jnp.float32)
    g = jnp.where(jnp.isnan(g), -jnp.inf, g)
    top = jnp.max(g)
    # The first index of the max in row-major order, one axis at a time, by reductions alone:
    # ravel or g[i] of an axis split over Explicit mesh axes is a ShardingTypeError.
    sharding = getattr(jax.typeof(log_decay), "sharding", None)
    hit, idx = g == top, []
    for d, n in enumerate(shape):
      iota = jax.lax.broadcasted_iota(jnp.int32, shape, d, out_sharding=sharding)
      i = jnp.min(jnp.where(hit, iota, n))
      hit, idx = hit & (iota == i), idx + [i]
    names = [f"i{d}" for d in range(len(shape))]
    checkify.check(
        top <= 0,
        "log_decay must be <= 0 (a log of a decay in [0, 1]; -inf is a reset), got max {m} at "
        "index (" + ", ".join("{" + n + "}" for n in names) + f") of shape {shape}",
        m=top, **dict(zip(names, idx)))
    return
  # On the host: a jnp op here would be staged (a tracer) when a concrete decay is closed over
  # inside jit, and device_get of it fails.
  g = np.asarray(jax.device_get(log_decay), dtype=np.float32)
  g = np.where(np.isnan(g), -np.inf, g)
  if g.size and np.max(g) > 0:
    flat = int(np.argmax(g))
    raise ValueError(f"log_decay must be <= 0 (a log of a decay in [0, 1]; -inf is a reset), got "
                     f"max {float(g.flat[flat]):.6g} at index {_index_str(flat, shape)}: pass "
                     f"log(decay), not the decay itself")


def _check_not_float64(name, x):
  # Only reachable with jax_enable_x64: otherwise a float64 numpy input canonicalises to float32.
  if jax.dtypes.canonicalize_dtype(x.dtype) == jnp.float64:
    raise TypeError(f"{name} has dtype float64, which the linear-attention ops do not compute in "
                    f"(states are float32, design §1): cast the inputs to float32 or "
                    f"bfloat16")


def check_segment_ids(segment_ids, shape):
  """Raises unless ``segment_ids`` is None or an integer array of ``shape`` (B, N)."""
  if segment_ids is None:
    return
  if getattr(segment_ids, "shape", None) is None or tuple(segment_ids.shape) != tuple(shape):
    raise ValueError(f"segment_ids must have shape (B, N)={tuple(shape)}, got "
                     f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")


def document_starts(segment_ids):
  """``(B, N)`` bool: True where the id differs from the previous token's (design §13).

  Token 0 is never a start here: whatever comes before it (an initial state, a previous segment)
  is the caller's to drop or keep.
  """
  later = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(later[:, :1]), later], axis=1)


def reset_log_decay(log_decay, segment_ids, heads):
  """The log-decay with every document start folded in as ``-inf``, an exact reset (design §10).

  ``S_i = diag(exp g_i) S_{i-1} + k_i^T v_i`` with ``g_i = -inf`` drops the state before token
  i, and every in-chunk weight across i is ``exp`` of a sum containing it: exactly 0. So packed
  documents need no other mechanism in the kernels: ``None`` and ``(H,)`` decays become
  per-token ``(B, N, H)``, ``(B, N, H, Dk)`` stays per-channel. The gradient at a start is 0,
  the exact one (the decay there multiplies a dropped state).
  """
  starts = document_starts(segment_ids)
  bsz, n = segment_ids.shape
  if log_decay is None or log_decay.ndim == 1:
    g = jnp.zeros((heads,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
    g = jnp.broadcast_to(g, (bsz, n, heads))
  else:
    g = log_decay
  mask = starts[:, :, None] if g.ndim == 3 else starts[:, :, None, None]
  return jnp.where(mask, -jnp.inf, g)


def validate_inputs(q, k, v, log_decay=None, initial_state=None, chunk_size=None, scale=1.0,
                    segment_ids=None, scores="dot"):
  """Checks the input contract (module docstring); raises ValueError/TypeError naming the value.
  ``scores="square"``: the state's key dimension is ``Dk * Dk`` and the decay not per channel."""
  reference.check_scores(scores)
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_float_array(name, x, "(B, N, H, D)")
    _check_not_float64(name, x)
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must share (B, N, H) with q, got v {v.shape} and q {q.shape}")
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  ds = reference.state_key_dim(dk, scores)
  check_scale(scale)
  if log_decay is not None:
    allowed = {1: (h,), 3: (bsz, n, h), 4: (bsz, n, h, dk)}
    want = allowed.get(log_decay.ndim)
    if want is None or tuple(log_decay.shape) != want:
      raise ValueError(
          f"log_decay must have shape (H,)={(h,)}, (B, N, H)={(bsz, n, h)} or "
          f"(B, N, H, Dk)={(bsz, n, h, dk)}, got {tuple(log_decay.shape)}")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
      raise TypeError(f"log_decay must be a float array, got dtype {log_decay.dtype}")
    _check_not_float64("log_decay", log_decay)
    if scores == "square" and log_decay.ndim == 4:
      raise ValueError("scores='square' takes a log_decay of shape (H,) or (B, N, H), not a "
                       "per-channel one: its state's channels are pairs of q, k channels")
    if not isinstance(log_decay, jax.core.Tracer):
      check_log_decay(log_decay)
  if initial_state is not None:
    if tuple(initial_state.shape) != (bsz, h, ds, dv):
      what = "Dk * Dk" if scores == "square" else "Dk"
      raise ValueError(f"initial_state must have shape (B, H, {what}, Dv)={(bsz, h, ds, dv)}, "
                       f"got {tuple(initial_state.shape)}")
    _check_not_float64("initial_state", initial_state)
  check_segment_ids(segment_ids, (bsz, n))
  if chunk_size is not None:
    check_chunk_size(chunk_size)
    if n % chunk_size:
      raise ValueError(f"sequence length N={n} is not a multiple of chunk_size={chunk_size}")


def chunk_linear_attention(q, k, v, log_decay=None, *, scale=1.0, initial_state=None,
                           segment_ids=None, chunk_size=64, backend=None, interpret=None,
                           scores="dot"):
  """Causal chunked linear attention (design §2-3) on one device.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; float32, bfloat16 or float16 (the Pallas
      kernels take the first two; float16 runs on the XLA path).
    log_decay: None, ``(H,)``, ``(B, N, H)`` or ``(B, N, H, Dk)``; entries in ``[-inf, 0]``
      (``-inf``: an exact reset; module docstring for the checks).
    scale: multiplies q; None means ``Dk ** -0.5`` (as in LASP-2H).
    initial_state: None (zeros) or ``(B, H, Dk, Dv)``; it feeds the first document of each row.
    segment_ids: None or ``(B, N)`` int: packed documents. A document starts wherever the id
      differs from the previous token's, and the state restarts from zero there (the in-chunk
      mask is causal and same-document); realised as an exact ``-inf`` decay at each start
      (``reset_log_decay``), so the Pallas kernels serve packed inputs too.
    chunk_size: tokens per chunk; must divide N.
    backend: ``"xla"``, ``"tpu"``, ``"gpu"`` or None (from the default device; ``"xla"`` with
      ``scores="square"``).
    interpret: run Pallas kernels in interpret mode (CPU testing); None means "when not on
      the backend's own hardware" (so ``backend="gpu"`` on a CPU-only host runs the GPU kernels
      in the interpreter).
    scores: ``"dot"`` (``o_i = scale q_i S_i``) or ``"square"``: the op on
      ``reference.square_features`` of q and k (``vec(x x^T)``, so the kernel is ``(q . k)^2``,
      ReBased's), the state ``(B, H, Dk * Dk, Dv)`` over ``vec(k k^T)`` and ``scale``
      multiplying the features of q (None: ``1 / Dk``); the in-chunk scores come from the
      ``Dk``-wide vectors, which keeps small ones accurate (``chunk_linear_attention_xla``). XLA
      path only; the decay per token or per head.

  Returns:
    ``(o, final_state)``: ``o (B, N, H, Dv)`` in q's dtype, ``final_state (B, H, Dk, Dv)`` float32
    (``Dk * Dk`` with ``scores="square"``).

  Raises:
    ValueError: bad shapes (design §1), a concrete positive log-decay, ``chunk_size`` not a
      positive int or not dividing N, ``scores="square"`` with a Pallas backend, or (Pallas
      backends) a chunk size or head dim the backend cannot tile: ``"gpu"`` needs powers of two
      >= 16 (and arrays under 2**31 elements: int32 offsets), ``"tpu"`` a chunk size that is a
      multiple of 8 (float32) or 16 (bfloat16); other head dims are zero-padded to 128 lanes.
    TypeError: non-float or float64 inputs, a ``scale`` that is not a number or None, or
      (Pallas backends) q, k, v not all float32 or all bfloat16.

  The per-channel (GLA) decay ``(B, N, H, Dk)`` always runs on the XLA path: inside a kernel its
  intra-chunk weights need either a ``(c, c, Dk)`` tensor per chunk or the factorisation
  ``e^{b_i} e^{-b_j}``, which overflows for strong decays; the XLA path uses small sub-chunks.
  """
  validate_inputs(q, k, v, log_decay, initial_state, chunk_size, scale, segment_ids, scores)
  scale = reference.resolve_scale(scale, reference.state_key_dim(q.shape[-1], scores))
  if segment_ids is not None:
    log_decay = reset_log_decay(log_decay, segment_ids, q.shape[2])
  if backend is None:
    backend = "xla" if scores == "square" else default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  module = _PALLAS.get(backend)
  if module is not None and scores == "square":
    raise ValueError(f"scores='square' runs on the XLA path only, got backend={backend!r}")
  per_channel = log_decay is not None and log_decay.ndim == 4
  if module is None or per_channel:
    return reference.chunk_linear_attention_xla(
        q, k, v, log_decay, scale=scale, initial_state=initial_state, chunk_size=chunk_size,
        scores=scores)
  if interpret is None:
    interpret = not _on_hardware(backend)
  block_sizes = dataclasses.replace(module.DEFAULT_BLOCK_SIZES, chunk_size=chunk_size)
  fn = (pallas_tpu.chunk_linear_attention_tpu if backend == "tpu"
        else pallas_gpu.chunk_linear_attention_gpu)
  return fn(q, k, v, log_decay, scale=scale, initial_state=initial_state,
            block_sizes=block_sizes, interpret=interpret)
