"""Removal attacks (fine-tuning vs. scratch, pruning) and backdoors, on generated data and LeNet-5."""

import functools

import jax
import numpy as np
import pytest

from securenet_jax import keys
from securenet_jax import models
from securenet_jax.attacks import backdoor
from securenet_jax.attacks import common
from securenet_jax.attacks import removal
from tests.conftest import make_images

SHAPE = (28, 28, 1)


def _data(num, seed):
  images, labels = make_images(num, seed)
  return images[..., None], labels.astype(np.int32)


@pytest.fixture(scope='module')
def data():
  train_x, train_y = _data(1500, 0)
  test_x, test_y = _data(400, 1)
  return removal.as_float(train_x), train_y, removal.as_float(test_x), test_y


@pytest.fixture(scope='module')
def module():
  return models.create('lenet5', 10)


@pytest.fixture(scope='module')
def clean_model(module, data):
  train_x, train_y, _, _ = data
  return common.fit(module, None, train_x, train_y, epochs=3, batch_size=64, learning_rate=3e-3,
                    seed=0)


@pytest.fixture(scope='module')
def key_transform():
  geometry = keys.Geometry(kind='patch', image_shape=SHAPE, size=4, position=(23, 23))
  key = keys.derive('test-secret', geometry)
  return functools.partial(keys.stamp_arrays, arrays=key.arrays())


# --- subset ------------------------------------------------------------------------------------------

def test_subset_is_stratified_deterministic_and_sized():
  labels = np.repeat(np.arange(10), [300, 200, 100, 100, 100, 50, 50, 50, 30, 20])  # N = 1000
  images = np.arange(len(labels))[:, None].astype(np.float32)
  x, y = removal.subset(images, labels, 0.1, seed=3)
  assert len(y) == 100
  np.testing.assert_array_equal(labels[x[:, 0].astype(int)], y)  # rows stay paired
  counts = np.bincount(y, minlength=10)
  np.testing.assert_array_equal(counts, [30, 20, 10, 10, 10, 5, 5, 5, 3, 2])
  x2, y2 = removal.subset(images, labels, 0.1, seed=3)
  np.testing.assert_array_equal(x, x2)
  assert not np.array_equal(removal.subset(images, labels, 0.1, seed=4)[0], x)
  # 1% = 10 examples: one per class, although most classes' share rounds to 0.
  _, y = removal.subset(images, labels, 0.01, seed=0)
  np.testing.assert_array_equal(np.bincount(y, minlength=10), np.ones(10))
  # Fewer examples than classes: still the asked size, at least one example.
  assert len(removal.subset(images, labels, 0.005, seed=0)[1]) == 5
  assert len(removal.subset(images, labels, 1e-6, seed=0)[1]) == 1
  assert len(removal.subset(images, labels, 1.0, seed=0)[1]) == 1000
  with pytest.raises(ValueError):
    removal.subset(images, labels, 0.0, seed=0)


def test_fraction_key_and_epochs_for():
  assert [removal.fraction_key(f) for f in (0.01, 0.05, 0.1, 0.5, 0.005)] == [
      '0.01', '0.05', '0.10', '0.50', '0.005']
  assert removal.epochs_for(10, 128, 2, 100) == 100  # one step per epoch
  assert removal.epochs_for(1000, 100, 30, 100) == 30
  assert removal.epochs_for(1000, 100, 1, 95) == 10


# --- pruning -----------------------------------------------------------------------------------------

