"""Tests of securenet_jax.models.

Full-size models are only ever traced (``jax.eval_shape``). The small-input tests fill the variables
with cheap numpy values instead of running ``init`` (compiling the initializers of a deep network
costs more than compiling the network itself on CPU) and jit one train and one eval function per
model and input shape.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from securenet_jax import models
from securenet_jax.models import nfnet


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


def test_lenet5_with_batch_norm():
  """batch_norm=True: a BatchNorm after each hidden layer (running statistics outside the params),
  batch statistics in training mode, running averages in evaluation, the gate after fc2's norm."""
  model = models.create('lenet5', num_classes=10, batch_norm=True)
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  variables = model.init(jax.random.key(0), x[:1])
  assert sorted(variables['batch_stats']) == ['bn1', 'bn2', 'fc1_bn', 'fc2_bn']
  assert sum(p.size for p in jax.tree.leaves(variables['params'])) == 61_706 + 2 * (6 + 16 + 120 + 84)
  train_out, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'])
  eval_out = model.apply(variables, x, train=False)
  assert train_out.shape == eval_out.shape == (8, 10)
  assert not np.allclose(train_out, eval_out)  # batch statistics vs the (initial) running averages
  assert state['intermediates']['penultimate'][0].shape == (8, 84)
  assert not jax.tree.all(jax.tree.map(np.allclose, state['batch_stats'], variables['batch_stats']))


@pytest.mark.parametrize('impl', ['direct', 'banded'])
@pytest.mark.parametrize('channels', [1, 3])
def test_lenet5_conv_impls_are_the_xla_network(impl, channels):
  """'direct' (conv1 as a sum of shifted copies) and 'banded' (both convolutions as banded matrix
  products), each with pooling by a reshape: the same parameters from the same seed, the same outputs
  and gradients (parameters and input) as nn.Conv and nn.max_pool up to float rounding."""
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, channels))
  xla, other = (models.create('lenet5', 10, conv_impl=name) for name in ('xla', impl))
  variables = xla.init(jax.random.key(0), x[:1])
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, other.init(jax.random.key(0), x[:1])))
  np.testing.assert_allclose(other.apply(variables, x), xla.apply(variables, x), atol=1e-5)
  loss = lambda model: lambda v, x: jnp.sum(model.apply(v, x) ** 2)
  grads = [jax.grad(loss(m), argnums=(0, 1))(variables, x) for m in (xla, other)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)
  assert np.abs(grads[1][1]).max() > 0  # the input gradient (attacks, adversarial training) flows


def test_banded_conv_matches_conv_on_odd_shapes():
  """BandedConv on a non-square input with a non-square kernel and leading batch dimensions."""
  from securenet_jax.models import lenet  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(2), (2, 3, 9, 13, 2))
  banded, conv = lenet.BandedConv(4, (3, 5)), nn.Conv(4, (3, 5), padding='VALID')
  variables = conv.init(jax.random.key(0), x)
  np.testing.assert_allclose(banded.apply(variables, x), conv.apply(variables, x), atol=1e-5)


def test_lenet5_conv_impl_choice():
  from securenet_jax.models import lenet  # pylint: disable=g-import-not-at-top
  cpu = jax.default_backend() == 'cpu'  # where the tests run
  # None (training's default): banded matrix products on a CPU; 'auto' (the inference API): the direct
  # form for one channel on a CPU; XLA's convolution on accelerators.
  assert lenet.resolve_conv_impl(None, 1) == ('banded' if cpu else 'xla')
  assert lenet.resolve_conv_impl('auto', 1) == ('direct' if cpu else 'xla')
  assert lenet.resolve_conv_impl('auto', 3) == ('banded' if cpu else 'xla')
  assert lenet.resolve_conv_impl('direct', 3) == 'direct' and lenet.resolve_conv_impl('xla', 1) == 'xla'
  # The inference API takes 'auto' for a LeNet-5 left at None; a chosen one is kept; other models are
  # left as they are.
  assert models.create('lenet5', 10).conv_impl is None
  assert models.for_inference(models.create('lenet5', 10)).conv_impl == 'auto'
  assert models.for_inference(models.create('lenet5', 10, conv_impl='xla')).conv_impl == 'xla'
  resnet = models.create('resnet18', 10)
  assert models.for_inference(resnet) is resnet
  with pytest.raises(ValueError, match='conv_impl'):
    models.create('lenet5', 10, conv_impl='fast').init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_create_rejects_unknown():
  with pytest.raises(ValueError, match='Unknown model'):
    models.create('alexnet', 10)
  with pytest.raises(ValueError, match='num_classes'):
    models.create('lenet5', 1)
  for name in ('lenet5', 'vgg16', 'resnet18', 'resnet101', 'nfnet_f5', 'mobilenetv3_large',
               'mobilenetv3_small'):
    assert name in models.names()


