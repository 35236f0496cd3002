"""The one loop that runs a jitted function over a large host batch in fixed-size chunks.

Used by the public inference API and by every attack. Chunks have one size (a power of two up to
``batch_size``, the last one zero-padded), so a model compiles once per chunk size whatever the number
of images; all chunks are dispatched before any result is fetched, so the device never waits for the
host between chunks, and the results come back in one transfer.

In a single process with several local devices (the CPU split into one device per core by
``main.py``, or several GPUs), each chunk is split evenly across them (:func:`local_mesh`): data-parallel
inference, with the parameters replicated (:func:`replicate`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def chunk_size(num: int, batch_size: int) -> int:
  """The chunk size for ``num`` examples: the smallest power of two >= num, at most ``batch_size``."""
  return max(1, min(int(batch_size), 1 << max(0, int(np.ceil(np.log2(max(num, 1)))))))


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple) -> Mesh:
  return Mesh(np.asarray(devices), ('rows',))


def local_mesh() -> Mesh | None:
  """A 1-D mesh over this process's devices, when inference is split across them: one process with
  several local devices. None otherwise (one device; or several processes, which split the rows
  between them, see ``parallel.map_rows``)."""
  devices = tuple(jax.local_devices())
  if len(devices) < 2 or jax.process_count() > 1:
    return None
  return _mesh(devices)


def replicate(tree: Any) -> Any:
  """``tree`` on the devices :func:`batched` runs on: replicated over :func:`local_mesh`, else on the
  default device (uncommitted)."""
  mesh = local_mesh()
  if mesh is None:
    return jax.device_put(tree)
  return jax.device_put(tree, NamedSharding(mesh, P()))


def batched(fn: Callable[..., Any], images: np.ndarray, *args, batch_size: int,
            split: bool | str = True) -> Any:
  """``fn(chunk, *args)`` over ``images`` in chunks, concatenated along the first axis.

  Args:
    fn: a jitted function of a (chunk, H, W, C) batch (and ``args``) returning an array or a pytree
      of arrays whose first axis is the chunk's.
    images: host images (N, H, W, C), any dtype ``fn`` accepts (uint8 travels as uint8).
    *args: further arguments of ``fn`` (parameters, key arrays...), passed unchanged to every chunk.
    batch_size: the largest chunk.
    split: True: split each chunk across :func:`local_mesh` (when there is one; the chunk is then
      rounded up to a multiple of the device count), ``args`` replicated there (:func:`replicate`)
      or not committed to a device. ``'serial'``: the same pieces, one after another on the default
      device (a function compiled for one device computes exactly what the split run computes).
      False: whole chunks on the default device.

  Returns:
    The outputs for the N images, as numpy arrays (same pytree structure as ``fn``'s output).
  """
  n = len(images)
  chunk = chunk_size(n, batch_size)
  mesh = local_mesh() if split else None
  pieces = 1
  if mesh is not None:
    chunk = -(-chunk // mesh.size) * mesh.size
    pieces = mesh.size if split == 'serial' else 1
  outputs = []
  for start in range(0, max(n, 1), chunk):
    part = images[start:start + chunk]
    if len(part) < chunk:
      part = np.concatenate([part, np.zeros((chunk - len(part), *images.shape[1:]), images.dtype)])
    if mesh is not None and pieces == 1:
      part = jax.device_put(part, NamedSharding(mesh, P('rows')))
    for piece in np.split(part, pieces):  # asynchronous dispatch: nothing is fetched yet
      outputs.append(fn(piece, *args))
  joined = jax.tree.map(lambda *parts: jnp.concatenate(parts)[:n], *outputs)
  return jax.device_get(joined)