def test_magnitude_prune_exact_fraction_kernels_only(module):
  variables = module.init(jax.random.key(0), np.zeros((1, *SHAPE), np.float32))
  variables = jax.tree.map(np.asarray, dict(variables))
  # Non-zero biases, so "untouched" is a real check.
  variables['params'] = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.5 if p[-1].key == 'bias' else a, variables['params'])
  total = sum(v['kernel'].size for v in variables['params'].values())
  for fraction in (0.0, 0.3, 0.9, 1.0):
    pruned = removal.magnitude_prune(variables, fraction)
    zeros = sum(int(np.sum(v['kernel'] == 0)) for v in pruned['params'].values())
    assert abs(zeros - round(fraction * total)) <= 1, fraction
    for name, layer in pruned['params'].items():
      np.testing.assert_array_equal(layer['bias'], variables['params'][name]['bias'])
      kept = layer['kernel'] != 0  # the kept weights are unchanged and the largest ones
      np.testing.assert_array_equal(layer['kernel'][kept], variables['params'][name]['kernel'][kept])
    if fraction == 0.0:
      jax.tree.map(np.testing.assert_array_equal, pruned, variables)
    assert removal.kernel_sparsity(pruned) == pytest.approx(fraction, abs=1e-4)
  # Global, not per layer: the surviving weights are all at least as large as every pruned one.
  pruned = removal.magnitude_prune(variables, 0.5)
  before = np.concatenate([np.abs(v['kernel']).ravel() for v in variables['params'].values()])
  after = np.concatenate([np.abs(v['kernel']).ravel() for v in pruned['params'].values()])
  assert before[after == 0].max() <= after[after != 0].min()
  # The input is not modified.
  assert removal.kernel_sparsity(variables) == 0.0


def test_pruning_sweep_structure(module, clean_model, data, key_transform):
  _, _, test_x, test_y = data
  result = removal.pruning_sweep(module, clean_model, test_x, test_y, key_transform,
                                 fractions=(0.2, 0.95))
  assert result['fractions'] == [0.0, 0.2, 0.95]
  for k in ('0.00', '0.20', '0.95'):
    assert 0.0 <= result[f'no_key_acc@{k}'] <= 1.0
    assert 0.0 <= result[f'authorized_acc@{k}'] <= 1.0
  assert result['no_key_acc@0.00'] == pytest.approx(common.accuracy(module, clean_model, test_x, test_y))
  # Pruning hurts (this plain model works without the key, and with it: the key is just a patch).
  assert result['no_key_acc@0.00'] > 0.9
  assert result['authorized_acc@0.95'] <= result['authorized_acc@0.20'] + 0.05
  assert result['best_fraction'] in (0.2, 0.95)
  assert result['max_no_key_gain'] == pytest.approx(result['max_no_key_acc'] - result['no_key_acc@0.00'])


# --- fine-tuning vs. scratch ---------------------------------------------------------------------------

def test_finetune_of_a_trained_model_beats_scratch(module, clean_model, data):
  train_x, train_y, test_x, test_y = data
  result = removal.finetune_vs_scratch(
      module, clean_model, train_x, train_y, test_x, test_y, fractions=(0.01,), epochs=1,
      batch_size=64, learning_rate=1e-3, learning_rates=(1e-4, 1e-3), min_steps=15, seed=0)
  for name in ('finetune_acc@0.01', 'scratch_acc@0.01', 'stolen_acc'):
    assert 0.0 <= result[name] <= 1.0
  assert result['subset_size@0.01'] == 15 and result['epochs@0.01'] == 15
  assert result['finetune_gain@0.01'] == pytest.approx(
      result['finetune_acc@0.01'] - result['scratch_acc@0.01'])
  # A head start shows: 15 examples do not train LeNet-5 from scratch, the stolen weights stay good.
  assert result['finetune_acc@0.01'] > 0.9
  assert result['finetune_gain@0.01'] > 0.3
  by_lr = result['finetune_acc_by_lr']['0.01']
  assert set(by_lr) == {'0.0001', '0.001'}
  assert result['finetune_acc@0.01'] == max(by_lr.values())


# --- backdoors -------------------------------------------------------------------------------------------

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
    images = removal.as_float(images)
  trigger = backdoor.badnets_trigger(SHAPE, seed=0)
  px, py, index = backdoor.poison(images, labels, trigger, target=3, rate=0.1, seed=0)
  assert px.dtype == images.dtype and py.dtype == labels.dtype
  assert px.shape == images.shape and len(index) == 40
  assert np.all(labels[index] != 3) and np.all(py[index] == 3)
  untouched = np.setdiff1d(np.arange(400), index)
  np.testing.assert_array_equal(px[untouched], images[untouched])
  np.testing.assert_array_equal(py[untouched], labels[untouched])
  expected = np.asarray(keys.stamp_arrays(removal.as_float(images[index]), trigger))
  np.testing.assert_allclose(removal.as_float(px[index]), expected, atol=0.5 / 255)
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
