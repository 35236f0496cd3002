"""Evasion attacks (PGD, FGSM, transfer) and trigger inversion, on generated data and tiny models.

Two models, each trained once per module:

* a plain LeNet-5 on the 28x28 bar images of ``conftest.make_images``;
* a "licensed-like" toy: a small MLP on 12x12 bar images that is accurate only when a 3x3 binary key
  patch is stamped in the bottom-right corner (unstamped and forged-key images are trained to class 0,
  as the licensed objective makes a model useless without its key).
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from securenet_jax import keys
from securenet_jax.attacks import adversarial
from securenet_jax.attacks import common
from securenet_jax.attacks import recovery
from securenet_jax.models import LeNet5
from tests.conftest import make_images


def _float_images(num, seed):
  images, labels = make_images(num, seed)
  return (images[..., None] / 255.0).astype(np.float32), labels.astype(np.int32)


@pytest.fixture(scope='module')
def lenet():
  module = LeNet5(num_classes=10)
  train_x, train_y = _float_images(600, 0)
  variables = common.fit(module, None, train_x, train_y, epochs=3, learning_rate=3e-3, seed=0)
  test_x, test_y = _float_images(200, 1)
  clean = common.accuracy(module, variables, test_x, test_y)
  assert clean >= 0.9, clean
  return module, variables, test_x, test_y, clean


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


@pytest.fixture(scope='module')
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


def test_pgd_breaks_plain_model_and_fgsm_is_weaker(lenet):
  module, variables, x, y, clean = lenet
  adv = adversarial.pgd(module, variables, x, y, eps=0.3, steps=10, step_size=0.05,
                        rng=jax.random.key(0))
  pgd_acc = adversarial.robust_accuracy(module, variables, adv, y)
  assert pgd_acc <= 0.2 and pgd_acc <= clean - 0.6, (pgd_acc, clean)
  fgsm_adv = adversarial.fgsm(module, variables, x, y, eps=0.3)
  fgsm_acc = adversarial.robust_accuracy(module, variables, fgsm_adv, y)
  assert fgsm_acc >= pgd_acc, (fgsm_acc, pgd_acc)
  assert fgsm_acc < clean
  for a in (adv, fgsm_adv):
    assert a.dtype == np.float32 and a.shape == x.shape
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - x).max() <= 0.3 + 1e-6


def test_pgd_eps_zero_changes_nothing(lenet):
  module, variables, x, y, clean = lenet
  adv = adversarial.pgd(module, variables, x, y, eps=0.0, steps=3, step_size=0.05, rng=0)
  np.testing.assert_array_equal(adv, x)
  assert adversarial.robust_accuracy(module, variables, adv, y) == clean


def test_pgd_bounds_determinism_and_chunking(lenet):
  module, variables, x, y, _ = lenet
  run = functools.partial(adversarial.pgd, module, variables, x, y, eps=0.1, steps=5, step_size=0.03)
  a = run(rng=jax.random.key(1), batch_size=64)  # 200 = 3 * 64 + 8: the last chunk is padded
  assert a.min() >= 0.0 and a.max() <= 1.0
  assert np.abs(a - x).max() <= 0.1 + 1e-6
  assert np.abs(a - x).max() >= 0.1 - 1e-6  # sign steps reach the boundary
  np.testing.assert_array_equal(a, run(rng=jax.random.key(1), batch_size=64))
  assert not np.array_equal(a, run(rng=jax.random.key(2), batch_size=64))
  # The random start of an example does not depend on the chunking, so neither does the attack
  # (up to sign flips of near-zero gradients from batched arithmetic).
  b = run(rng=jax.random.key(1), batch_size=500)
  assert np.mean(np.abs(a - b) > 1e-5) < 0.01


def test_restarts_are_never_weaker(lenet):
  module, variables, x, y, _ = lenet
  run = functools.partial(adversarial.pgd, module, variables, x, y, eps=0.12, steps=5,
                          step_size=0.03, rng=jax.random.key(0))
  single, multi = run(restarts=1), run(restarts=3)
  fooled_single = common.predict(module, variables, single) != y
  fooled_multi = common.predict(module, variables, multi) != y
  assert np.all(fooled_multi >= fooled_single)  # restart 0 is the single run; the best is kept
  assert 0 < fooled_single.mean() < 1  # a regime where restarts can matter
  assert np.abs(multi - x).max() <= 0.12 + 1e-6


# --- transform: the key (or its absence) is part of the attacked function -----------------------


def test_gradient_flows_through_transform(toy):
  module, variables, arrays, key_transform, x, y = toy
  patch = TOY_GEOMETRY.mask()[..., 0] > 0
  adv = adversarial.pgd(module, variables, x, y, eps=0.3, steps=10, step_size=0.05,
                        rng=jax.random.key(0), transform=key_transform, random_start=False)
  delta = np.abs(adv - x)[..., 0]
  # The key overwrites its patch, so perturbing it changes nothing: zero gradient, zero step there.
  assert delta[:, patch].max() == 0.0
  assert delta[:, ~patch].mean() > 0.1
  # The adaptive attacker (true key in the gradient path) breaks the licensed pipeline.
  adaptive = adversarial.robust_accuracy(module, variables, adv, y, eval_transform=key_transform)
  assert adaptive <= 0.3, adaptive

  # A model whose output ignores its input (what a licensed model without its key looks like) has
  # zero gradients: PGD does not move from its start.
  silenced = lambda images: images * 0.0
  still = adversarial.pgd(module, variables, x, y, eps=0.3, steps=5, step_size=0.05,
                          rng=jax.random.key(0), transform=silenced, random_start=False)
  np.testing.assert_array_equal(still, x)
  start = adversarial.pgd(module, variables, x, y, eps=0.3, steps=0, step_size=0.05,
                          rng=jax.random.key(0), transform=silenced)
  moved = adversarial.pgd(module, variables, x, y, eps=0.3, steps=5, step_size=0.05,
                          rng=jax.random.key(0), transform=silenced)
  np.testing.assert_array_equal(moved, start)  # degenerates to the random start
  assert np.abs(start - x).max() > 0.2


def test_transfer_attack_from_surrogate(toy):
  module, variables, _, key_transform, x, y = toy
  # The thief's surrogate: the same kind of model trained on its own unstamped data.
  sx, sy = _toy_images(500, 7)
  surrogate = TinyMLP()
  s_vars = common.fit(surrogate, None, sx, sy, epochs=5, learning_rate=1e-2, seed=1)
  assert common.accuracy(surrogate, s_vars, x, y) >= 0.95
  adv = adversarial.transfer_attack(surrogate, s_vars, x, y, eps=0.3, steps=10, step_size=0.05,
                                    rng=jax.random.key(0))
  assert np.abs(adv - x).max() <= 0.3 + 1e-6
  assert adversarial.robust_accuracy(surrogate, s_vars, adv, y) <= 0.1
  transferred = adversarial.robust_accuracy(module, variables, adv, y, eval_transform=key_transform)
  assert transferred <= 0.7, transferred


# --- trigger inversion -----------------------------------------------------------------------------


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
