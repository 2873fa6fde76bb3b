"""Device mesh, batch sharding, host-local <-> global arrays and multi-host initialisation.

All parallelism in fundax is chosen here, from config, and applied from outside: library code
is written for one device, and jit places it with the shardings built in this module.

The mesh is sized from parallelism degrees (maxdiffusion style): a config such as
`{"data": -1, "fsdp": 2}` gives each axis a size, and one axis may be -1 to take the remaining
devices. The batch dimension is sharded over all of the batch axes ("data" and "fsdp" when
present), so a global batch of B examples is split across every device of those axes.

Multi-host: each process holds only its own slice of the batch (host-local numpy arrays);
`host_local_to_global` assembles them into global `jax.Array`s. `maybe_initialize_distributed`
must run before any other jax call on every host.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Axes over which the batch dimension is sharded, in mesh order.
BATCH_AXES = ("data", "fsdp")

# Environment variables that ask for multi-host initialisation when no explicit flag is given:
#   FUNDAX_DISTRIBUTED=1       set by fundax's launch scripts on every host of a pod/cluster;
#                              jax then auto-detects the cluster (Cloud TPU, SLURM, MPI, ...).
#   JAX_COORDINATOR_ADDRESS    host:port of process 0, read by jax.distributed.initialize()
#                              together with JAX_NUM_PROCESSES and JAX_PROCESS_ID.
DISTRIBUTED_ENV = "FUNDAX_DISTRIBUTED"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def _env_wants_distributed() -> bool:
  flag = os.environ.get(DISTRIBUTED_ENV, "").strip().lower()
  return flag in ("1", "true", "yes") or bool(os.environ.get(COORDINATOR_ENV))


def maybe_initialize_distributed(flag: bool | None = None) -> bool:
  """Initialises the multi-host runtime when asked; call before any other jax computation.

  Idempotent: a second call (or a call after someone else initialised) does nothing.

  Args:
    flag: True forces `jax.distributed.initialize()`, False never calls it, None decides from
      the environment: `FUNDAX_DISTRIBUTED=1` or a set `JAX_COORDINATOR_ADDRESS` mean multi-host.

  Returns:
    Whether the distributed runtime is initialised after the call.
  """
  wanted = _env_wants_distributed() if flag is None else flag
  if not wanted:
    return jax.distributed.is_initialized()
  if not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  return True


def mesh_shape(config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves axis sizes (one may be -1 = the remaining devices) into an ordered dict.

  Args:
    config: axis name -> size, e.g. `{"data": -1, "fsdp": 1}` (a dict or ConfigDict).
    num_devices: how many devices the mesh spans.

  Returns:
    Axis name -> size, batch axes first ("data", "fsdp"), then the others by name, with every
    size resolved and their product equal to `num_devices`.

  Raises:
    ValueError: more than one -1, a size < 1, or a product that does not match the devices.
  """
  sizes = {str(k): int(v) for k, v in dict(config).items()}
  names = [a for a in BATCH_AXES if a in sizes] + sorted(a for a in sizes if a not in BATCH_AXES)
  if not names:
    raise ValueError("the mesh config names no axes; use e.g. {'data': -1}")
  fill = [a for a in names if sizes[a] == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {fill} in {sizes}")
  bad = [a for a in names if sizes[a] < 1 and sizes[a] != -1]
  if bad:
    raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {sizes}")
  fixed = math.prod(sizes[a] for a in names if sizes[a] != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"mesh {sizes}: the fixed axes (product {fixed}) do not divide the "
                       f"{num_devices} devices")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh {sizes} has {fixed} devices but {num_devices} are available")
  return {a: sizes[a] for a in names}


def make_mesh(config: Mapping[str, int], devices: list[jax.Device] | None = None) -> Mesh:
  """Builds the device mesh from parallelism degrees.

  Args:
    config: axis name -> size (-1 fills), e.g. `config.mesh` = `{"data": -1, "fsdp": 1}`.
    devices: devices to span; default all devices of all processes.

  Returns:
    A `jax.sharding.Mesh` with Auto axis types: library code stays single-device math and jit
    propagates the shardings chosen here (Explicit axes would make every op carry a sharding).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices))
  mesh = jax.make_mesh(tuple(shape.values()), tuple(shape),
                       axis_types=(AxisType.Auto,) * len(shape), devices=devices)
  logging.info("mesh %s over %d devices", dict(mesh.shape), len(devices))
  return mesh


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is sharded over (those of BATCH_AXES in the mesh)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
  """How many ways the batch dimension is split: global batch sizes must be multiples of it."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for batch arrays: leading dim over all batch axes, other dims replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
  """Turns this process's slice of a batch into global arrays sharded over the batch axes.

  Every process calls this with its own host-local rows (same shapes on all processes); the
  result's leading dim is the global batch (local rows x process count).

  Args:
    batch: pytree of numpy arrays, each [local_B, ...].
    mesh: the device mesh.

  Returns:
    The same pytree of `jax.Array`s, each [global_B, ...] with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
