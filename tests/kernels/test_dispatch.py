"""``backend="auto"``'s table (``lasp_jax.kernels.dispatch``): what it picks per device kind, family
and dtype, with the platform faked (this machine is a CPU, where everything is XLA)."""

from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from lasp_jax.kernels import dispatch

H200 = SimpleNamespace(device_kind="NVIDIA H200")
A100 = SimpleNamespace(device_kind="NVIDIA A100-SXM4-80GB")   # no entry: the platform default


def test_cpu_is_xla_for_every_family():
  for family in dispatch.FAMILIES:
    assert dispatch.auto_backend(family, jnp.bfloat16, device=H200) == "xla"


@pytest.mark.parametrize("device,family,dtype,want", [
    (H200, "linear_attention", jnp.bfloat16, "gpu"),
    (H200, "linear_attention", jnp.float32, "gpu"),
    (H200, "delta_state_pass", jnp.bfloat16, "gpu"),
    (H200, "delta_state_pass", jnp.float32, "xla"),     # IEEE dots: 522.9 vs 51.4 ms
    (H200, "delta_prepare", jnp.bfloat16, "xla"),       # its kernels are not measured yet
    (A100, "linear_attention", jnp.bfloat16, "gpu"),
    (A100, "delta_state_pass", jnp.bfloat16, "xla"),
    (A100, "delta_prepare", jnp.bfloat16, "xla"),
])
def test_gpu_table(monkeypatch, device, family, dtype, want):
  monkeypatch.setattr(dispatch, "default_backend", lambda: "gpu")
  assert dispatch.auto_backend(family, dtype, device=device) == want


def test_every_listed_device_has_every_family_and_an_unknown_family_is_named():
  kinds = {kind for kind, _ in dispatch.TABLE}
  assert {(kind, fam) for kind in kinds for fam in dispatch.FAMILIES} == set(dispatch.TABLE)
  with pytest.raises(ValueError, match="family must be one of"):
    dispatch.auto_backend("delta_solve")
