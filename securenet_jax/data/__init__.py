"""Datasets behind one interface: ``load(config.dataset) -> Dataset`` and per-host batch iterators.

Sources:
* ``idx``: MNIST-format IDX files in ``data_dir`` (the offline default: Fashion-MNIST from Debian's
  ``dataset-fashion-mnist``).
* ``tfds``: a dataset already prepared by tensorflow-datasets under ``data_dir``, read with
  ``tfds.data_source`` (array_record files; TensorFlow is not needed to read them).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from securenet_jax.data import idx

# name -> (number of classes, image shape, tfds name)
KNOWN = {
    'fashion_mnist': (10, (28, 28, 1), 'fashion_mnist'),
    'mnist': (10, (28, 28, 1), 'mnist'),
}
DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset held in host memory as uint8 NHWC images and int32 labels."""
  name: str
  num_classes: int
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


class DataMissingError(FileNotFoundError):
  """The dataset is not where the config says."""


def _missing(cfg, detail: str) -> DataMissingError:
  return DataMissingError(
      f'Dataset {cfg.name!r} not found ({detail}). Two ways to get it:\n'
      f'  1. Fashion-MNIST offline: `apt-get install dataset-fashion-mnist` (installs the IDX files in '
      f'{DEFAULT_IDX_DIR}), or put MNIST-format IDX files in a folder and set '
      f'--config.dataset.source=idx --config.dataset.data_dir=DIR.\n'
      f'  2. tensorflow-datasets: on a machine with network, `pip install "securenet-jax[tfds]"` and '
      f'`tfds build {KNOWN.get(cfg.name, (0, 0, cfg.name))[2]} --data_dir=DIR` (or tfds.load), then set '
      f'--config.dataset.source=tfds --config.dataset.data_dir=DIR.')


def _load_tfds(cfg, tfds_name: str) -> tuple[np.ndarray, ...]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('source=tfds needs tensorflow-datasets: pip install "securenet-jax[tfds]".') from e
  out = []
  for split in ('train', 'test'):
    try:
      source = tfds.data_source(tfds_name, split=split, data_dir=cfg.data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing/unprepared dataset
      raise _missing(cfg, f'tfds could not open {tfds_name}/{split} in {cfg.data_dir!r}: {e}') from e
    records = [source[i] for i in range(len(source))]
    out.append(np.stack([r['image'] for r in records]).astype(np.uint8))
    out.append(np.asarray([r['label'] for r in records], np.int32))
  return tuple(out)


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
  return ds


def load(cfg) -> Dataset:
  """Loads the dataset described by a config's ``dataset`` section.

  Fields used: ``name``, ``source`` ('idx' or 'tfds'), ``data_dir``, and optionally ``train_limit`` /
  ``test_limit`` (keep only the first N examples; 0 = all) for quick runs.
  """
  if cfg.name not in KNOWN:
    raise ValueError(f'Unknown dataset {cfg.name!r}; known: {sorted(KNOWN)}.')
  num_classes, shape, tfds_name = KNOWN[cfg.name]
  if cfg.source == 'idx':
    if not os.path.isdir(cfg.data_dir):
      raise _missing(cfg, f'no directory {cfg.data_dir!r}')
    try:
      arrays = idx.load_split(cfg.data_dir, 'train') + idx.load_split(cfg.data_dir, 'test')
    except FileNotFoundError as e:
      raise _missing(cfg, f'no IDX file {e.args[0]!r}(.gz)') from e
  elif cfg.source == 'tfds':
    arrays = _load_tfds(cfg, tfds_name)
  else:
    raise ValueError(f'Unknown dataset source {cfg.source!r}; expected "idx" or "tfds".')
  train_images, train_labels, test_images, test_labels = arrays
  if cfg.get('train_limit', 0):
    train_images, train_labels = train_images[:cfg.train_limit], train_labels[:cfg.train_limit]
  if cfg.get('test_limit', 0):
    test_images, test_labels = test_images[:cfg.test_limit], test_labels[:cfg.test_limit]
  return validate(Dataset(cfg.name, num_classes, train_images, train_labels, test_images, test_labels),
                  expected_shape=shape)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a pure function of (seed, epoch), so a resumed run sees the
  same batches as an uninterrupted one."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


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
  steps_per_epoch = len(images) // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'Batch size {global_batch_size} exceeds the {len(images)} training examples.')
  local = global_batch_size // process_count
  step = start_step
  while True:
    epoch, offset = divmod(step, steps_per_epoch)
    perm = epoch_permutation(len(images), seed, epoch)
    for s in range(offset, steps_per_epoch):
      rows = perm[s * global_batch_size + process_index * local:][:local]
      yield images[rows], labels[rows]
    step = (epoch + 1) * steps_per_epoch
