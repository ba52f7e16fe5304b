"""Devices and the mesh: simulated CPU devices, multi-host start-up, and the (data, fsdp, sp) mesh.

``setup_devices`` must run before JAX initialises its backends (the first ``jax.devices()``): it
sets the number of simulated CPU devices and, for multi-process runs, calls
``jax.distributed.initialize``.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from lasp_jax.train.config import MeshConfig

SEQ_AXIS = "sp"


def _env_says_distributed() -> bool:
  """True when the environment describes a multi-process job (an address, a pod, SLURM, MPI)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(getattr(xla_bridge, "_backends", {}))
  except ImportError:  # pragma: no cover - private module moved; assume not started
    return False


def check_platform(platform: str) -> None:
  """RuntimeError when ``mesh.platform`` names a backend JAX cannot start, listing those it has.

  Without it a GPU request on a machine without one fails with "Unable to initialize backend
  'rocm'" (JAX tries each GPU plugin in turn and reports the last).
  """
  if platform == "auto":
    return
  try:
    jax.devices(platform)
    return
  except RuntimeError as e:
    error = e
  if not _backends_started():
    # The failed request initialised nothing; with the platform unset JAX starts what it can.
    jax.config.update("jax_platforms", "")
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  have = sorted(xla_bridge.backends())
  raise RuntimeError(f"mesh.platform={platform!r}: no {platform.upper()} backend is available "
                     f"(JAX says: {error}); the platforms JAX has here are {have}: use one of "
                     f"them or mesh.platform=auto")


def setup_devices(cfg: MeshConfig) -> None:
  """Platform, simulated CPU device count and ``jax.distributed``; a no-op when already done
  except for checking that ``cfg.platform`` is available."""
  distributed = cfg.distributed == "on" or (
      cfg.distributed == "auto"
      and (cfg.coordinator_address is not None or _env_says_distributed()))
  if _backends_started():
    # Already initialised (a test process, or a second run in one process): check, don't change.
    check_platform(cfg.platform)
    return
  if cfg.platform != "auto":
    jax.config.update("jax_platforms", cfg.platform)
  if cfg.platform in ("auto", "cpu"):
    # Only affects the CPU backend; on a GPU/TPU host the accelerator stays the default.
    jax.config.update("jax_num_cpu_devices", cfg.num_cpu_devices)
  if distributed:
    if cfg.platform == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if cfg.coordinator_address is not None:
      kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes is not None:
      kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id is not None:
      kwargs["process_id"] = cfg.process_id
    if cfg.platform == "cpu":
      kwargs["initialization_timeout"] = cfg.init_timeout_s
    jax.distributed.initialize(**kwargs)
  check_platform(cfg.platform)     # after jax.distributed: it must come before the backends start


def any_process(flag: bool) -> bool:
  """True when ``flag`` is True on any process (for decisions all processes must take together)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def axis_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """``{axis: size}`` in mesh order, -1 resolved; ValueError when the product misses the devices."""
  sizes = {"data": cfg.data}
  if cfg.fsdp != 1:
    sizes["fsdp"] = cfg.fsdp
  sizes[SEQ_AXIS] = cfg.sp
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for k, s in sizes.items():
    if s == -1:
      if num_devices % known:
        raise ValueError(f"mesh.{k}=-1: {num_devices} devices are not divisible by the other axes' "
                         f"product {known} ({sizes})")
      sizes[k] = num_devices // known
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, but there "
                     f"are {num_devices} ({jax.process_count()} process(es)); set mesh.data / "
                     f"mesh.sp "
                     f"(one of them may be -1)")
  return sizes


def build_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
  """The global mesh over every device of every process (Explicit axes), or over the first
  ``cfg.num_devices`` devices of a single process."""
  if cfg.num_devices is None:
    sizes = axis_sizes(cfg, jax.device_count())
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes.keys()))
  if jax.process_count() > 1 or cfg.num_devices > jax.device_count():
    raise ValueError(f"mesh.num_devices={cfg.num_devices} needs one process with at least that "
                     f"many devices; there are {jax.device_count()} in {jax.process_count()} "
                     f"process(es)")
  sizes = axis_sizes(cfg, cfg.num_devices)
  devices = np.array(jax.devices()[:cfg.num_devices]).reshape(tuple(sizes.values()))
  explicit = (jax.sharding.AxisType.Explicit,) * len(sizes)
  return jax.sharding.Mesh(devices, tuple(sizes.keys()), axis_types=explicit)


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: every axis but the sequence axis."""
  return tuple(a for a in mesh.axis_names if a != SEQ_AXIS)
