"""Image arrays as the models take them: NHWC, float32 in [0, 1].

Data comes as uint8 in 0..255 (datasets, users) or as float in [0, 1] (attacks, augmentation). One
converter serves both the host (numpy) and the device (inside jit), and one validator gives every
public entry point the same errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_float(images):
  """uint8 0..255 -> float32 0..1; float input is cast to float32 unchanged.

  numpy (or anything array-like that is not a JAX array) in -> numpy out, on the host; a JAX array
  (or a tracer, inside jit) in -> JAX array out.
  """
  if isinstance(images, jax.Array):
    if images.dtype == jnp.uint8:
      return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  return images.astype(np.float32, copy=False)


_UINT8 = np.dtype(np.uint8)


def check(images, image_shape) -> np.ndarray:
  """Validates a host batch for a model taking ``image_shape`` (H, W, C) and returns it as numpy.

  uint8 batches pass as they are (they travel to the device as uint8 and are converted there); float
  batches must lie in [0, 1] and are returned as float32. Two passes over a float batch (min, max:
  NaN and infinities show up in them), none over a uint8 one.

  Raises:
    ValueError: saying what was expected (shape, dtype, value range).
  """
  if (images.__class__ is np.ndarray and images.dtype is _UINT8 and
      images.shape[1:] == tuple(image_shape)):
    # What the API is mostly given, checked in the fewest Python steps: at batch 1 right after a
    # jitted call each step costs ~20x its idle time (docs/performance.md).
    return images
  images = np.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
    expected = f'(N, {", ".join(map(str, image_shape))})'
    raise ValueError(f'Expected NHWC images of shape {expected}, got shape {images.shape}.')
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'Expected uint8 images in 0..255 or float images in [0, 1], got dtype {images.dtype}.')
  if images.size:
    lo, hi = images.min(), images.max()
    if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
      raise ValueError(f'Float images must be finite and in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]. '
                       f'Divide uint8 data by 255 or pass it as uint8.')
  return images.astype(np.float32, copy=False)
