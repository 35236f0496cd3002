"""Tests of securenet_jax.attacks.recovery: trigger inversion."""

import functools

import jax
import numpy as np
import pytest

from securenet_jax import keys
from securenet_jax.attacks import common
from securenet_jax.attacks import recovery
from tests.attacks.conftest import TOY_GEOMETRY, _toy_images

def test_invert_trigger_recovers_the_key(toy):
  module, variables, arrays, _, x, y = toy
  thief_x, thief_y = _toy_images(100, 5)
  no_key = common.accuracy(module, variables, x, y)
  invert = functools.partial(recovery.invert_trigger, module, variables, thief_x, thief_y,
                             steps=200, learning_rate=0.3, l1_weight=5.0, batch_size=32)
  mask, pattern = invert(rng=jax.random.key(0))
  assert mask.shape == (12, 12, 1) and pattern.shape == (12, 12, 1)
  assert mask.dtype == np.float32 and pattern.dtype == np.float32
  assert 0.0 <= mask.min() and mask.max() <= 1.0 and 0.0 <= pattern.min() and pattern.max() <= 1.0
  acc = recovery.recovered_accuracy(module, variables, mask, pattern, x, y)
  assert acc >= 0.9 and acc >= no_key + 0.5, (acc, no_key)
  # The mass of the recovered mask sits on the key's patch (bottom-right 3x3).
  assert mask[9:, 9:].sum() / mask.sum() >= 0.6
  assert mask.mean() <= 0.1
  # Where the recovered mask is on inside the patch, the pattern matches the key's content.
  on = (mask[..., 0] > 0.5) & (TOY_GEOMETRY.mask()[..., 0] > 0)
  assert on.sum() >= 3
  np.testing.assert_allclose(pattern[on], arrays.add[on], atol=0.2)
  # Deterministic given rng.
  mask2, pattern2 = invert(rng=jax.random.key(0))
  np.testing.assert_array_equal(mask, mask2)
  np.testing.assert_array_equal(pattern, pattern2)
  # The other initialization works too.
  mask3, pattern3 = invert(rng=jax.random.key(1), init='constant')
  assert recovery.recovered_accuracy(module, variables, mask3, pattern3, x, y) >= 0.9


def test_invert_trigger_in_a_region(toy):
  module, variables, _, _, x, y = toy
  thief_x, thief_y = _toy_images(100, 5)
  no_key = common.accuracy(module, variables, x, y)
  invert = functools.partial(recovery.invert_trigger, module, variables, thief_x, thief_y,
                             steps=200, learning_rate=0.3, l1_weight=0.5, batch_size=32,
                             rng=jax.random.key(0))
  for region, works in (((8, 8, 4), True), ((0, 8, 4), False)):
    mask, pattern = invert(region=region)
    outside = recovery.region_mask((12, 12), region) == 0
    assert np.all(mask[outside] == 0.0)
    acc = recovery.recovered_accuracy(module, variables, mask, pattern, x, y)
    if works:  # the thief guessed the corner right
      assert acc >= 0.9, acc
    else:  # a wrong corner gives nothing
      assert acc <= no_key + 0.1, (acc, no_key)


def test_recovered_trigger_is_a_key(toy):
  module, variables, _, _, x, y = toy
  rng = np.random.default_rng(0)
  mask = rng.uniform(size=(12, 12, 1)).astype(np.float32)
  pattern = rng.uniform(size=(12, 12, 1)).astype(np.float32)
  arrays = recovery.as_key_arrays(mask, pattern)
  assert isinstance(arrays, keys.KeyArrays)
  np.testing.assert_allclose(np.asarray(keys.stamp_arrays(x, arrays)), x * (1 - mask) + pattern * mask,
                             atol=1e-6)
  transform = functools.partial(keys.stamp_arrays, arrays=arrays)
  assert recovery.recovered_accuracy(module, variables, mask, pattern, x, y, batch_size=128) == \
      pytest.approx(common.accuracy(module, variables, x, y, transform))
  with pytest.raises(ValueError, match='region'):
    recovery.invert_trigger(module, variables, x, y, steps=1, learning_rate=0.1, l1_weight=0.0,
                            rng=0, region=(10, 10, 4))
  with pytest.raises(ValueError, match='init'):
    recovery.invert_trigger(module, variables, x, y, steps=1, learning_rate=0.1, l1_weight=0.0,
                            rng=0, init='zeros')
