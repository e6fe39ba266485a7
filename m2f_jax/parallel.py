"""Data parallelism over every device of every host: the mesh, shardings and the global batch.

One mesh axis, 'data'. The train state is replicated, the batch is split along its first axis.
Each process feeds its own shard of the global batch (`batch_size // process_count` examples);
`global_batch` assembles the global jax.Array from those shards without moving data between hosts.
"""
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           auto: bool = False) -> None:
  """Joins a multi-host job; a no-op for a single process.

  Explicit arguments win; otherwise the environment variables M2F_COORDINATOR_ADDRESS,
  M2F_NUM_PROCESSES and M2F_PROCESS_ID are read. With `auto`, JAX detects the cluster itself
  (TPU pods, SLURM, ...). Must run before any other JAX call that touches devices.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("M2F_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("M2F_NUM_PROCESSES"):
    num_processes = int(env["M2F_NUM_PROCESSES"])
  if process_id is None and env.get("M2F_PROCESS_ID"):
    process_id = int(env["M2F_PROCESS_ID"])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("a coordinator address needs num_processes and process_id too "
                       "(flags --num_processes/--process_id or M2F_NUM_PROCESSES/M2F_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id {process_id} is outside [0, {num_processes})")
    # Cross-process collectives of the CPU backend (tests, CPU clusters); other backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  """A 1-D mesh ('data',) over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Same value on every device (the train state)."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """First axis split over the 'data' axis (the batch)."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch size; returns the per-process batch size."""
  devices, processes = mesh.devices.size, jax.process_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the device count "
                     f"{devices} (every device gets the same number of examples); set "
                     f"--config.batch_size to a multiple of {devices}")
  return batch_size // processes


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Global jax.Arrays, sharded P('data'), from this process's numpy shard of the batch.

  Args:
    local_batch: numpy arrays whose first axis is the local batch (`batch_size // process_count`).
    mesh: the data mesh.
  """
  sharding = data_sharded(mesh)
  local_devices = len(mesh.local_devices)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise ValueError(f"batch[{key!r}] has shape {value.shape}; its first axis must be a multiple "
                       f"of the {local_devices} local devices")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
