"""Tests of securenet_jax.attacks.common: the thief's data, prediction and training loop."""

import numpy as np
import pytest

from securenet_jax.attacks import common

def test_subset_is_stratified_deterministic_and_sized():
  labels = np.repeat(np.arange(10), [300, 200, 100, 100, 100, 50, 50, 50, 30, 20])  # N = 1000
  images = np.arange(len(labels))[:, None].astype(np.float32)
  x, y = common.subset(images, labels, 0.1, seed=3)
  assert len(y) == 100
  np.testing.assert_array_equal(labels[x[:, 0].astype(int)], y)  # rows stay paired
  counts = np.bincount(y, minlength=10)
  np.testing.assert_array_equal(counts, [30, 20, 10, 10, 10, 5, 5, 5, 3, 2])
  x2, y2 = common.subset(images, labels, 0.1, seed=3)
  np.testing.assert_array_equal(x, x2)
  assert not np.array_equal(common.subset(images, labels, 0.1, seed=4)[0], x)
  # 1% = 10 examples: one per class, although most classes' share rounds to 0.
  _, y = common.subset(images, labels, 0.01, seed=0)
  np.testing.assert_array_equal(np.bincount(y, minlength=10), np.ones(10))
  # Fewer examples than classes: still the asked size, at least one example.
  assert len(common.subset(images, labels, 0.005, seed=0)[1]) == 5
  assert len(common.subset(images, labels, 1e-6, seed=0)[1]) == 1
  assert len(common.subset(images, labels, 1.0, seed=0)[1]) == 1000
  with pytest.raises(ValueError):
    common.subset(images, labels, 0.0, seed=0)


def test_fraction_key_and_epochs_for():
  assert [common.fraction_key(f) for f in (0.01, 0.05, 0.1, 0.5, 0.005)] == [
      '0.01', '0.05', '0.10', '0.50', '0.005']
  assert common.epochs_for(10, 128, 2, 100) == 100  # one step per epoch
  assert common.epochs_for(1000, 100, 30, 100) == 30
  assert common.epochs_for(1000, 100, 1, 95) == 10


# --- pruning -----------------------------------------------------------------------------------------
