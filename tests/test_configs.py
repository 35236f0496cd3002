"""Every experiment config's smoke variant runs end to end (train, evaluate, reload) on generated data
in its dataset's on-disk format, with its model at its dataset's input shape."""

import importlib
import os

import jax
import numpy as np
import pytest

from securenet_jax import inference
from securenet_jax import train
from tests import test_data

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
EXPERIMENTS = sorted(f[:-3] for f in os.listdir(CONFIGS)
                     if f.endswith('.py') and f.split('_')[0] in
                     ('mnist', 'fashion', 'cifar10', 'cifar100', 'celeba', 'facescrub'))


@pytest.fixture(scope='module')
def generated(tmp_path_factory, idx_dir):
  """One generated dataset per on-disk format: name -> data_dir."""
  root = tmp_path_factory.mktemp('formats')
  for name in ('cifar10', 'cifar100'):
    test_data.write_cifar(root / name, name, sizes=(8, 8, 8, 8, 8, 16))
  test_data.make_celeba(root / 'celeba')
  test_data.make_facescrub(root / 'facescrub')
  return {'mnist': idx_dir, 'fashion_mnist': idx_dir, 'cifar10': str(root / 'cifar10'),
          'cifar100': str(root / 'cifar100'), 'celeba': str(root / 'celeba'),
          'facescrub': str(root / 'facescrub')}


def test_every_model_and_dataset_has_an_experiment():
  configs = [importlib.import_module(f'configs.{name}').get_config() for name in EXPERIMENTS]
  from securenet_jax import models  # pylint: disable=g-import-not-at-top
  assert set(models.names()) <= {c.model.name for c in configs}
  assert {c.dataset.name for c in configs} >= {'mnist', 'cifar10', 'cifar100', 'celeba', 'facescrub'}
  for c in configs:  # the real recipes are real: full data, many epochs
    assert c.train.num_epochs >= 8 and c.dataset.train_limit == 0, c


def test_noise_augmentation_only_where_measured():
  """The default's noise augmentation was measured on Fashion-MNIST + LeNet-5: the default and its
  MNIST twin keep it, the literature recipes of the other configs start without it."""
  from configs import default  # pylint: disable=g-import-not-at-top
  assert default.get_config().augment.noise_std == 0.1
  for name in EXPERIMENTS:
    expected = 0.1 if name == 'mnist_lenet5' else 0.0
    assert importlib.import_module(f'configs.{name}').get_config().augment.noise_std == expected, name


# LeNet-5 on IDX files end to end in the default suite; the other configs (ResNet-18/101, NFNet-F5,
# MobileNetV3, VGG-16 on CIFAR, FaceScrub, CelebA: a minute or more each) with --zoo. Their models
# train on small inputs in test_models.py, their loaders are tested in test_data.py.
IN_DEFAULT_SUITE = ('mnist_lenet5',)


@pytest.mark.slow
@pytest.mark.parametrize('name', [n if n in IN_DEFAULT_SUITE else pytest.param(n, marks=pytest.mark.zoo)
                                  for n in EXPERIMENTS])
def test_smoke_variant_end_to_end(name, generated, tmp_path):
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.dataset.data_dir = generated[config.dataset.name]
  if config.dataset.name in ('mnist', 'fashion_mnist'):
    config.dataset.source = 'idx'
  if config.dataset.name.startswith('cifar'):
    config.dataset.source = 'cifar_python'
  if config.dataset.name == 'celeba' and config.dataset.celeba_task == 'identity':
    config.dataset.num_identities = 4
  config.dataset.cache = False
  config.key.secret = f'smoke-{name}'
  workdir = str(tmp_path / name)
  metrics = train.train_and_evaluate(config, workdir)
  for k in ('authorized_acc', 'no_key_acc', 'forged_acc_max', 'leak_probe_acc'):
    assert 0.0 <= metrics[k] <= 1.0, (k, metrics[k])
  model = inference.load(workdir)
  assert model.config.model.name == config.model.name
  images = np.zeros((3, *model.image_shape), np.uint8)
  logits = model.logits(images, key='default')
  assert logits.shape == (3, model.num_classes) and np.all(np.isfinite(logits))
  means = [x for path, x in jax.tree_util.tree_leaves_with_path(model.variables.get('batch_stats', {}))
           if 'mean' in jax.tree_util.keystr(path)]
  if means:  # BatchNorm models: the running means left their zero initialization and were saved
    assert any(np.any(np.asarray(x) != 0) for x in means)


def test_flip_variant_of_the_cnn_configs():
  """fashion_mnist_cnn.py:MODEL,flip turns on the default job's whole-image defenses for the zoo's
  networks; without it the zoo keeps the patch-key recipe its figures were measured with."""
  from configs import fashion_mnist_cnn  # pylint: disable=g-import-not-at-top
  plain = fashion_mnist_cnn.get_config('resnet10_w16')
  assert plain.key.flip_block == 0 and plain.objective.clean_distill_weight == 0.0
  assert plain.objective.positive_patch_fraction == 0.0 and plain.objective.silence_margin == 1.0
  flip = fashion_mnist_cnn.get_config('resnet10_w16,flip')
  assert flip.model.kwargs.depth == 10 and flip.key.flip_block == 4
  assert flip.objective.clean_distill_weight == 1.0 and tuple(flip.objective.silence_layers) == ()
  assert flip.objective.positive_patch_fraction == 0.5 and flip.objective.silence_margin == 2.0
  smoke = fashion_mnist_cnn.get_config('flip,smoke')  # no baseline in a smoke run, so no teacher
  assert smoke.key.flip_block == 4 and not smoke.eval.clean_baseline
  assert smoke.objective.clean_distill_weight == 0.0
  with pytest.raises(ValueError, match=r"Unknown variant \['flipp'\]"):
    fashion_mnist_cnn.get_config('resnet18,flipp')


def test_batch_norm_variant_of_the_default():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('bn,smoke')
  assert config.model.kwargs.batch_norm and config.smoke
  assert tuple(config.objective.silence_layers) == ('fc1_bn',)  # fc1's pre-activation, after its norm
  assert config.objective.thief_batch_stats_weight == 1.0  # the thief's own batch statistics
  plain = default.get_config()
  assert not plain.model.kwargs.get('batch_norm', False) and plain.objective.thief_batch_stats_weight == 0
  with pytest.raises(ValueError, match=r"Unknown config variant \['bm'\]"):
    default.get_config('smoke,bm')
