"""Reader for MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST...).

The four files are ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, optionally gzipped. Debian's
package ``dataset-fashion-mnist`` installs Fashion-MNIST in this layout under
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

_PREFIX = {'train': 'train', 'test': 't10k'}
_UBYTE = 0x08


def _open(path_base: str):
  for path, opener in ((path_base, open), (path_base + '.gz', gzip.open)):
    if os.path.isfile(path):
      return path, opener(path, 'rb')
  raise FileNotFoundError(path_base)


def read_idx(path_base: str) -> np.ndarray:
  """Reads one IDX file (``path_base`` or ``path_base.gz``) into a numpy array.

  Raises:
    FileNotFoundError: neither file exists.
    ValueError: the file is not a well-formed unsigned-byte IDX file.
  """
  path, f = _open(path_base)
  with f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path!r} is not an IDX file (bad magic number).')
  if data[2] != _UBYTE:
    raise ValueError(f'{path!r}: only unsigned-byte IDX files are supported (type code {data[2]:#x}).')
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f'{path!r} is truncated (header).')
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  expected = int(np.prod(dims)) if dims else 0
  if len(data) - header != expected:
    raise ValueError(f'{path!r} holds {len(data) - header} bytes of data; its header {dims} says {expected}.')
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads ``split`` ('train' or 'test') as (uint8 images (N, H, W, 1), int32 labels (N,))."""
  prefix = os.path.join(data_dir, _PREFIX[split])
  images = read_idx(prefix + '-images-idx3-ubyte')
  labels = read_idx(prefix + '-labels-idx1-ubyte')
  if images.ndim != 3:
    raise ValueError(f'{prefix}-images-idx3-ubyte: expected 3 dimensions (N, H, W), got {images.shape}.')
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(f'{data_dir!r} {split}: {images.shape[0]} images but labels of shape {labels.shape}.')
  return images[..., None], labels.astype(np.int32)
