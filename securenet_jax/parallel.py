"""Device mesh, shardings and multi-process setup: one code path for 1 CPU, N GPUs or a TPU pod.

The batch is sharded over a single ``data`` mesh axis and everything else (parameters, optimizer
state, key arrays) is replicated. ``jax.jit`` with these shardings inserts the gradient all-reduce.

Multi-process runs (several hosts, or one process per GPU) start with :func:`initialize`: from
explicit arguments (``main.py``'s ``--coordinator_address``, ``--num_processes``, ``--process_id``; what
``launch/local.sh`` passes on loopback), or from the environment of a SLURM allocation or a Cloud
TPU pod, where ``jax.distributed.initialize()`` finds everything itself. Processes then agree on
when to stop (:func:`any_process`), synchronize around shared files (:func:`barrier`), agree on what
they found in the shared workdir (:func:`same_on_every_process`) and split the evaluation
(:func:`map_rows`).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from securenet_jax import errors

DATA_AXIS = 'data'


def cluster_environment() -> str:
  """'slurm' or 'tpu' when this process belongs to a multi-process job of that kind, else ''."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
    return 'slurm'
  if len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    return 'tpu'
  return ''


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               heartbeat_timeout_s: int = 100) -> None:
  """Starts ``jax.distributed`` when the job spans several processes; a no-op for one process.

  With ``coordinator_address`` ('host:port') the explicit arguments are used; otherwise a SLURM or
  Cloud TPU environment is detected (:func:`cluster_environment`). CPU processes talk over gloo.
  A process whose peers have been silent for ``heartbeat_timeout_s`` seconds (a peer was killed)
  fails rather than waiting.
  """
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < '
                       f'num_processes, got {num_processes} and {process_id}.')
    if num_processes == 1:
      return
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  elif cluster_environment():
    kwargs = {}
  else:
    return
  # CPU processes exchange collectives over gloo (TCP); GPUs and TPUs use their own transports.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat_timeout_s), **kwargs)
  logging.info('jax.distributed: process %d of %d (%s)', jax.process_index(), jax.process_count(),
               kwargs.get('coordinator_address', cluster_environment()))


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


def is_primary() -> bool:
  """The process that writes shared files (config, registry, reports)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def process_flags(flag: bool) -> list[bool]:
  """Every process's ``flag``, in process order, on every process (an all-gather: no process gets
  them before every process has given its own)."""
  if jax.process_count() == 1:
    return [bool(flag)]
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
  return [bool(f) for f in np.asarray(flags).reshape(-1)]


def same_on_every_process(flag: bool, what: str) -> bool:
  """``flag``, once every process has given its own (an all-gather, so it also waits for every
  process); raises if they differ. For a look at a shared folder that the primary then writes to:
  looked at before this call, no process can see the primary's writing.

  Raises:
    errors.WorkdirError: the processes disagree, e.g. the folder is not shared.
  """
  flags = process_flags(flag)
  if len(set(flags)) > 1:
    raise errors.WorkdirError(f'The processes disagree whether {what} (process by process: {flags}).',
                              hint='Every process must see the same workdir: put it on a shared '
                                   'filesystem.')
  return flags[0]


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on any: how processes agree to stop at one step."""
  return any(process_flags(flag))


def map_rows(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> np.ndarray:
  """``fn(rows)`` with the rows split across processes: each computes its share (padded to equal
  sizes), and every process gets the whole result back. One process: just ``fn(rows)``."""
  count = jax.process_count()
  if count == 1:
    return fn(rows)
  share = -(-len(rows) // count)
  mine = rows[jax.process_index() * share:][:share]
  if len(mine) < share:  # pad with copies of the first row; trimmed below
    mine = np.concatenate([mine, np.repeat(rows[:1], share - len(mine), axis=0)])
  gathered = np.asarray(multihost_utils.process_allgather(fn(mine)))  # (processes, share, ...)
  return gathered.reshape(count * share, *gathered.shape[2:])[:len(rows)]


def log_devices() -> None:
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
