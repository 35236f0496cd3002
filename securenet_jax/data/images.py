"""Decoding face images: a centered square crop resized to ``size x size`` RGB, with Pillow.

JPEGs are decoded at a reduced resolution when that still leaves at least ``size`` pixels across the
crop (Pillow's ``draft`` mode: several times faster for large photos). Many files are decoded on a
thread pool (Pillow releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Sequence

import numpy as np


def _pil():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - pillow is a dependency
    raise ImportError('Decoding images needs Pillow: pip install pillow.') from e
  return Image


def _square_box(width: float, height: float, crop: int) -> tuple[float, float, float, float]:
  side = min(width, height) if crop <= 0 else min(crop, width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def _fit(image, size: int, crop: int, original_size: tuple[int, int]) -> np.ndarray:
  """Crops the centered square (``crop`` px of the original image; 0: the largest) of an opened
  PIL image (possibly drafted to a smaller size) and resizes it to ``size`` x ``size`` RGB."""
  image_module = _pil()
  width, height = original_size
  image = image.convert('RGB')
  sx, sy = image.size[0] / width, image.size[1] / height
  left, top, right, bottom = _square_box(width, height, crop)
  box = (left * sx, top * sy, right * sx, bottom * sy)
  out = image.resize((size, size), image_module.Resampling.BICUBIC, box=box)
  return np.asarray(out, np.uint8)


def decode_file(path: str, size: int, crop: int = 0) -> np.ndarray:
  """Decodes one image file into a (size, size, 3) uint8 array: the centered square of side
  ``crop`` (original pixels; 0 = the largest square) resized to ``size``.

  Raises:
    ValueError: the file could not be read or decoded; the message names it.
  """
  image_module = _pil()
  try:
    with image_module.open(path) as image:
      width, height = image.size
      left, top, right, bottom = _square_box(width, height, crop)
      scale = size / (right - left)
      if scale < 1:
        image.draft('RGB', (math.ceil(width * scale), math.ceil(height * scale)))
      return _fit(image, size, crop, (width, height))
  except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as e:
    raise ValueError(f'Could not decode image {path!r}: {e}') from e


def fit_array(array: np.ndarray, size: int, crop: int = 0) -> np.ndarray:
  """:func:`decode_file` for an already decoded (H, W, C) uint8 array (e.g. from tfds)."""
  array = np.asarray(array, np.uint8)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  image = _pil().fromarray(array)
  return _fit(image, size, crop, image.size)


def decode_files(paths: Sequence[str], size: int, crop: int = 0, num_threads: int | None = None
                 ) -> np.ndarray:
  """Decodes ``paths`` (in order) into one (N, size, size, 3) uint8 array, on a thread pool.

  Raises:
    ValueError: a file could not be decoded (the first such file in ``paths`` order is named).
  """
  out = np.empty((len(paths), size, size, 3), np.uint8)
  if not paths:
    return out
  num_threads = num_threads or min(32, os.cpu_count() or 1, len(paths))
  pool = concurrent.futures.ThreadPoolExecutor(num_threads)
  try:
    for i, image in enumerate(pool.map(lambda p: decode_file(p, size, crop), paths)):
      out[i] = image
  finally:  # on an error, drop the files not started yet instead of decoding them all
    pool.shutdown(wait=True, cancel_futures=True)
  return out
