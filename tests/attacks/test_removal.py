"""Tests of securenet_jax.attacks.removal: fine-tuning vs scratch, pruning."""

import jax
import numpy as np
import pytest

from securenet_jax.attacks import common
from securenet_jax.attacks import removal
from tests.attacks.conftest import SHAPE

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
