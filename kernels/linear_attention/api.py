"""Public entry point of the linear-attention kernels: validates shapes, picks a backend."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.linear_attention import pallas_gpu, pallas_tpu, reference

BACKENDS = ("xla", "tpu", "gpu")
_PALLAS = {"tpu": pallas_tpu, "gpu": pallas_gpu}


def default_backend() -> str:
  """The lowering used when ``backend=None``: Pallas on TPU and GPU, XLA elsewhere."""
  platform = jax.default_backend()
  return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform, "xla")


def resolve_backend(backend, q, v, log_decay=None, chunk_size=64) -> str:
  """The lowering for these inputs. ``"auto"``/None: the default device's Pallas kernel when it
  can tile them (head dims, chunk size, dtype, decay form), else the XLA path; an explicit backend
  is returned as is (and raises later if it cannot tile them)."""
  if backend not in (None, "auto"):
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {('auto',) + BACKENDS} or None, got {backend!r}")
    return backend
  backend = default_backend()
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


def validate_inputs(q, k, v, log_decay=None, initial_state=None, chunk_size=None):
  """Checks SPEC section 1 shapes; raises ValueError/TypeError naming the offending value."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape (B, N, H, D), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got q {q.shape} and k {k.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must share (B, N, H) with q, got v {v.shape} and q {q.shape}")
  bsz, n, h, dk = q.shape
  dv = v.shape[-1]
  if log_decay is not None:
    allowed = {1: (h,), 3: (bsz, n, h), 4: (bsz, n, h, dk)}
    want = allowed.get(log_decay.ndim)
    if want is None or tuple(log_decay.shape) != want:
      raise ValueError(
          f"log_decay must have shape (H,)={(h,)}, (B, N, H)={(bsz, n, h)} or "
          f"(B, N, H, Dk)={(bsz, n, h, dk)}, got {tuple(log_decay.shape)}")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
      raise TypeError(f"log_decay must be a float array, got dtype {log_decay.dtype}")
  if initial_state is not None and tuple(initial_state.shape) != (bsz, h, dk, dv):
    raise ValueError(f"initial_state must have shape (B, H, Dk, Dv)={(bsz, h, dk, dv)}, "
                     f"got {tuple(initial_state.shape)}")
  if chunk_size is not None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
      raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if n % chunk_size:
      raise ValueError(f"sequence length N={n} is not a multiple of chunk_size={chunk_size}")


def chunk_linear_attention(q, k, v, log_decay=None, *, scale=1.0, initial_state=None,
                           chunk_size=64, backend=None, interpret=None):
  """Causal chunked linear attention (SPEC sections 2-3) on one device.

  Args:
    q, k: ``(B, N, H, Dk)``; v: ``(B, N, H, Dv)``; float32 or bfloat16.
    log_decay: None, ``(H,)``, ``(B, N, H)`` or ``(B, N, H, Dk)``; entries <= 0.
    scale: multiplies q.
    initial_state: None (zeros) or ``(B, H, Dk, Dv)``.
    chunk_size: tokens per chunk; must divide N.
    backend: ``"xla"``, ``"tpu"``, ``"gpu"`` or None (from the default device).
    interpret: run Pallas kernels in interpret mode (CPU testing); None means "when not on
      the backend's own hardware" (so ``backend="gpu"`` on a CPU-only host runs the GPU kernels
      in the interpreter).

  Returns:
    ``(o, final_state)``: ``o (B, N, H, Dv)`` in q's dtype, ``final_state (B, H, Dk, Dv)`` float32.

  Raises:
    ValueError: bad shapes (SPEC section 1), N not a multiple of ``chunk_size``, or (Pallas
      backends) a chunk size or head dim the backend cannot tile: ``"gpu"`` needs powers of two
      >= 16 (and arrays under 2**31 elements: int32 offsets), ``"tpu"`` head dims that are
      multiples of 128 and a chunk size that is a multiple of 8 (float32) or 16 (bfloat16).
    TypeError: non-float inputs, or (Pallas backends) q, k, v not all float32 or all bfloat16.

  The per-channel (GLA) decay ``(B, N, H, Dk)`` always runs on the XLA path: inside a kernel its
  intra-chunk weights need either a ``(c, c, Dk)`` tensor per chunk or the factorisation
  ``e^{b_i} e^{-b_j}``, which overflows for strong decays; the XLA path uses small sub-chunks.
  """
  validate_inputs(q, k, v, log_decay, initial_state, chunk_size)
  backend = default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  module = _PALLAS.get(backend)
  per_channel = log_decay is not None and log_decay.ndim == 4
  if module is None or per_channel:
    return reference.chunk_linear_attention_xla(
        q, k, v, log_decay, scale=scale, initial_state=initial_state, chunk_size=chunk_size)
  if interpret is None:
    interpret = not _on_hardware(backend)
  block_sizes = dataclasses.replace(module.DEFAULT_BLOCK_SIZES, chunk_size=chunk_size)
  fn = (pallas_tpu.chunk_linear_attention_tpu if backend == "tpu"
        else pallas_gpu.chunk_linear_attention_gpu)
  return fn(q, k, v, log_decay, scale=scale, initial_state=initial_state,
            block_sizes=block_sizes, interpret=interpret)
