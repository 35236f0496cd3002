"""Tests of securenet_jax.attacks.theft: units and cut points of the zoo, re-opened gates, the moves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from securenet_jax import models
from securenet_jax.attacks import common
from securenet_jax.attacks import theft


def _params(name, **kw):
  module = models.create(name, 10, **kw)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))['params']


def test_units_and_cut_points_of_lenet_and_resnet():
  lenet = _params('lenet5')
  assert [u for u, _ in theft.units(lenet)] == ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
  assert theft.cut_points(lenet) == {'fc3': ['fc3'], 'fc2..fc3': ['fc2', 'fc3'],
                                     'fc1..fc3': ['fc1', 'fc2', 'fc3'],
                                     'conv2..fc3': ['conv2', 'fc1', 'fc2', 'fc3']}
  bn = _params('lenet5', batch_norm=True)  # each layer's BatchNorm goes with it
  assert [(u, set(n)) for u, n in theft.units(bn)] == [
      ('conv1', {'conv1', 'bn1'}), ('conv2', {'conv2', 'bn2'}), ('fc1', {'fc1', 'fc1_bn'}),
      ('fc2', {'fc2', 'fc2_bn'}), ('fc3', {'fc3'})]
  assert [theft.output_of(u, n) for u, n in theft.units(bn)] == ['bn1', 'bn2', 'fc1_bn', 'fc2_bn', 'fc3']
  assert set(theft.cut_points(bn)['fc2..fc3']) == {'fc2', 'fc2_bn', 'fc3'}
  resnet = _params('resnet18', small_inputs=True)
  names = [u for u, _ in theft.units(resnet)]
  assert names == ['conv1'] + [f'layer{s}_{b}' for s in range(1, 5) for b in range(2)] + ['head']
  cuts = theft.cut_points(resnet)
  # head; last block; last stage; last two stages (each with the head)
  assert cuts['head'] == ['head']
  assert set(cuts['layer4_1..head']) == {p for p in resnet if p.startswith('layer4_1')} | {'head'}
  assert set(cuts['layer4_0..head']) == {p for p in resnet if p.startswith('layer4')} | {'head'}
  assert set(cuts['layer3_0..head']) == {p for p in resnet if p.startswith(('layer3', 'layer4'))} | {'head'}


def test_units_of_every_zoo_model_cover_all_parameters():
  for name, kw in [('vgg16', {'small_inputs': True, 'batch_norm': True}),
                   ('mobilenetv3_small', {'small_inputs': True}),
                   ('nfnet_f5', {'variant': 'F0', 'width_multiplier': 0.125, 'small_inputs': True})]:
    params = _params(name, **kw)
    us = theft.units(params)
    assert sorted(p for _, ps in us for p in ps) == sorted(params), name
    assert us[-1][0] == 'head' and len(theft.cut_points(params)) >= 3, name


def test_open_gates_reopens_a_silenced_layer(module, clean_model, data):
  train_x = data[0][:256]
  silenced = jax.tree.map(np.array, clean_model)
  silenced['params']['fc2']['bias'][:] = -1e3  # every fc2 unit dead: the logits are constant
  before = theft.layer_features(module, silenced, train_x)['fc2']
  assert np.all(before <= 0)
  opened = theft.open_gates(module, silenced, train_x)
  after = theft.layer_features(module, opened, train_x)['fc2']
  alive = np.mean(after > 0, axis=0)
  assert np.all((alive > 0.3) & (alive < 0.7))  # about half of the images pass each unit again
  np.testing.assert_array_equal(opened['params']['fc1']['kernel'], clean_model['params']['fc1']['kernel'])


def test_frozen_layers_do_not_move(module, clean_model, data):
  x, y = data[0][:128], data[1][:128]
  tuned = common.fit(module, clean_model, x, y, epochs=1, batch_size=32, learning_rate=1e-2,
                     trainable={'fc3'})
  for name in ('conv1', 'conv2', 'fc1', 'fc2'):
    np.testing.assert_array_equal(tuned['params'][name]['kernel'], clean_model['params'][name]['kernel'])
  assert not np.array_equal(tuned['params']['fc3']['kernel'], clean_model['params']['fc3']['kernel'])


def test_steal_scores_moves_against_scratch(module, clean_model, data):
  """One labeled image per class: every move is scored, the best one against scratch."""
  train_x, train_y, test_x, test_y = data
  recipe = theft.Recipe(adam_learning_rates=(3e-3,), sgd_learning_rates=(0.05,), epochs=2, min_steps=40,
                        batch_size=32)
  out = theft.steal(module, clean_model, train_x, train_y, test_x, test_y, fraction=0.007, recipe=recipe,
                    moves=('freeze', 'probe'))
  moves = out['moves']
  assert set(moves) == {'scratch', *(f'freeze:{c}' for c in theft.cut_points(clean_model['params'])),
                        *(f'probe:{u}/{k}' for u in ('conv1', 'conv2', 'fc1', 'fc2') for k in ('pre', 'post'))}
  assert out['subset_size'] == 10 and out['gain'] == pytest.approx(out['best_acc'] - out['scratch_acc'])
  assert moves['probe:fc2/post'] >= 0.9 and out['best_acc'] == max(v for m, v in moves.items() if m != 'scratch')
  # A scratch accuracy measured before is taken as given (it does not depend on the stolen weights).
  again = theft.steal(module, clean_model, train_x, train_y, test_x, test_y, fraction=0.007, recipe=recipe,
                      moves=('probe',), scratch_acc=0.25)
  assert again['scratch_acc'] == 0.25 and again['gain'] == pytest.approx(again['best_acc'] - 0.25)


@pytest.mark.slow
def test_steal_runs_every_move(module, clean_model, data):
  train_x, train_y, test_x, test_y = data
  recipe = theft.Recipe(adam_learning_rates=(3e-3,), sgd_learning_rates=(), epochs=1, min_steps=10,
                        batch_size=32)
  out = theft.steal(module, clean_model, train_x, train_y, test_x, test_y, fraction=0.05, recipe=recipe)
  assert {'scratch', 'finetune', 'open_gate', 'reinit:fc3', 'reinit:conv2..fc3', 'freeze:fc1..fc3',
          'probe:conv1/pre', 'probe:fc2/post'} <= set(out['moves'])
  assert all(0.0 <= v <= 1.0 for v in out['moves'].values())


def _tiny_zoo_run(name, **kw):
  """Every move of the thief on an untrained zoo model, tiny data (6 steps per fit)."""
  module = models.create(name, 4, small_inputs=True, **kw)
  rng = np.random.default_rng(0)
  x = rng.random((48, 16, 16, 3)).astype(np.float32)
  y = np.arange(48) % 4
  stolen = jax.tree.map(np.asarray, module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
  recipe = theft.Recipe(adam_learning_rates=(1e-3,), sgd_learning_rates=(), epochs=1, min_steps=6,
                        batch_size=8)
  out = theft.steal(module, stolen, x, y, x[:16], y[:16], fraction=1.0, recipe=recipe)
  cuts = theft.cut_points(stolen['params'])
  assert {'scratch', 'finetune', 'open_gate', *(f'reinit:{c}' for c in cuts),
          *(f'freeze:{c}' for c in cuts)} <= set(out['moves'])
  assert any(m.startswith('probe:') for m in out['moves'])
  assert all(0.0 <= v <= 1.0 for v in out['moves'].values())
  return out


@pytest.mark.slow
def test_every_move_runs_on_a_batchnorm_resnet():
  out = _tiny_zoo_run('resnet18', depth=10, width=8)
  # the head, the last stage, the last two stages, three stages
  assert {'reinit:head', 'freeze:layer4_0..head', 'reinit:layer3_0..head', 'freeze:layer2_0..head'} <= set(out['moves'])


@pytest.mark.zoo
@pytest.mark.parametrize('name, kw', [('vgg16', {'batch_norm': True}), ('mobilenetv3_small', {}),
                                      ('nfnet_f5', {'variant': 'F0'}), ('resnet101', {})])
def test_every_move_runs_on_the_zoo(name, kw):
  _tiny_zoo_run(name, **kw)
