"""Public, jitted inference API.

    from securenet_jax import inference, keys
    model = inference.load(workdir)              # newest checkpoint + config + key registry
    key = model.keys['default']                  # or keys.load('path/to/key.npz')
    logits = model.logits(images, key=key)       # NHWC, uint8 0..255 or float 0..1
    labels = model.predict(images, key=key)
    model.logits(images)                         # no key: the uninformative output

Inputs are validated on the host (shape, dtype, value range, key geometry) and raise ``ValueError``
saying what was expected. The forward pass is one jitted function per model, reused for every key of
the same image shape (the key's arrays are arguments, not constants); the key stamp is fused into it,
uint8 images travel to the device as uint8 and are converted there.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from securenet_jax import checkpointing
from securenet_jax import errors
from securenet_jax import images as images_lib
from securenet_jax import keys as keys_lib
from securenet_jax import licensing
from securenet_jax import models
from securenet_jax import predict as predict_lib
from securenet_jax import workdir as workdir_lib

KeyLike = keys_lib.LicenseKey | str | None


class _DeviceKeys:
  """Keys' stamping arrays on the device: checked and put there once per key, looked up by
  fingerprint afterwards, and the last key object's without any lookup (a key is immutable; at
  batch 1 each Python step before the dispatch shows, docs/performance.md).

  ``host_arrays(key)`` makes the host arrays; ``accepted`` ends the error for anything that is not a
  :class:`keys.LicenseKey` with what else the model takes as a key.
  """

  def __init__(self, image_shape, host_arrays, accepted: str):
    self._image_shape, self._host_arrays, self._accepted = image_shape, host_arrays, accepted
    self._by_fingerprint: dict[str, keys_lib.KeyArrays] = {}
    self._last: tuple[Any, Any] = (None, None)  # (key, its device arrays) of the last call

  def __call__(self, key: keys_lib.LicenseKey) -> keys_lib.KeyArrays:
    last_key, last_arrays = self._last
    if key is last_key:
      return last_arrays
    if not isinstance(key, keys_lib.LicenseKey):
      raise ValueError(f'key must be a LicenseKey{self._accepted}; got {type(key).__name__}.')
    if key.image_shape != self._image_shape:
      raise ValueError(f'Key {key.name!r} is made for images of shape {key.image_shape}, but this '
                       f'model takes {self._image_shape}.')
    arrays = self._by_fingerprint.get(key.fingerprint)
    if arrays is None:
      if len(self._by_fingerprint) > 64:  # forged-key sweeps: keep the cache small
        self._by_fingerprint.clear()
      arrays = self._by_fingerprint[key.fingerprint] = jax.device_put(self._host_arrays(key))
    self._last = (key, arrays)
    return arrays


class LicensedModel:
  """A trained model, its key registry and jitted forward passes.

  Attributes:
    keys: the registry's active keys, name -> LicenseKey.
    revoked_keys: the registry's revoked keys, name -> LicenseKey.
    image_shape: (H, W, C) the model takes.
    num_classes: number of outputs.
    config: the run's config (None when built from parts).
    module: the network the forward passes run (``models.for_inference``: LeNet-5's first convolution
      in its faster direct form on a CPU).
    training_module: the network as configured and trained (what fine-tuning it should use).
  """

  def __init__(self, module, variables: Any, image_shape, num_classes: int,
               keys: dict[str, keys_lib.LicenseKey] | None = None,
               revoked_keys: dict[str, keys_lib.LicenseKey] | None = None,
               batch_size: int = 1000, config: ml_collections.ConfigDict | None = None):
    self.training_module = module  # as configured: what training and the attacks' fine-tunes run
    self.module = models.for_inference(module)  # what the forward passes below run
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self.keys = dict(keys or {})
    self.revoked_keys = dict(revoked_keys or {})
    self.batch_size = batch_size
    self.config = config
    # On the device once, not with every call.
    self._device_variables = jax.device_put(models.as_variables(variables))
    h, w, c = self.image_shape
    self._no_key = jax.device_put(keys_lib.KeyArrays(np.ones((h, w, 1), np.float32),
                                                     np.zeros((h, w, c), np.float32)))
    self._device_keys = _DeviceKeys(self.image_shape, lambda k: k.arrays(),
                                    ', the name of an active key, or None')
    self._logits = jax.jit(self._logits_impl)  # (images, variables, key arrays) -> logits
    self._logits_and_features = jax.jit(self._logits_and_features_impl)

  @property
  def variables(self) -> dict:
    """``{'params': ..., 'batch_stats'?: ...}`` (device arrays)."""
    return self._device_variables

  @property
  def params(self) -> Any:
    """The trainable parameters (``variables['params']``)."""
    return self._device_variables['params']

  def _stamped(self, images, key_arrays):
    return keys_lib.stamp_arrays(images_lib.to_float(images), key_arrays)

  def _logits_impl(self, images, variables, key_arrays):
    return self.module.apply(variables, self._stamped(images, key_arrays), train=False).astype('float32')

  def _logits_and_features_impl(self, images, variables, key_arrays):
    logits, state = self.module.apply(variables, self._stamped(images, key_arrays), train=False,
                                      mutable=['intermediates'])
    gate = state['intermediates']['penultimate'][0]
    return logits.astype('float32'), gate.reshape(gate.shape[0], -1).astype('float32')

  def _key_arrays(self, key: KeyLike) -> keys_lib.KeyArrays:
    if key is None:
      return self._no_key
    if isinstance(key, str):  # looked up on every call: `keys` may map a name to another key later
      if key not in self.keys:
        raise ValueError(f'No active key named {key!r}; active keys: {sorted(self.keys)}.')
      key = self.keys[key]
    return self._device_keys(key)

  # --- forward passes ----------------------------------------------------------------------------
  def logits(self, images, key: KeyLike = None) -> np.ndarray:
    """Logits (N, num_classes) of ``images`` stamped with ``key`` (None: the raw images)."""
    images = images_lib.check(images, self.image_shape)
    return predict_lib.batched(self._logits, images, self._device_variables, self._key_arrays(key),
                               batch_size=self.batch_size)

  def logits_and_features(self, images, key: KeyLike = None) -> tuple[np.ndarray, np.ndarray]:
    """(:meth:`logits`, :meth:`features`) from one forward pass."""
    images = images_lib.check(images, self.image_shape)
    return predict_lib.batched(self._logits_and_features, images, self._device_variables,
                               self._key_arrays(key), batch_size=self.batch_size)

  def features(self, images, key: KeyLike = None) -> np.ndarray:
    """The gate's pre-activations (N, D): the penultimate layer, for leakage probes."""
    return self.logits_and_features(images, key)[1]

  def predict(self, images, key: KeyLike = None) -> np.ndarray:
    """Predicted labels (N,) (argmax of :meth:`logits`)."""
    return np.argmax(self.logits(images, key), axis=-1)