@pytest.mark.parametrize('name, kwargs, expected', [
    ('resnet18', {}, 11_689_512),
    ('resnet101', {}, 44_549_160),
    ('vgg16', {}, 138_357_544),
    ('vgg16', {'batch_norm': True}, 138_365_992),
    ('mobilenetv3_large', {}, 5_483_032),
    ('mobilenetv3_small', {}, 2_542_856),
    ('nfnet_f5', {'variant': 'F0'}, 71_489_284),  # timm's dm_nfnet_f0: 71.5M
])
def test_imagenet_parameter_counts_match_torchvision(name, kwargs, expected):
  assert num_params(models.create(name, 1000, **kwargs), (1, 224, 224, 3)) == expected


def test_nfnet_f5_parameter_count_matches_paper():
  model = models.create('nfnet_f5', 1000)
  assert (model.variant, model.width_multiplier) == ('F5', 1.0)
  assert nfnet.variant_depths('F5') == (6, 12, 36, 18)
  assert abs(num_params(model, (1, 224, 224, 3)) / 377.2e6 - 1) < 0.01


def test_vgg16_batch_norm_keeps_running_stats_out_of_params():
  model = models.create('vgg16', 1000, batch_norm=True)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert len(variables['batch_stats']) == 13


# name -> (create kwargs for the quick small-input tests, whether it has BN, whether it has dropout)
SMALL = {
    'vgg16': ({}, False, True),
    'vgg16_bn': ({'batch_norm': True}, True, True),
    'resnet18': ({}, True, False),
    'resnet101': ({}, True, False),
    'mobilenetv3_large': ({}, True, True),
    'mobilenetv3_small': ({}, True, True),
    'nfnet_f5': ({'variant': 'F0', 'width_multiplier': 0.125}, False, True),
}
NUM_CLASSES = 5
# Width of the gate for 28x28 (VGG: padded to 32x32) and 32x32 inputs: the last hidden FC layer, or
# the flattened 4x4 map of the last block / final conv.
GATE_WIDTH = {'vgg16': 512, 'vgg16_bn': 512, 'resnet18': 16 * 512, 'resnet101': 16 * 2048,
              'mobilenetv3_large': 1280, 'mobilenetv3_small': 1024, 'nfnet_f5': 16 * 2 * 192}


def small_model(key, **extra):
  kwargs, _, _ = SMALL[key]
  return models.create(key.removesuffix('_bn'), NUM_CLASSES, small_inputs=True, **kwargs, **extra)


