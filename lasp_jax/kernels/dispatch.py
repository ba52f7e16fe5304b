"""Which lowering ``backend="auto"`` picks: a table per (device kind, kernel family), each entry
citing the measurement behind it. A Pallas kernel is picked only where it was measured faster than
the XLA path on that device; a device or family without an entry falls back by platform (TPU:
its Pallas kernels; GPU: XLA for the delta rule's state pass, Pallas for linear attention; CPU:
XLA). The delta rule's Pallas state pass is picked for bfloat16 inputs only (float32 operands run
on CUDA cores: 10x slower than XLA, measured). Update an entry only from a side-by-side run
(``benchmarks/gpu_check.sh``, ``benchmarks/kernels.py``) and cite it.

Families:
- ``"linear_attention"``: ``lasp_jax.kernels.linear_attention`` (and the delta rule's output stage);
- ``"delta_state_pass"``: the delta rule's sequential state pass (``lasp_jax.kernels.delta_rule``);
- ``"delta_prepare"``: the delta rule's chunk-parallel WY stage (GPU kernels only; TPU: XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "tpu", "gpu")   # what an explicit backend= may name; "auto" resolves here
FAMILIES = ("linear_attention", "delta_state_pass", "delta_prepare")

# (device-kind prefix, family) -> backend. Device kinds as jax.Device.device_kind prints them.
TABLE = {
    # H200, 2026-12-04 (shared/measurements/h200-2026-12-04.md): B8 N8192 H16 D128 bf16 fwd+bwd,
    # no decay 2.10 ms Pallas vs 13.0 ms XLA; per-token decay 10.7 vs 16.9 ms.
    ("NVIDIA H200", "linear_attention"): "gpu",
    # H200, 2026-12-04 (benchmarks/results/kernels_gpu.json, benchmarks/gpu_check.sh): Gated
    # DeltaNet fwd+bwd at the same shape, state pass with bf16 operands in Pallas 28.1 ms vs XLA's
    # scan 41.1 ms (both with the Pallas output stage; all-XLA 51.4 ms). The float32-operand
    # Pallas pass took 522.9 ms (shared/measurements/h200-2026-12-04.md): see _GPU_DTYPES.
    ("NVIDIA H200", "delta_state_pass"): "gpu",
    # H200, 2026-12-04 (benchmarks/results/delta_stages.json): the WY stage in XLA takes 13.0 ms of
    # the op's 26.2 ms fwd+bwd. Its Pallas kernels (pallas_gpu.prepare_chunks_gpu) have not run on
    # a GPU yet: XLA until benchmarks/delta_stages.py measures them faster.
    ("NVIDIA H200", "delta_prepare"): "xla",
    # Hopper like the H200 (same SMs, less bandwidth); the H200 figures are the only ones we have.
    ("NVIDIA H100", "linear_attention"): "gpu",
    ("NVIDIA H100", "delta_state_pass"): "gpu",
    ("NVIDIA H100", "delta_prepare"): "xla",
}

_PLATFORM_DEFAULT = {
    ("gpu", "linear_attention"): "gpu",
    ("gpu", "delta_state_pass"): "xla",
    ("tpu", "linear_attention"): "tpu",
    ("tpu", "delta_state_pass"): "tpu",
}

# Input dtypes for which a family's GPU kernel may be picked: the delta state pass runs float32
# inputs as IEEE dots on CUDA cores, 10x slower than XLA (522.9 vs 51.4 ms, the H200 run above).
# The WY prepare's float32 dots are IEEE too (its sm_90 compile spills 24 KB per thread).
_GPU_DTYPES = {"delta_state_pass": ("bfloat16",), "delta_prepare": ("bfloat16",)}


def default_backend() -> str:
  """The default device's lowering: ``"gpu"``, ``"tpu"``, or ``"xla"`` elsewhere (CPU)."""
  name = jax.default_backend()
  return {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(name, "xla")


def auto_backend(family: str, dtype=None, device=None) -> str:
  """The backend ``"auto"`` means for ``family`` with ``dtype`` inputs (None: any) on ``device``
  (None: the default device)."""
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  plat = default_backend()
  if plat == "xla":
    return "xla"
  kind = (device or jax.devices()[0]).device_kind
  backend = next((b for (prefix, fam), b in TABLE.items()
                  if fam == family and kind.startswith(prefix)),
                 _PLATFORM_DEFAULT.get((plat, family), "xla"))
  allowed = _GPU_DTYPES.get(family)
  if backend == "gpu" and allowed and dtype is not None and jnp.dtype(dtype).name not in allowed:
    return "xla"
  return backend
