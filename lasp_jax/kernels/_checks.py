"""Input checks shared by every public op (kernels and the sequence-parallel ops built on them)."""

from __future__ import annotations

import jax.numpy as jnp


def check_float_array(name: str, x, dims: str) -> None:
  """Raises unless ``x`` is a float array with as many axes as ``dims`` names, e.g. ``"(B, N, C)"``:
  TypeError for a non-array or a non-float dtype, ValueError for the wrong rank, naming ``name``."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != dims.count(",") + 1:
    raise ValueError(f"{name} must have shape {dims}, got {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