@functools.lru_cache(maxsize=None)
def abstract_variables(key, shape):
  model = small_model(key)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def fake_variables(key, shape, seed=0):
  """Variables of the right structure with cheap random values (no initializer is compiled)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      v = rng.normal(0, np.sqrt(2 / fan_in), leaf.shape)
    elif name in ('scale', 'gain'):
      v = rng.uniform(0.3, 0.7, leaf.shape)
    elif name == 'skip_gain':
      v = np.ones(leaf.shape)
    elif name in ('bias', 'mean'):
      v = rng.normal(0, 0.1, leaf.shape)
    elif name == 'var':
      v = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      raise AssertionError(f'unexpected variable {path}')
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(key, shape))


@functools.lru_cache(maxsize=None)
def compiled(key):
  """Jitted (train, eval) functions of the small model ``key``; both return (logits, state)."""
  model = small_model(key)

  @jax.jit
  def train_fn(variables, x, rng):
    return model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                       rngs={'dropout': rng})

  @jax.jit
  def eval_fn(variables, x, rng):
    return model.apply(variables, x, train=False, mutable=['intermediates'], rngs={'dropout': rng})

  return train_fn, eval_fn


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


# ResNet-18 stands for the BatchNorm models in the fast tests; the others compile for minutes on CPU.
_SMALL_PARAMS = [k if k == 'resnet18' else pytest.param(k, marks=pytest.mark.slow) for k in SMALL]


@pytest.mark.parametrize('shape', [(2, 28, 28, 1), (2, 32, 32, 3)])
@pytest.mark.parametrize('key', _SMALL_PARAMS)
def test_small_inputs_train_and_eval(key, shape):
  _, has_bn, has_dropout = SMALL[key]
  if key in ('vgg16_bn', 'resnet101', 'nfnet_f5') and shape[-1] == 1:
    pytest.skip('a slow-compiling model: one input shape is enough')
  train_fn, eval_fn = compiled(key)
  variables = fake_variables(key, shape)
  x = images(shape)
  r1, r2 = jax.random.key(1), jax.random.key(2)

  logits, state = eval_fn(variables, x, r1)
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  (g,) = state['intermediates']['penultimate']
  assert g.shape == (2, GATE_WIDTH[key]) and g.dtype == jnp.float32
  # Eval mode: deterministic and independent of the dropout rng.
  np.testing.assert_array_equal(logits, eval_fn(variables, x, r2)[0])

  train_logits, train_state = train_fn(variables, x, r1)
  assert train_logits.shape == (2, NUM_CLASSES)
  assert train_state['intermediates']['penultimate'][0].shape == g.shape
  np.testing.assert_array_equal(train_logits, train_fn(variables, x, r1)[0])
  other = train_fn(variables, x, r2)[0]
  assert np.any(np.asarray(other) != np.asarray(train_logits)) == has_dropout
  assert ('batch_stats' in variables) == has_bn
  if has_bn:
    old, new = variables['batch_stats'], train_state['batch_stats']
    assert jax.tree.structure(old) == jax.tree.structure(new)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
      assert a.shape == b.shape and not np.allclose(a, b)
    # Batch statistics, not running averages, in training mode.
    assert not np.allclose(train_logits, logits)


@pytest.mark.parametrize('key', list(SMALL))
def test_small_inputs_64px_and_bfloat16(key):
  """64x64 inputs with bfloat16 computation (traced only): float32 parameters, logits and gate."""
  model = small_model(key, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits, state = jax.eval_shape(lambda v: model.apply(v, x, mutable=['intermediates']), variables)
  assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
  (g,) = state['intermediates']['penultimate']
  assert g.ndim == 2 and g.dtype == jnp.float32


# The output head as a function of the gate g: what each model must compute from g alone.
def _relu_head(g, fc, pool):
  c = fc['kernel'].shape[0]
  features = np.maximum(g, 0).reshape(g.shape[0], -1, c).mean(axis=1) if pool else np.maximum(g, 0)
  return features, features @ fc['kernel'] + fc['bias']


def _hard_swish_head(g, fc):
  z = g - 3
  features = z * np.clip(g, 0, 6) / 6
  return features, features @ fc['kernel'] + fc['bias']


def _gelu_head(g, fc):
  c = fc['kernel'].shape[0]
  z = (g - 3).reshape(g.shape[0], -1, c)
  features = (np.asarray(jax.nn.gelu(z)) * nfnet.GELU_GAMMA).mean(axis=1)
  return features, features @ fc['kernel'] + fc['bias']


# key -> (output layer, head(g, output layer params), layer whose bias feeds the gate, the bias
# that makes the gate take both signs, the bias that silences it)
GATES = {
    'vgg16': ('head', lambda g, fc: _relu_head(g, fc, pool=False), 'fc1', 0.0, -1e4),
    'resnet18': ('head', lambda g, fc: _relu_head(g, fc, pool=True), 'layer4_1_bn2', 0.0, -1e4),
    'resnet101': ('head', lambda g, fc: _relu_head(g, fc, pool=True), 'layer4_2_bn3', 0.0, -1e4),
    'mobilenetv3_large': ('head', _hard_swish_head, 'fc1', -3.0, -1e3),
    'mobilenetv3_small': ('head', _hard_swish_head, 'fc1', -3.0, -1e3),
    'nfnet_f5': ('head', _gelu_head, 'final_conv', -3.0, -100.0),
}


@pytest.mark.parametrize('key', list(GATES))
def test_gate_determines_the_logits(key):
  """The logits are the output layer applied to a fixed function of the sown gate g (ReLU,
  hard-swish(g - 3), scaled GELU(g - 3), pooled); and a gate <= 0 everywhere gives the bias."""
  shape = (2, 32, 32, 3)
  fc_name, head, gate_layer, live_bias, very_negative = GATES[key]
  _, eval_fn = compiled(key)
  variables = fake_variables(key, shape, seed=1)
  bias = variables['params'][gate_layer]['bias']
  variables['params'][gate_layer]['bias'] = bias * 10 + live_bias
  x = images(shape, seed=1)
  fc = jax.tree.map(np.asarray, variables['params'][fc_name])
  assert np.all(np.abs(fc['bias']) > 0)

  logits, state = eval_fn(variables, x, jax.random.key(0))
  g = np.asarray(state['intermediates']['penultimate'][0])
  assert np.any(g > 0) and np.any(g < 0)  # a live gate: some units on, some off
  features, expected = head(g, fc)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * scale)
  assert np.any(np.abs(features) > 1e-3)
  assert np.all(np.abs(np.asarray(logits) - fc['bias']) > 1e-4 * scale)

  # Silence the gate with a very negative bias just before it: the logits become the output bias.
  silenced = jax.tree.map(lambda a: a, variables)
  silenced['params'][gate_layer]['bias'] = jnp.full_like(bias, very_negative)
  logits, state = eval_fn(silenced, x, jax.random.key(0))
  g = np.asarray(state['intermediates']['penultimate'][0])
  assert np.all(g <= 0)
  if key == 'nfnet_f5':  # GELU: features within ~0.0062 of zero, not exactly zero
    features, _ = head(g, fc)
    assert np.abs(features).max() < 0.0063
    np.testing.assert_allclose(logits, np.broadcast_to(fc['bias'], logits.shape),
                               atol=0.0063 * np.abs(fc['kernel']).sum(0).max())
  else:
    np.testing.assert_array_equal(logits, np.broadcast_to(fc['bias'], logits.shape))


def test_nfnet_variant_depths():
  assert nfnet.variant_depths('F0') == (1, 2, 6, 3)
  assert nfnet.variant_depths('F7') == (8, 16, 48, 24)
  with pytest.raises(ValueError, match='variant'):
    nfnet.variant_depths('F8')


def test_pooling_by_reshape_is_xlas_max_pool():
  """The CPU forms' 2x2 max pooling: the values of nn.max_pool, and its gradient to the first maximum of
  each window, ties and all-zero windows (after a ReLU) included."""
  from securenet_jax.models import lenet  # pylint: disable=g-import-not-at-top
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 8, 6, 4)))
  x = x.at[0, 0, 0, 0].set(5.0).at[0, 0, 1, 0].set(5.0).at[0, 1, 0, 0].set(5.0)  # a three-way tie
  g = jax.random.normal(jax.random.key(1), (3, 4, 3, 4))
  reference = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
  (y, back), (y_ref, back_ref) = (jax.vjp(f, x) for f in (lenet._pool_by_reshape, reference))
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(back(g)[0], back_ref(g)[0])
  assert back(g)[0][0, 0, 0, 0] == g[0, 0, 0, 0] and back(g)[0][0, 0, 1, 0] == 0  # the first of the tie
