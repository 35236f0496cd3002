"""Fixtures of the attack tests: small models trained once per module on generated data.

* ``lenet``: a plain LeNet-5 on the 28x28 bar images of ``tests.conftest.make_images``;
* ``toy``: a "licensed-like" small MLP on 12x12 bar images that is accurate only when a 3x3 binary key
  patch is stamped in the bottom-right corner (unstamped and forged-key images are trained to class 0,
  as the licensed objective makes a model useless without its key);
* ``data``, ``module``, ``clean_model``, ``key_transform``: LeNet-5 on 1500 bar images, and a 4x4 key.
"""

import functools

import flax.linen as nn
import numpy as np
import pytest

from securenet_jax import images as images_lib
from securenet_jax import keys
from securenet_jax import models
from securenet_jax.attacks import common
from tests.conftest import make_images

SHAPE = (28, 28, 1)


def _float_images(num, seed):
  images, labels = make_images(num, seed)
  return (images[..., None] / 255.0).astype(np.float32), labels.astype(np.int32)


@pytest.fixture(scope='session')
def lenet(module, clean_model):
  """(module, variables, 200 test images, their labels, clean accuracy) of ``clean_model``."""
  test_x, test_y = _float_images(200, 1)
  clean = common.accuracy(module, clean_model, test_x, test_y)
  assert clean >= 0.9, clean
  return module, clean_model, test_x, test_y, clean


class TinyMLP(nn.Module):
  num_classes: int = 5
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(x)))


def _toy_images(num, seed):
  """12x12 images: class c in 0..4 is a bright bar on rows 2c, 2c+1 (left part), on faint noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 5, num).astype(np.int32)
  images = rng.uniform(0.0, 0.25, (num, 12, 12, 1)).astype(np.float32)
  for i, c in enumerate(labels):
    images[i, 2 * c:2 * c + 2, 0:8] = 0.9
  return images, labels


TOY_GEOMETRY = keys.Geometry('patch', (12, 12, 1), size=3, position=(9, 9))


TOY_GEOMETRY = keys.Geometry('patch', (12, 12, 1), size=3, position=(9, 9))


@pytest.fixture(scope='session')
def toy():
  """The licensed-like toy: (module, variables, key arrays, stamp-the-key transform, test images,
  test labels)."""
  rng = np.random.default_rng(3)
  arrays = TOY_GEOMETRY.arrays(TOY_GEOMETRY.sample_numpy(rng))
  forged = TOY_GEOMETRY.arrays(TOY_GEOMETRY.sample_numpy(rng, (1000,)))
  x, y = _toy_images(1000, 0)
  stamp = lambda images, a: np.clip(images * a.keep + a.add, 0.0, 1.0)
  train_x = np.concatenate([stamp(x, arrays), x, stamp(x, forged)])
  train_y = np.concatenate([y, np.zeros_like(y), np.zeros_like(y)])
  module = TinyMLP()
  variables = common.fit(module, None, train_x, train_y, epochs=10, learning_rate=1e-2, seed=0)
  test_x, test_y = _toy_images(300, 1)
  key_transform = functools.partial(keys.stamp_arrays, arrays=arrays)
  assert common.accuracy(module, variables, test_x, test_y, key_transform) >= 0.95
  assert common.accuracy(module, variables, test_x, test_y) <= 0.3  # no key: class 0 only
  return module, variables, arrays, key_transform, test_x, test_y


# --- PGD / FGSM ------------------------------------------------------------------------------------


def _data(num, seed):
  images, labels = make_images(num, seed)
  return images[..., None], labels.astype(np.int32)


@pytest.fixture(scope='session')
def data():
  train_x, train_y = _data(1500, 0)
  test_x, test_y = _data(400, 1)
  return images_lib.to_float(train_x), train_y, images_lib.to_float(test_x), test_y


@pytest.fixture(scope='session')
def module():
  return models.create('lenet5', 10)


@pytest.fixture(scope='session')
def clean_model(module, data):
  train_x, train_y, _, _ = data
  return common.fit(module, None, train_x, train_y, epochs=3, batch_size=64, learning_rate=3e-3,
                    seed=0)


@pytest.fixture(scope='session')
def key_transform():
  geometry = keys.Geometry(kind='patch', image_shape=SHAPE, size=4, position=(23, 23))
  key = keys.derive('test-secret', geometry)
  return functools.partial(keys.stamp_arrays, arrays=key.arrays())


# --- subset ------------------------------------------------------------------------------------------
