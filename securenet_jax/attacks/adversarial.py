"""L-inf evasion attacks: PGD (Madry et al., 2018), FGSM (Goodfellow et al., 2015) and transfer attacks.

The attacker perturbs images in the *clean* domain, ``|x_adv - x|_inf <= eps`` and ``x_adv`` in
[0, 1], to maximize the cross-entropy of ``module.apply(variables, transform(x_adv))`` w.r.t. the true
labels. ``transform`` is what the attacker believes sits in front of the model and is differentiated
through:

* ``None``: the thief attacks the stolen weights without any key.
* stamping a forged key: the thief's guess of the key.
* stamping the true key: the adaptive attacker who holds a license.

The defender then evaluates ``eval_transform(x_adv)`` (for the licensed pipeline: the true key stamped
at inference) with :func:`robust_accuracy`.

A licensed model without its key has gradients ~0 everywhere (its penultimate ReLUs are silenced), so
PGD through no key degenerates to its random start: that is the expected outcome, not a bug.

Everything is jitted: the whole PGD loop of one chunk is a single ``lax.fori_loop``, compiled once
per (model, transform, chunk shape, steps); ``eps`` and ``step_size`` are traced, so sweeping them
does not recompile. The random start of example ``i`` depends only on ``(rng, restart, i)``, not on
the chunking.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from securenet_jax.attacks import common

Transform = common.Transform


def _as_rng(rng) -> jax.Array:
  if isinstance(rng, (int, np.integer)):
    return jax.random.key(int(rng))
  return rng


@functools.partial(jax.jit, static_argnames=('f', 'steps', 'random_start'))
def _pgd_chunk(f, variables, x0, y, index, rng, eps, step_size, *, steps: int, random_start: bool):
  """PGD on one chunk; returns (x_adv, per-example loss, misclassified) under ``f``."""

  def per_example_loss(x):
    return optax.softmax_cross_entropy_with_integer_labels(f(variables, x), y)

  grad_fn = jax.grad(lambda x: jnp.sum(per_example_loss(x)))
  lo = jnp.clip(x0 - eps, 0.0, 1.0)
  hi = jnp.clip(x0 + eps, 0.0, 1.0)
  if random_start:
    def noise(i):
      return jax.random.uniform(jax.random.fold_in(rng, i), x0.shape[1:], jnp.float32, -1.0, 1.0)
    x = jnp.clip(x0 + eps * jax.vmap(noise)(index), lo, hi)
  else:
    x = x0

  def body(_, x):
    g = grad_fn(x)
    return jnp.clip(x + step_size * jnp.sign(g), lo, hi)

  x = jax.lax.fori_loop(0, steps, body, x)
  logits = f(variables, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return x, loss, jnp.argmax(logits, -1) != y


def pgd(module: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *, eps: float,
        steps: int, step_size: float, restarts: int = 1, rng, transform: Transform = None,
        random_start: bool = True, batch_size: int = 500) -> np.ndarray:
  """Untargeted L-inf PGD with random restarts.

  Args:
    module, variables: the attacked model (evaluation mode).
    images: float (N, H, W, C) clean images in [0, 1].
    labels: (N,) int true labels.
    eps: L-inf radius (in [0, 1] pixel units).
    steps: gradient-sign steps per restart.
    step_size: size of each step.
    restarts: independent random starts; per example the attacker keeps the restart that makes
      ``module(transform(x_adv))`` misclassify, else the one with the highest loss. Restart 0 is the
      same run as ``restarts=1``, so more restarts are never weaker.
    rng: a ``jax.random`` key (or an int seed); the attack is deterministic given it.
    transform: applied to the perturbed images before the model, differentiated through.
    random_start: start from a uniform point of the eps-ball (else from the clean image).
    batch_size: examples per jitted chunk; the last chunk is zero-padded to the same shape.

  Returns:
    Adversarial images, float32 (N, H, W, C) in [0, 1], within ``eps`` of ``images``.
  """
  if restarts < 1:
    raise ValueError(f'restarts must be >= 1, got {restarts}.')
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}.')
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}.')
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  n = len(images)
  if n == 0:
    return images.copy()
  rng = _as_rng(rng)
  f = common.cached_logits_fn(module, transform)
  variables = jax.tree.map(jnp.asarray, dict(variables))
  chunk = min(batch_size, n)
  eps_a = jnp.float32(eps)
  step_a = jnp.float32(step_size)
  out = np.empty_like(images)
  for start in range(0, n, chunk):
    x = images[start:start + chunk]
    y = labels[start:start + chunk]
    m = len(x)
    index = np.arange(start, start + chunk, dtype=np.int32)
    if m < chunk:
      x = np.concatenate([x, np.zeros((chunk - m, *x.shape[1:]), np.float32)])
      y = np.concatenate([y, np.zeros((chunk - m,), np.int32)])
    best_x = best_loss = best_wrong = None
    for r in range(restarts):
      adv, loss, wrong = _pgd_chunk(f, variables, x, y, index, jax.random.fold_in(rng, r), eps_a,
                                    step_a, steps=int(steps), random_start=bool(random_start))
      adv, loss, wrong = np.asarray(adv), np.asarray(loss), np.asarray(wrong)
      if best_x is None:
        best_x, best_loss, best_wrong = adv, loss, wrong
        continue
      better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
      best_x = np.where(better[:, None, None, None], adv, best_x)
      best_loss = np.where(better, loss, best_loss)
      best_wrong = best_wrong | wrong
    out[start:start + m] = best_x[:m]
  return out


def fgsm(module: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *, eps: float,
         transform: Transform = None, batch_size: int = 500) -> np.ndarray:
  """Fast gradient sign method: one step of size ``eps`` from the clean image."""
  return pgd(module, variables, images, labels, eps=eps, steps=1, step_size=eps, restarts=1,
             rng=jax.random.key(0), transform=transform, random_start=False, batch_size=batch_size)


def robust_accuracy(module: nn.Module, variables: Any, adv_images: np.ndarray, labels: np.ndarray,
                    eval_transform: Transform = None, batch_size: int = 1000) -> float:
  """Accuracy on ``eval_transform(adv_images)``: what the defender's pipeline does at inference
  (for a licensed model: stamp the true key)."""
  return common.accuracy(module, variables, adv_images, labels, eval_transform, batch_size)


def transfer_attack(surrogate_module: nn.Module, surrogate_variables: Any, images: np.ndarray,
                    labels: np.ndarray, *, eps: float, steps: int, step_size: float, restarts: int = 1,
                    rng, transform: Transform = None, random_start: bool = True,
                    batch_size: int = 500) -> np.ndarray:
  """Black-box transfer: PGD crafted on a surrogate (e.g. a model the thief trained on its own data
  with :func:`common.fit`); evaluate the returned images on the target with :func:`robust_accuracy`."""
  return pgd(surrogate_module, surrogate_variables, images, labels, eps=eps, steps=steps,
             step_size=step_size, restarts=restarts, rng=rng, transform=transform,
             random_start=random_start, batch_size=batch_size)
