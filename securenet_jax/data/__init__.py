"""Datasets behind one interface: ``load(config.dataset) -> Dataset`` and per-host batch iterators.

``config.dataset.name`` picks the dataset and ``config.dataset.source`` where it is read from:

==============  ======================  ==================================================
name            source                  classes, image shape
==============  ======================  ==================================================
fashion_mnist   idx, tfds               10, (28, 28, 1)
mnist           idx, tfds               10, (28, 28, 1)
cifar10         cifar_python, tfds      10, (32, 32, 3)
cifar100        cifar_python, tfds      100 (``label_mode='fine'``) or 20 ('coarse'), (32, 32, 3)
celeba          celeba, tfds            ``num_identities`` or 2 (attribute), (S, S, 3)
facescrub       folder                  the identity folders found, (S, S, 3)
==============  ======================  ==================================================

(S = ``image_size``, default 64.) Sources:

* ``idx``: MNIST-format IDX files in ``data_dir`` (the offline default: Fashion-MNIST from Debian's
  ``dataset-fashion-mnist``); see ``idx.py``.
* ``tfds``: a dataset already prepared by tensorflow-datasets under ``data_dir``, read with
  ``tfds.data_source`` (array_record files; TensorFlow is not needed to read them).
* ``cifar_python``: the official python-pickle release, extracted; see ``cifar.py``.
* ``celeba``: the official CelebA release; ``folder``: one folder per identity (FaceScrub); see
  ``faces.py`` for their tasks, crops, splits and the decoded-image cache.

An empty ``source`` picks the first one listed. Optional fields and their defaults are in
``_common.DEFAULTS``; a config without them gets the defaults. ``spec(cfg)`` gives the number of
classes and the image shape without loading the images.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from securenet_jax.data import _common
from securenet_jax.data import cifar
from securenet_jax.data import faces
from securenet_jax.data import idx
from securenet_jax.data._common import DEFAULT_IDX_DIR, DEFAULTS, SOURCES, DataMissingError

# Datasets whose number of classes and image shape do not depend on the files or options (cifar100:
# with the default fine labels): name -> (number of classes, image shape, tfds name). Use spec() for
# any dataset and config.
KNOWN = {
    'fashion_mnist': (10, (28, 28, 1), 'fashion_mnist'),
    'mnist': (10, (28, 28, 1), 'mnist'),
    'cifar10': (10, (32, 32, 3), 'cifar10'),
    'cifar100': (100, (32, 32, 3), 'cifar100'),
}
NAMES = tuple(SOURCES)
LABEL_MODES = ('fine', 'coarse')

__all__ = ['Dataset', 'DataMissingError', 'DEFAULTS', 'DEFAULT_IDX_DIR', 'KNOWN', 'NAMES', 'SOURCES',
           'Spec', 'epoch_permutation', 'load', 'spec', 'train_batches', 'train_rows', 'validate']


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset held in host memory as uint8 NHWC images and int32 labels.

  ``class_names`` (optional) names the labels: CelebA identity numbers, FaceScrub folder names,
  CIFAR class names (when the release has its meta file).
  """
  name: str
  num_classes: int
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...] | None = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a model needs to know about a dataset before seeing it."""
  num_classes: int
  image_shape: tuple[int, int, int]


def _check_name_and_source(cfg) -> str:
  if cfg.name not in SOURCES:
    raise ValueError(f'Unknown dataset {cfg.name!r}; known: {sorted(SOURCES)}.')
  source = cfg.get('source', None) or SOURCES[cfg.name][0]
  if source not in SOURCES[cfg.name]:
    raise ValueError(f'Unknown dataset source {source!r} for {cfg.name!r}; expected one of '
                     f'{", ".join(repr(s) for s in SOURCES[cfg.name])}.')
  return source


def _label_mode(cfg) -> str:
  mode = _common.option(cfg, 'label_mode')
  if mode not in LABEL_MODES:
    raise ValueError(f'dataset.label_mode must be one of {LABEL_MODES}, got {mode!r}.')
  return mode


def spec(cfg) -> Spec:
  """Number of classes and image shape of the dataset ``cfg`` describes, without decoding images
  (FaceScrub lists its identity folders)."""
  _check_name_and_source(cfg)
  if cfg.name == 'cifar100':
    return Spec(100 if _label_mode(cfg) == 'fine' else 20, (32, 32, 3))
  if cfg.name in KNOWN:
    return Spec(KNOWN[cfg.name][0], KNOWN[cfg.name][1])
  size = faces.image_size(cfg)
  if cfg.name == 'celeba':
    return Spec(faces.celeba_num_classes(cfg), (size, size, 3))
  return Spec(len(faces.list_identity_folders(cfg)), (size, size, 3))


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('source=tfds needs tensorflow-datasets: pip install "securenet-jax[tfds]".') from e
  return tfds


def _tfds_split(cfg, tfds_name: str, split: str):
  tfds = _import_tfds()
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=cfg.data_dir, download=False)
  except Exception as e:  # tfds raises several types for a missing/unprepared dataset
    raise _common.missing(cfg, f'tfds could not open {tfds_name}/{split} in {cfg.data_dir!r}: {e}') from e


def _load_tfds(cfg, tfds_name: str, label_key: str = 'label') -> tuple[np.ndarray, ...]:
  out = []
  for split in ('train', 'test'):
    source = _tfds_split(cfg, tfds_name, split)
    limit = int(_common.option(cfg, f'{split}_limit'))
    n = min(limit, len(source)) if limit else len(source)
    records = [source[i] for i in range(n)]
    if records and label_key not in records[0]:
      raise ValueError(f'tfds {tfds_name}/{split} in {cfg.data_dir!r} has no feature {label_key!r} '
                       f'(features: {sorted(records[0])}).')
    out.append(np.stack([np.asarray(r['image']) for r in records]).astype(np.uint8))
    out.append(np.asarray([r[label_key] for r in records], np.int32))
  return tuple(out)


def _load_arrays(cfg, source: str) -> tuple[tuple[np.ndarray, ...], tuple[str, ...] | None]:
  if source == 'idx':
    if not os.path.isdir(cfg.data_dir):
      raise _common.missing(cfg, f'no directory {cfg.data_dir!r}')
    try:
      return idx.load_split(cfg.data_dir, 'train') + idx.load_split(cfg.data_dir, 'test'), None
    except FileNotFoundError as e:
      raise _common.missing(cfg, f'no IDX file {e.args[0]!r}(.gz)') from e
  if source == 'cifar_python':
    return cifar.load(cfg, cfg.name, _label_mode(cfg))
  if source == 'celeba':
    return faces.load_celeba(cfg)
  if source == 'folder':
    return faces.load_folder(cfg)
  # tfds
  tfds_name = _common.TFDS_NAMES[cfg.name]
  if cfg.name == 'celeba':
    return faces.load_celeba_tfds(cfg, lambda split: _tfds_split(cfg, tfds_name, split))
  label_key = 'coarse_label' if cfg.name == 'cifar100' and _label_mode(cfg) == 'coarse' else 'label'
  return _load_tfds(cfg, tfds_name, label_key), None


def validate(ds: Dataset, expected_shape=None) -> Dataset:
  """Checks shapes, dtypes and label ranges; raises ValueError saying what was expected."""
  for split in ('train', 'test'):
    images, labels = getattr(ds, f'{split}_images'), getattr(ds, f'{split}_labels')
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f'{ds.name} {split}: expected uint8 images (N, H, W, C), got {images.dtype} '
                       f'{images.shape}.')
    if expected_shape is not None and tuple(images.shape[1:]) != tuple(expected_shape):
      raise ValueError(f'{ds.name} {split}: expected images of shape {tuple(expected_shape)}, got '
                       f'{tuple(images.shape[1:])}.')
    if labels.shape != (images.shape[0],):
      raise ValueError(f'{ds.name} {split}: {images.shape[0]} images but labels of shape {labels.shape}.')
    if labels.size and (labels.min() < 0 or labels.max() >= ds.num_classes):
      raise ValueError(f'{ds.name} {split}: labels must be in [0, {ds.num_classes}), found '
                       f'[{labels.min()}, {labels.max()}].')
    if images.shape[0] == 0:
      raise ValueError(f'{ds.name} {split} is empty.')
  if ds.train_images.shape[1:] != ds.test_images.shape[1:]:
    raise ValueError(f'{ds.name}: train and test images differ in shape.')
  if ds.class_names is not None and len(ds.class_names) != ds.num_classes:
    raise ValueError(f'{ds.name}: {len(ds.class_names)} class names for {ds.num_classes} classes.')
  return ds


def load(cfg) -> Dataset:
  """Loads the dataset described by a config's ``dataset`` section.

  Fields used: ``name``, ``source`` (see the module docstring), ``data_dir``, optionally
  ``train_limit`` / ``test_limit`` (keep only the first N examples; 0 = all; the face datasets
  decode only those), and the dataset's own options (``_common.DEFAULTS``).

  Raises:
    DataMissingError: the data is not in ``data_dir`` (the message says how to get it).
    ValueError: unknown names or options, malformed files, images that do not decode.
  """
  source = _check_name_and_source(cfg)
  expected = spec(cfg)
  arrays, class_names = _load_arrays(cfg, source)
  train_images, train_labels, test_images, test_labels = arrays
  train_limit, test_limit = int(_common.option(cfg, 'train_limit')), int(_common.option(cfg, 'test_limit'))
  if train_limit:
    train_images, train_labels = train_images[:train_limit], train_labels[:train_limit]
  if test_limit:
    test_images, test_labels = test_images[:test_limit], test_labels[:test_limit]
  if class_names is not None and len(class_names) != expected.num_classes:
    class_names = None  # e.g. a CIFAR meta file of another release: names are optional
  return validate(Dataset(cfg.name, expected.num_classes, train_images, train_labels, test_images,
                          test_labels, class_names), expected_shape=expected.image_shape)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a pure function of (seed, epoch), so a resumed run sees the
  same batches as an uninterrupted one."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_rows(num_examples: int, global_batch_size: int, seed: int, start_step: int
               ) -> Iterator[np.ndarray]:
  """Yields the example indices of each global training batch, forever, from ``start_step`` on: the
  order of :func:`epoch_permutation`, the last partial batch of an epoch dropped."""
  steps_per_epoch = num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'Batch size {global_batch_size} exceeds the {num_examples} training examples.')
  step = start_step
  while True:
    epoch, offset = divmod(step, steps_per_epoch)
    perm = epoch_permutation(num_examples, seed, epoch)
    for s in range(offset, steps_per_epoch):
      yield perm[s * global_batch_size:(s + 1) * global_batch_size]
    step = (epoch + 1) * steps_per_epoch


def train_batches(images: np.ndarray, labels: np.ndarray, global_batch_size: int, seed: int,
                  start_step: int, process_index: int = 0, process_count: int = 1
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields this host's slice of each global training batch, forever, from ``start_step`` on.

  Every host computes the same permutation and keeps the rows ``[i * B/P, (i + 1) * B/P)`` of each
  global batch, so the hosts together cover each global batch exactly once. The last partial batch
  of an epoch is dropped.
  """
  if global_batch_size % process_count:
    raise ValueError(f'Global batch size {global_batch_size} is not divisible by {process_count} hosts.')
  local = global_batch_size // process_count
  for rows in train_rows(len(images), global_batch_size, seed, start_step):
    mine = rows[process_index * local:][:local]
    yield images[mine], labels[mine]
