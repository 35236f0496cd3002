"""Device mesh, shardings and multi-host setup: one code path for 1 CPU, N GPUs or a TPU pod.

The batch is sharded over a single ``data`` mesh axis and everything else (parameters, optimizer
state, key arrays) is replicated. ``jax.jit`` with these shardings inserts the gradient all-reduce.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed(cfg) -> None:
  """Calls ``jax.distributed.initialize`` when the job spans several processes.

  ``cfg`` is ``config.distributed``. With ``coordinator_address`` set, the explicit arguments are used
  (e.g. local multi-process tests); with ``initialize=True``, or under SLURM with more than one task,
  JAX detects the cluster itself (Cloud TPU pods, SLURM).
  """
  if cfg.get('coordinator_address'):
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)
  elif cfg.get('initialize') or int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  if global_batch_size % mesh.devices.size:
    raise ValueError(f'Global batch size {global_batch_size} must be divisible by the '
                     f'{mesh.devices.size} devices of the mesh.')


def host_to_global(local_batch, mesh: Mesh):
  """Turns this host's slice of a global batch (a pytree of numpy arrays) into global jax arrays
  sharded on the ``data`` axis."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def log_devices() -> None:
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
