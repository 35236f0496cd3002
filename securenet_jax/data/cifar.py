"""Reader for the official python releases of CIFAR-10 and CIFAR-100.

Layouts (what ``tar xzf cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` create)::

  cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch, batches.meta
  cifar-100-python/      train, test, meta

Each file is a pickled dict with ``data`` (N x 3072 uint8: the red, green then blue planes of a
32x32 image, row-major) and ``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100).
The pickles are read with an unpickler that only builds dicts, lists, strings and numpy arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from securenet_jax.data import _common

FOLDERS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}
FILES = {'cifar10': ([f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'batches.meta'),
         'cifar100': (['train'], ['test'], 'meta')}

# The only globals a CIFAR pickle refers to (numpy array reconstruction, under its old and new module).
_ALLOWED = {(m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray')
            for n in ('_reconstruct', 'scalar')} | {('numpy', 'ndarray'), ('numpy', 'dtype'),
                                                    ('_codecs', 'encode')}


class _SafeUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name} (not a CIFAR pickle)')
    if module == 'numpy.core.multiarray':  # numpy >= 2 moved it; avoid the deprecated alias
      module = 'numpy._core.multiarray' if hasattr(np, '_core') else module
    return super().find_class(module, name)


def _read_pickle(path: str) -> dict:
  try:
    with open(path, 'rb') as f:
      raw = _SafeUnpickler(f, encoding='bytes').load()
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a broken pickle raises many kinds)
    raise ValueError(f'{path!r} is not a CIFAR python pickle: {type(e).__name__}: {e}') from e
  if not isinstance(raw, dict):
    raise ValueError(f'{path!r} is not a CIFAR python pickle (holds a {type(raw).__name__}, not a dict).')
  return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in raw.items()}


def folder(data_dir: str, name: str) -> str | None:
  """The release folder: ``data_dir/<release folder>`` or ``data_dir`` itself; None if neither."""
  for candidate in (os.path.join(data_dir, FOLDERS[name]), data_dir):
    if os.path.isfile(os.path.join(candidate, FILES[name][1][0])):
      return candidate
  return None


def _read_batches(root: str, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = [], []
  for file in files:
    path = os.path.join(root, file)
    batch = _read_pickle(path)
    if 'data' not in batch or label_key not in batch:
      raise ValueError(f'{path!r}: expected the keys "data" and {label_key!r}, found {sorted(batch)}.')
    data = np.asarray(batch['data'])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
      raise ValueError(f'{path!r}: expected "data" of uint8 (N, 3072), got {data.dtype} {data.shape}.')
    lab = np.asarray(batch[label_key], np.int64)
    if lab.shape != (data.shape[0],):
      raise ValueError(f'{path!r}: {data.shape[0]} images but {lab.shape} {label_key!r}.')
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(lab.astype(np.int32))
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def load(cfg, name: str, label_mode: str = 'fine'
         ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[str, ...] | None]:
  """Loads ``name`` ('cifar10' or 'cifar100') from ``cfg.data_dir``.

  Returns:
    ((train images, train labels, test images, test labels), class names or None without a meta file).
  """
  if not os.path.isdir(cfg.data_dir):
    raise _common.missing(cfg, f'no directory {cfg.data_dir!r}')
  root = folder(cfg.data_dir, name)
  train_files, test_files, meta_file = FILES[name]
  if root is None:
    raise _common.missing(cfg, f'neither {os.path.join(cfg.data_dir, FOLDERS[name])!r} nor '
                               f'{cfg.data_dir!r} holds the file {test_files[0]!r}')
  for file in train_files + test_files:
    if not os.path.isfile(os.path.join(root, file)):
      raise _common.missing(cfg, f'no file {os.path.join(root, file)!r}')
  label_key = 'labels' if name == 'cifar10' else f'{label_mode}_labels'
  arrays = _read_batches(root, train_files, label_key) + _read_batches(root, test_files, label_key)
  names = None
  meta_path = os.path.join(root, meta_file)
  if os.path.isfile(meta_path):
    meta = _read_pickle(meta_path)
    names_key = 'label_names' if name == 'cifar10' else f'{label_mode}_label_names'
    if names_key in meta:
      names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
  return arrays, names
