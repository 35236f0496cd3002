"""Tests of securenet_jax.attacks.adversarial: PGD, FGSM, transfer attacks."""

import functools

import jax
import numpy as np
from securenet_jax.attacks import adversarial
from securenet_jax.attacks import common
from tests.attacks.conftest import TOY_GEOMETRY, TinyMLP, _toy_images

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
