"""Tests of securenet_jax.models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from securenet_jax import models


def num_params(module, shape):
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))


def test_lenet5_parameter_count_matches_lecun_1998():
  assert num_params(models.create('lenet5', 10), (1, 32, 32, 1)) == 61706
  # 28x28 inputs are zero-padded to 32x32, so the network is the same.
  assert num_params(models.create('lenet5', 10), (1, 28, 28, 1)) == 61706


def test_lenet5_outputs_and_penultimate():
  model = models.create('lenet5', 7)
  x = jnp.ones((3, 28, 28, 1)) * 0.5
  variables = model.init(jax.random.key(0), x)
  logits, state = model.apply(variables, x, train=True, mutable=['intermediates'])
  assert logits.shape == (3, 7)
  assert state['intermediates']['penultimate'][0].shape == (3, 84)


def test_create_rejects_unknown():
  with pytest.raises(ValueError, match='Unknown model'):
    models.create('alexnet', 10)
  with pytest.raises(ValueError, match='num_classes'):
    models.create('lenet5', 1)
  assert 'lenet5' in models.names()
