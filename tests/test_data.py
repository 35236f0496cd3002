"""Tests of securenet_jax.data: the IDX reader, validation, missing data and batch iteration."""

import os

import ml_collections
import numpy as np
import pytest

from securenet_jax import data
from securenet_jax.data import idx
from tests.conftest import write_idx


def cfg(data_dir, **kw):
  c = ml_collections.ConfigDict(dict(name='fashion_mnist', source='idx', data_dir=data_dir,
                                     train_limit=0, test_limit=0))
  c.update(kw)
  return c


def test_load_generated_idx(idx_dir):
  ds = data.load(cfg(idx_dir))
  assert ds.train_images.shape == (2048, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_labels.shape == (512,) and ds.test_labels.dtype == np.int32
  assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
  ds = data.load(cfg(idx_dir, train_limit=100, test_limit=10))
  assert len(ds.train_images) == 100 and len(ds.test_labels) == 10


def test_read_idx_errors(tmp_path):
  bad = tmp_path / 'bad'
  bad.write_bytes(b'\x01\x02\x08\x01' + (3).to_bytes(4, 'big') + b'abc')
  with pytest.raises(ValueError, match='magic'):
    idx.read_idx(str(bad))
  write_idx(str(tmp_path / 'trunc'), np.zeros((4, 5), np.uint8), compress=False)
  (tmp_path / 'trunc').write_bytes((tmp_path / 'trunc').read_bytes()[:-3])
  with pytest.raises(ValueError, match='header'):
    idx.read_idx(str(tmp_path / 'trunc'))
  with pytest.raises(FileNotFoundError):
    idx.read_idx(str(tmp_path / 'nothing'))


def test_label_range_and_count_validated(tmp_path):
  images = np.zeros((8, 28, 28), np.uint8)
  for split in ('train', 't10k'):
    write_idx(str(tmp_path / f'{split}-images-idx3-ubyte'), images)
    write_idx(str(tmp_path / f'{split}-labels-idx1-ubyte'), np.full(8, 12, np.uint8))
  with pytest.raises(ValueError, match=r'labels must be in \[0, 10\)'):
    data.load(cfg(str(tmp_path)))
  write_idx(str(tmp_path / 'train-labels-idx1-ubyte'), np.zeros(7, np.uint8))
  with pytest.raises(ValueError, match='8 images but labels'):
    data.load(cfg(str(tmp_path)))


def test_wrong_image_shape_rejected(tmp_path):
  for split in ('train', 't10k'):
    write_idx(str(tmp_path / f'{split}-images-idx3-ubyte'), np.zeros((4, 32, 32), np.uint8))
    write_idx(str(tmp_path / f'{split}-labels-idx1-ubyte'), np.zeros(4, np.uint8))
  with pytest.raises(ValueError, match=r'expected images of shape \(28, 28, 1\)'):
    data.load(cfg(str(tmp_path)))


def test_missing_data_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DataMissingError) as e:
    data.load(cfg(str(tmp_path / 'nowhere')))
  assert 'apt-get install dataset-fashion-mnist' in str(e.value) and 'tfds' in str(e.value)
  with pytest.raises(data.DataMissingError, match='no IDX file'):
    data.load(cfg(str(tmp_path)))
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.load(cfg(str(tmp_path), name='imagenet'))


def test_train_batches_deterministic_and_resumable():
  images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
  labels = np.arange(100, dtype=np.int32)
  it = data.train_batches(images, labels, 16, seed=3, start_step=0)
  first = [next(it)[1] for _ in range(14)]  # 6 steps per epoch: crosses two epoch boundaries
  resumed = data.train_batches(images, labels, 16, seed=3, start_step=8)
  for k in range(8, 14):
    np.testing.assert_array_equal(next(resumed)[1], first[k])
  epoch0 = np.concatenate(first[:6])
  assert len(set(epoch0)) == 96  # no example twice within an epoch
  assert not np.array_equal(first[0], first[6])  # reshuffled each epoch


def test_train_batches_hosts_partition_the_global_batch():
  images = np.zeros((64, 1, 1, 1), np.uint8)
  labels = np.arange(64, dtype=np.int32)
  full = next(data.train_batches(images, labels, 16, 0, 0))[1]
  parts = [next(data.train_batches(images, labels, 16, 0, 0, p, 4))[1] for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(ValueError, match='divisible'):
    next(data.train_batches(images, labels, 10, 0, 0, 0, 4))


def test_real_fashion_mnist_files(fashion_mnist_dir):
  ds = data.load(cfg(fashion_mnist_dir))
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.test_labels).tolist() == [1000] * 10


def test_tfds_route_reads_prepared_data_source(monkeypatch, tmp_path):
  """The tfds route, against a stand-in for tfds.data_source (tests must not need TensorFlow)."""
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  calls = []

  def data_source(name, *, split, data_dir, download):
    calls.append((name, split, data_dir, download))
    if data_dir != str(tmp_path):
      raise FileNotFoundError(f'{name} not prepared in {data_dir}')
    n = 6 if split == 'train' else 4
    return [{'image': np.full((28, 28, 1), i, np.uint8), 'label': i % 10} for i in range(n)]

  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', types.SimpleNamespace(data_source=data_source))
  ds = data.load(cfg(str(tmp_path), name='mnist', source='tfds'))
  assert ds.train_images.shape == (6, 28, 28, 1) and ds.test_labels.tolist() == [0, 1, 2, 3]
  assert calls[0] == ('mnist', 'train', str(tmp_path), False)  # never downloads
  with pytest.raises(data.DataMissingError, match='tfds could not open mnist/train'):
    data.load(cfg(str(tmp_path / 'empty'), name='mnist', source='tfds'))
