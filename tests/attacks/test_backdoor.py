"""Tests of securenet_jax.attacks.backdoor: triggers, poisoning, attack success rate."""

import numpy as np
import pytest

from securenet_jax import images as images_lib
from securenet_jax import keys
from securenet_jax.attacks import backdoor
from securenet_jax.attacks import common
from tests.attacks.conftest import SHAPE, _data

def test_triggers():
  patch = backdoor.badnets_trigger(SHAPE, size=3, seed=1)
  assert patch.keep.shape == (28, 28, 1) and patch.add.shape == (28, 28, 1)
  assert np.all(patch.keep[1:4, 1:4] == 0) and patch.keep.sum() == 28 * 28 - 9
  content = patch.add[1:4, 1:4]
  assert set(np.unique(content)) == {0.0, 1.0}
  assert patch.add.sum() == content.sum()  # nothing outside the patch
  np.testing.assert_array_equal(backdoor.badnets_trigger(SHAPE, seed=1).add, patch.add)
  moved = backdoor.badnets_trigger((32, 32, 3), size=4, position=(10, 20), seed=0)
  assert moved.add.shape == (32, 32, 3) and np.all(moved.keep[10:14, 20:24] == 0)
  with pytest.raises(ValueError):
    backdoor.badnets_trigger(SHAPE, size=4, position=(26, 0))
  blend = backdoor.blend_trigger(SHAPE, alpha=0.2, seed=0)
  np.testing.assert_allclose(blend.keep, 0.8)
  assert blend.add.shape == SHAPE and 0.0 <= blend.add.min() and blend.add.max() <= 0.2
  assert blend.add.std() > 0.02
  x = np.full((2, *SHAPE), 0.5, np.float32)
  np.testing.assert_allclose(np.asarray(keys.stamp_arrays(x, blend)), 0.4 + blend.add[None] + 0 * x,
                             atol=1e-6)


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_poison(dtype):
  images, labels = _data(400, 5)
  if dtype == np.float32:
    images = images_lib.to_float(images)
  trigger = backdoor.badnets_trigger(SHAPE, seed=0)
  px, py, index = backdoor.poison(images, labels, trigger, target=3, rate=0.1, seed=0)
  assert px.dtype == images.dtype and py.dtype == labels.dtype
  assert px.shape == images.shape and len(index) == 40
  assert np.all(labels[index] != 3) and np.all(py[index] == 3)
  untouched = np.setdiff1d(np.arange(400), index)
  np.testing.assert_array_equal(px[untouched], images[untouched])
  np.testing.assert_array_equal(py[untouched], labels[untouched])
  expected = np.asarray(keys.stamp_arrays(images_lib.to_float(images[index]), trigger))
  np.testing.assert_allclose(images_lib.to_float(px[index]), expected, atol=0.5 / 255)
  assert not np.array_equal(px[index], images[index])
  px2, _, index2 = backdoor.poison(images, labels, trigger, target=3, rate=0.1, seed=0)
  np.testing.assert_array_equal(index, index2)
  np.testing.assert_array_equal(px, px2)
  # More than the non-target examples: all of them, none of the target class.
  _, py, index = backdoor.poison(images, labels, trigger, target=3, rate=1.0, seed=0)
  assert len(index) == np.sum(labels != 3) and np.all(py == 3)


def test_attack_success_rate_detects_a_backdoor(module, clean_model, data):
  train_x, train_y, test_x, test_y = data
  trigger = backdoor.badnets_trigger(SHAPE, seed=0)
  px, py, _ = backdoor.poison(train_x, train_y, trigger, target=0, rate=0.2, seed=0)
  poisoned = common.fit(module, None, px, py, epochs=4, batch_size=64, learning_rate=3e-3, seed=0)
  assert backdoor.attack_success_rate(module, poisoned, test_x, test_y, trigger, 0) > 0.8
  assert common.accuracy(module, poisoned, test_x, test_y) > 0.8  # still works on clean inputs
  assert backdoor.attack_success_rate(module, clean_model, test_x, test_y, trigger, 0) < 0.2


def test_thief_backdoor_finetune_reports(module, clean_model, data, key_transform):
  train_x, train_y, test_x, test_y = data
  trigger = backdoor.badnets_trigger(SHAPE, seed=0)
  result = backdoor.thief_backdoor_finetune(
      module, clean_model, train_x, train_y, test_x, test_y, trigger=trigger, target=0,
      poison_rate=0.2, data_fraction=0.1, epochs=2, learning_rate=1e-3, seed=0,
      key_transform=key_transform, batch_size=64)
  for name in ('asr_licensed', 'asr_raw', 'clean_acc_licensed', 'clean_acc_raw', 'asr_licensed_before',
               'asr_raw_before'):
    assert 0.0 <= result[name] <= 1.0, name
  # before the fine-tune: the stolen model's own rate on the triggered inputs
  assert result['asr_raw_before'] == backdoor.attack_success_rate(module, clean_model, test_x, test_y, trigger, 0)
  assert result['asr_licensed_before'] == backdoor.attack_success_rate(module, clean_model, test_x, test_y,
                                                                       trigger, 0, key_transform)
  assert result['num_train'] == 150 and result['num_poisoned'] == 30
  plain = backdoor.thief_backdoor_finetune(
      module, clean_model, train_x, train_y, test_x, test_y, trigger=trigger, target=0,
      data_fraction=0.05, epochs=1, learning_rate=1e-3, seed=0, batch_size=64)
  assert plain['asr_licensed'] is None and plain['clean_acc_licensed'] is None
  assert plain['asr_licensed_before'] is None
  assert 0.0 <= plain['asr_raw'] <= 1.0
  assert 'num_open_before' not in plain


def test_thief_backdoor_finetune_counts_the_inputs_the_stolen_gate_passes(module, clean_model, data):
  """num_open_before counts the thief's training inputs, poisoned ones included, that gate_open flags."""
  train_x, train_y, test_x, test_y = data
  trigger = backdoor.badnets_trigger(SHAPE, seed=0)
  seen = []
  def bright(x):  # a stand-in for 'some gate unit passes it': the brightest third of the inputs
    seen.append(x.copy())
    means = x.reshape(len(x), -1).mean(-1)
    return means > np.quantile(means, 2 / 3)
  result = backdoor.thief_backdoor_finetune(
      module, clean_model, train_x, train_y, test_x, test_y, trigger=trigger, target=0,
      poison_rate=0.2, data_fraction=0.1, epochs=1, learning_rate=1e-3, seed=0, batch_size=64,
      gate_open=bright)
  assert result['num_open_before'] == 50  # a third of the 150 training inputs
  x, _, _ = backdoor.poison(*common.subset(train_x, train_y, 0.1, 0), trigger, 0, 0.2, 0)
  np.testing.assert_array_equal(seen[0], x)  # it saw the thief's inputs, the poisoned ones stamped
