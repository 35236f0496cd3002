"""Public, jitted inference API.

    from securenet_jax import inference, keys
    model = inference.load(workdir)              # latest checkpoint + config + key registry
    key = model.keys['default']                  # or keys.load('path/to/key.npz')
    logits = model.logits(images, key=key)       # NHWC, uint8 0..255 or float 0..1
    labels = model.predict(images, key=key)
    model.logits(images)                         # no key: the uninformative output

Inputs are validated on the host (shape, dtype, value range, key geometry) and raise ``ValueError``
saying what was expected; the forward pass itself is one jitted function per model, reused for every
key of the same image shape (the key's arrays are arguments, not constants).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from securenet_jax import checkpointing
from securenet_jax import data as data_lib
from securenet_jax import keys as keys_lib
from securenet_jax import models
from securenet_jax import parallel

KeyLike = keys_lib.LicenseKey | str | None


class LicensedModel:
  """A trained model, its key registry and jitted forward passes.

  Attributes:
    keys: the registry's active keys, name -> LicenseKey.
    revoked_keys: the registry's revoked keys, name -> LicenseKey.
    image_shape: (H, W, C) the model takes.
    num_classes: number of outputs.
    config: the run's config (None when built from parts).
  """

  def __init__(self, module, variables: Any, image_shape, num_classes: int,
               keys: dict[str, keys_lib.LicenseKey] | None = None,
               revoked_keys: dict[str, keys_lib.LicenseKey] | None = None,
               batch_size: int = 1000, config: ml_collections.ConfigDict | None = None):
    self.module = module
    self.variables = models.as_variables(variables)
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self.keys = dict(keys or {})
    self.revoked_keys = dict(revoked_keys or {})
    self.batch_size = batch_size
    self.config = config
    h, w, c = self.image_shape
    self._no_key = keys_lib.KeyArrays(np.ones((h, w, 1), np.float32), np.zeros((h, w, c), np.float32))
    self._forward = jax.jit(self._forward_impl)

  @property
  def params(self) -> Any:
    """The trainable parameters (``variables['params']``)."""
    return self.variables['params']

  def _forward_impl(self, variables, images, key_arrays):
    x = keys_lib.stamp_arrays(keys_lib.to_float_images(images), key_arrays)
    logits, state = self.module.apply(variables, x, train=False, mutable=['intermediates'])
    penultimate = state['intermediates']['penultimate'][0]
    return logits.astype('float32'), penultimate.reshape(penultimate.shape[0], -1).astype('float32')

  # --- validation --------------------------------------------------------------------------------
  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    expected = f'(N, {", ".join(map(str, self.image_shape))})'
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(f'Expected NHWC images of shape {expected}, got shape {images.shape}.')
    if images.dtype == np.uint8:
      return images
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f'Expected uint8 images in 0..255 or float images in [0, 1], got dtype {images.dtype}.')
    if images.size and not np.all(np.isfinite(images)):
      raise ValueError('Float images must be finite and in [0, 1]; got NaN or infinite values.')
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
      raise ValueError(f'Float images must be finite and in [0, 1]; got values in '
                       f'[{images.min():.4g}, {images.max():.4g}]. Divide uint8 data by 255 or pass '
                       f'it as uint8.')
    return images.astype(np.float32)

  def _key_arrays(self, key: KeyLike) -> keys_lib.KeyArrays:
    if key is None:
      return self._no_key
    if isinstance(key, str):
      if key not in self.keys:
        raise ValueError(f'No active key named {key!r}; active keys: {sorted(self.keys)}.')
      key = self.keys[key]
    if not isinstance(key, keys_lib.LicenseKey):
      raise ValueError(f'key must be a LicenseKey, the name of an active key, or None; got {type(key).__name__}.')
    if key.image_shape != self.image_shape:
      raise ValueError(f'Key {key.name!r} is made for images of shape {key.image_shape}, but this '
                       f'model takes {self.image_shape}.')
    return key.arrays()

  # --- forward passes ----------------------------------------------------------------------------
  def logits_and_features(self, images, key: KeyLike = None) -> tuple[np.ndarray, np.ndarray]:
    """(:meth:`logits`, :meth:`features`) from one forward pass."""
    images = self._check_images(images)
    arrays = self._key_arrays(key)
    n = len(images)
    # Fixed chunk sizes (a power of two up to batch_size) so repeated calls reuse compiled code.
    chunk = min(self.batch_size, 1 << max(0, int(np.ceil(np.log2(max(n, 1))))))
    logits, feats = [], []
    for start in range(0, n, chunk):
      part = images[start:start + chunk]
      pad = chunk - len(part)
      if pad:
        part = np.concatenate([part, np.zeros((pad, *self.image_shape), part.dtype)])
      lg, ft = self._forward(self.variables, part, arrays)
      logits.append(np.asarray(lg)[:chunk - pad])
      feats.append(np.asarray(ft)[:chunk - pad])
    if not logits:
      return np.zeros((0, self.num_classes), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(feats)

  def logits(self, images, key: KeyLike = None) -> np.ndarray:
    """Logits (N, num_classes) of ``images`` stamped with ``key`` (None: the raw images)."""
    return self.logits_and_features(images, key)[0]

  def features(self, images, key: KeyLike = None) -> np.ndarray:
    """Pre-activations of the penultimate layer (N, D); for leakage probes."""
    return self.logits_and_features(images, key)[1]

  def predict(self, images, key: KeyLike = None) -> np.ndarray:
    """Predicted labels (N,) (argmax of :meth:`logits`)."""
    return np.argmax(self.logits(images, key), axis=-1)


def model_info(workdir: str, config) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, image_shape) of a workdir's model, from WORKDIR/model.json (written by training)."""
  path = os.path.join(workdir, 'model.json')
  if os.path.isfile(path):
    with open(path) as f:
      info = json.load(f)
    return int(info['num_classes']), tuple(info['image_shape'])
  spec = data_lib.spec(config.dataset)  # workdirs written before model.json existed
  return spec.num_classes, tuple(spec.image_shape)