def abstract_variables(module, image_shape) -> Any:
  """Structure, shapes and dtypes of a model's variables, without computing them."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32),
                                              train=False))
  return {k: v for k, v in shapes.items() if k in ('params', 'batch_stats')}


def load(workdir, step: int | None = None, baseline: bool = False) -> LicensedModel:
  """Loads the licensed model of a workdir: its config, checkpoint ``step`` (default: the newest that
  can be read) and key registry. ``baseline=True`` loads the unlicensed baseline trained beside it
  (WORKDIR/baseline), with the same config and no keys: the unprotected model of security reports.

  Raises:
    errors.WorkdirError: not a workdir of this version.
    errors.CheckpointError: no checkpoint that fits the config.
    errors.KeyFileError: a corrupt key registry.
  """
  wd = workdir_lib.Workdir(workdir)
  config = wd.load_config()
  num_classes, image_shape = wd.model_info()
  module = models.build(config.model, num_classes)
  model_wd = wd.baseline if baseline else wd
  if not model_wd.checkpoints_dir.is_dir():
    raise checkpointing.CheckpointError(
        f'{model_wd} has no checkpoints'
        f'{" (the baseline is trained with eval.clean_baseline=True)" if baseline else " yet"}.',
        hint='Train first (rerun the training command on this workdir).')
  variables = checkpointing.restore_variables(model_wd.checkpoints_dir,
                                              abstract_variables(module, image_shape), step)
  registry = None if baseline else licensing.load(wd)
  return LicensedModel(module, variables, image_shape, num_classes,
                       keys=registry.active if registry else {},
                       revoked_keys=registry.revoked if registry else {},
                       batch_size=config.eval.batch_size, config=config)


# --- a deployable artifact ---------------------------------------------------------------------------
_EXPORT_FORMAT = 'securenet-jax-exported'
_EXPORT_VERSION = 1


def export(workdir, path, step: int | None = None) -> str:
  """Writes a workdir's licensed forward pass as a self-contained artifact (one ``.npz`` file).

  The artifact holds the serialized ``jax.export`` modules of the forward pass with the key stamp
  fused (one for uint8 images, one for float images, any batch size), the model's variables, and the
  registry's public data (key names, status, grants, geometry, fingerprints), but no key content:
  the licensee brings the key file. :func:`load_exported` runs it without this package's training
  code or the model's source; its logits equal :meth:`LicensedModel.logits` exactly.

  Returns:
    ``path``.
  """
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top  (needs flatbuffers)
  model = load(workdir, step)
  batch = jax_export.symbolic_shape('batch')[0]
  h, w, c = model.image_shape
  key_spec = jax.ShapeDtypeStruct((h, w, c), np.float32)  # keep and add (plain arrays serialize)
  forward = jax.jit(lambda images, variables, keep, add: model._logits(  # pylint: disable=protected-access
      images, variables, keys_lib.KeyArrays(keep, add)))
  var_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.variables)
  modules = {}
  for dtype in ('uint8', 'float32'):
    images = jax.ShapeDtypeStruct((batch, *model.image_shape), np.dtype(dtype))
    exported = jax_export.export(forward)(images, var_spec, key_spec, key_spec)
    modules[dtype] = np.frombuffer(bytes(exported.serialize()), np.uint8)
  leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(model.variables))
  meta = {'format': _EXPORT_FORMAT, 'version': _EXPORT_VERSION, 'image_shape': list(model.image_shape),
          'num_classes': model.num_classes, 'batch_size': model.batch_size, 'treedef': str(treedef),
          'keys': [{'name': k.name, 'status': status, 'fingerprint': k.fingerprint, 'scheme': k.scheme,
                    'classes': None if k.classes is None else list(k.classes), 'tier': k.tier,
                    'geometry': k.geometry.to_dict()}
                   for status, group in (('active', model.keys), ('revoked', model.revoked_keys))
                   for k in group.values()]}
  arrays = {f'module_{d}': m for d, m in modules.items()}
  arrays.update({f'leaf_{i}': np.asarray(leaf) for i, leaf in enumerate(leaves)})
  workdir_lib.atomic_write_with(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
  return os.fspath(path)


class ExportedModel:
  """An artifact written by :func:`export`: ``logits(images, key)`` and ``predict(images, key)``."""

  def __init__(self, path):
    from jax import export as jax_export  # pylint: disable=g-import-not-at-top
    try:
      with np.load(io.BytesIO(workdir_lib.as_path(path).read_bytes()), allow_pickle=False) as f:
        meta = json.loads(str(f['meta']))
        modules = {d: bytes(f[f'module_{d}']) for d in ('uint8', 'float32')}
        leaves = [f[f'leaf_{i}'] for i in range(sum(k.startswith('leaf_') for k in f.files))]
    except (OSError, KeyError, ValueError) as e:
      raise errors.WorkdirError(f'{path} is not a readable SecureNet-JAX exported model ({e}).') from e
    if meta.get('format') != _EXPORT_FORMAT or meta.get('version') != _EXPORT_VERSION:
      raise errors.WorkdirError(f'{path} is not an exported model of this version '
                                f'({meta.get("format")}, {meta.get("version")}).')
    self.image_shape = tuple(meta['image_shape'])
    self.num_classes = int(meta['num_classes'])
    self.batch_size = int(meta['batch_size'])
    self.keys = {k['name']: k for k in meta['keys'] if k['status'] == 'active'}
    self.revoked_keys = {k['name']: k for k in meta['keys'] if k['status'] == 'revoked'}
    self._modules = {d: jax_export.deserialize(bytearray(m)) for d, m in modules.items()}
    # Jitted once per dtype (and per chunk shape): ``Exported.call`` alone goes through JAX's
    # eager primitive dispatch (custom_vjp, apply_primitive) in Python on every call.
    self._calls = {d: jax.jit(m.call) for d, m in self._modules.items()}
    in_tree = self._modules['float32'].in_tree
    variables_def = in_tree.children()[0].children()[1]
    self._variables = jax.device_put(jax.tree_util.tree_unflatten(variables_def, leaves))
    h, w, c = self.image_shape
    self._no_key = jax.device_put(keys_lib.KeyArrays(np.ones((h, w, c), np.float32),
                                                     np.zeros((h, w, c), np.float32)))

    def full_shape(k):  # the artifact's signature takes keep at the image's full shape
      arrays = k.arrays()
      return keys_lib.KeyArrays(np.broadcast_to(arrays.keep, (h, w, c)), arrays.add)
    self._device_keys = _DeviceKeys(self.image_shape, full_shape, ' (keys.load(...)) or None')

  def _key_arrays(self, key):
    return self._no_key if key is None else self._device_keys(key)

  def logits(self, images, key: keys_lib.LicenseKey | None = None) -> np.ndarray:
    """Logits (N, num_classes) of ``images`` stamped with ``key`` (None: the raw images)."""
    images = images_lib.check(images, self.image_shape)
    call = self._calls['uint8' if images.dtype == np.uint8 else 'float32']
    # The same chunks as LicensedModel.logits: the same compiled shapes, so the same logits, bit for bit.
    return predict_lib.batched(call, images, self._variables, *self._key_arrays(key),
                               batch_size=self.batch_size)

  def predict(self, images, key: keys_lib.LicenseKey | None = None) -> np.ndarray:
    return np.argmax(self.logits(images, key), axis=-1)


def load_exported(path) -> ExportedModel:
  """Loads an artifact written by :func:`export`.

  Raises:
    errors.WorkdirError: not an exported model of this version.
  """
  return ExportedModel(path)
