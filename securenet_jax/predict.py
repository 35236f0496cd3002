"""The one loop that runs a jitted function over a large host batch in fixed-size chunks.

Used by the public inference API and by every attack. Chunks have one size (a power of two up to
``batch_size``, the last one zero-padded), so a model compiles once per chunk size whatever the number
of images; all chunks are dispatched before any result is fetched, so the device never waits for the
host between chunks, and each output comes back in one transfer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def chunk_size(num: int, batch_size: int) -> int:
  """The chunk size for ``num`` examples: the smallest power of two >= num, at most ``batch_size``."""
  return max(1, min(int(batch_size), 1 << (max(int(num), 1) - 1).bit_length()))


def batched(fn: Callable[..., Any], images: np.ndarray, *args, batch_size: int) -> Any:
  """``fn(chunk, *args)`` over ``images`` in chunks, concatenated along the first axis.

  Args:
    fn: a jitted function of a (chunk, H, W, C) batch (and ``args``) returning an array or a pytree
      of arrays whose first axis is the chunk's.
    images: host images (N, H, W, C), any dtype ``fn`` accepts (uint8 travels as uint8).
    *args: further arguments of ``fn`` (parameters, key arrays...), passed unchanged to every chunk.
    batch_size: the largest chunk.

  Returns:
    The outputs for the N images, as writable numpy arrays (same pytree structure as ``fn``'s output).
  """
  n = len(images)
  # One whole chunk (one image, say): the batch as it is, nothing to join or slice off. The test is
  # n == chunk_size(n, batch_size) without the call: at batch 1 each Python step before the dispatch
  # shows (docs/performance.md).
  if 0 < n and (n == batch_size or (n < batch_size and not n & (n - 1))):
    out = fn(images, *args)
    # np.array: one copy to the host, writable and the caller's own (jax.device_get costs 50-100 us
    # more a call, and at batch 1 every pass over the output in Python shows).
    return np.array(out) if isinstance(out, jax.Array) else jax.tree.map(np.array, out)
  chunk = chunk_size(n, batch_size)
  outputs = []
  for start in range(0, max(n, 1), chunk):
    part = images[start:start + chunk]
    if len(part) < chunk:
      part = np.concatenate([part, np.zeros((chunk - len(part), *images.shape[1:]), images.dtype)])
    outputs.append(fn(part, *args))  # asynchronous dispatch: nothing is fetched yet

  def join(*parts):  # one chunk is not concatenated; the padding is sliced off on the host
    whole = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    # np.asarray (jax.device_get costs 50-100 us more a call), then a copy of the rows: a writable
    # array of its own, not a read-only view that keeps the device buffer and its padding alive.
    return np.array(np.asarray(whole)[:n])
  return jax.tree.map(join, *outputs)