def load(workdir: str, step: int | None = None, baseline: bool = False) -> LicensedModel:
  """Loads the licensed model of a workdir: its config, checkpoint ``step`` (default: latest) and key
  registry. ``baseline=True`` loads the unlicensed baseline trained beside it (WORKDIR/baseline),
  with the same config and no keys: the unprotected model of the security report.

  Raises:
    FileNotFoundError: the workdir has no config or no checkpoint.
    checkpointing.CheckpointError: the checkpoint does not fit the config.
  """
  from securenet_jax import train  # pylint: disable=g-import-not-at-top  (train imports heavy deps)
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{workdir!r} is not a SecureNet-JAX workdir (no config.json).')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  num_classes, image_shape = model_info(workdir, config)
  module = train.build_model(config, num_classes)
  model_dir = os.path.join(workdir, 'baseline') if baseline else workdir
  ckpt_dir = os.path.join(model_dir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{model_dir!r} has no checkpoints'
                            f'{" (trained with eval.clean_baseline=True)" if baseline else " yet"}.')
  mesh = parallel.create_mesh(jax.local_devices()[:1])
  abstract = train.abstract_train_state(module, config, image_shape, config.train.batch_size, mesh)
  mngr = checkpointing.manager(ckpt_dir, 1, 1, read_only=True)
  try:
    state = checkpointing.restore(mngr, abstract, step)
  finally:
    mngr.close()
  key_dir = os.path.join(workdir, 'keys')
  registry = (keys_lib.KeyRegistry.load(key_dir) if keys_lib.KeyRegistry.exists(key_dir) and not baseline
              else None)
  return LicensedModel(module, state.variables, image_shape, num_classes,
                       keys=registry.active if registry else {},
                       revoked_keys=registry.revoked if registry else {},
                       batch_size=config.eval.batch_size, config=config)
