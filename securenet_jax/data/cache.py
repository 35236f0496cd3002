"""An .npz cache of decoded arrays, keyed by everything that changes them.

The file name carries a digest of the key, and the file stores the key itself, so a stale or
foreign file is never used. Writes are atomic (a temporary file in the same folder, then
``os.replace``), so concurrent writers (several hosts on a shared filesystem) and interrupted runs
leave either the old file or a complete new one. An unreadable cache is logged and rebuilt; a
folder that cannot be written to only costs the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Mapping

import numpy as np
from absl import logging

_KEY = 'cache_key'
VERSION = 1  # bump when the decoding changes the arrays


def key_string(key: Mapping) -> str:
  return json.dumps({'version': VERSION, **key}, sort_keys=True, default=str)


def path_for(folder: str, name: str, key: Mapping) -> str:
  digest = hashlib.sha256(key_string(key).encode()).hexdigest()[:16]
  return os.path.join(folder, f'{name}-{digest}.securenet-cache.npz')


def read(path: str, key: Mapping, required: tuple[str, ...]) -> dict[str, np.ndarray] | None:
  """The arrays cached at ``path`` for ``key``; None (and a log line) when there is no usable cache."""
  if not os.path.isfile(path):
    return None
  try:
    # Our own file object: np.load(path) leaks its file when the zip directory is unreadable.
    with open(path, 'rb') as f, np.load(f, allow_pickle=False) as z:
      if str(z[_KEY]) != key_string(key):
        logging.warning('Cache %s was made for other options; rebuilding it.', path)
        return None
      arrays = {k: np.array(z[k]) for k in z.files if k != _KEY}
    missing = [k for k in required if k not in arrays]
    if missing:
      raise KeyError(f'no {missing}')
    return arrays
  except Exception as e:  # pylint: disable=broad-except  (a corrupt zip raises many kinds of errors)
    logging.warning('Ignoring unreadable cache %s (%s: %s); rebuilding it.', path, type(e).__name__, e)
    return None


def write(path: str, key: Mapping, arrays: Mapping[str, np.ndarray]) -> bool:
  """Writes ``arrays`` atomically; returns False (with a warning) when the folder is not writable."""
  folder = os.path.dirname(path) or '.'
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **{_KEY: np.asarray(key_string(key))}, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
    return True
  except OSError as e:
    logging.warning('Could not write the cache %s (%s); continuing without it.', path, e)
    return False
  finally:
    if tmp is not None:
      try:
        os.unlink(tmp)
      except OSError:
        pass


def cached(path: str | None, key: Mapping, build: Callable[[], dict[str, np.ndarray]],
           required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """The arrays of ``build()``, read from the cache at ``path`` when it holds them for ``key``, else
  built and written there. ``path=None`` disables the cache."""
  if path is not None:
    arrays = read(path, key, required)
    if arrays is not None:
      logging.info('Read cached arrays from %s', path)
      return arrays
  arrays = build()
  if path is not None and write(path, key, arrays):
    logging.info('Cached the decoded arrays in %s', path)
  return arrays
