"""Key recovery by trigger inversion, in the style of Neural Cleanse (Wang et al., 2019).

The thief holds the stolen weights and a small labeled set. It searches for a trigger that makes the
model useful, parametrized as

    mask = sigmoid(m)      (H, W, 1)   (times a square region indicator when ``region`` is given)
    pattern = sigmoid(p)   (H, W, C)
    stamped = x * (1 - mask) + pattern * mask

and minimizes ``cross_entropy(model(stamped), labels) + l1_weight * mean(mask)`` with Adam on
minibatches. Unlike Neural Cleanse, which searches a trigger per target class, the objective uses the
true labels: the thief wants its own accuracy back, not a backdoor. A recovered trigger is an affine
per-pixel map like a license key, so :func:`as_key_arrays` turns it into :class:`keys.KeyArrays`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from securenet_jax import keys as keys_lib
from securenet_jax.attacks import common

INITS = ('random', 'constant')


def region_mask(image_shape, region: tuple[int, int, int] | None) -> np.ndarray:
  """(H, W, 1) float32 indicator of the square ``region = (row, col, size)``; all ones for None."""
  h, w = int(image_shape[0]), int(image_shape[1])
  if region is None:
    return np.ones((h, w, 1), np.float32)
  row, col, size = (int(v) for v in region)
  if size < 1 or row < 0 or col < 0 or row + size > h or col + size > w:
    raise ValueError(f'region {region!r} (row, col, size) does not fit in a {h}x{w} image.')
  out = np.zeros((h, w, 1), np.float32)
  out[row:row + size, col:col + size] = 1.0
  return out


def _trigger(m, p, allowed):
  return jax.nn.sigmoid(m) * allowed, jax.nn.sigmoid(p)


def _stamp(x, mask, pattern):
  return x * (1.0 - mask) + pattern * mask


@functools.partial(jax.jit, static_argnames=('f', 'batch_size'))
def _invert(f, variables, images, labels, allowed, m, p, rng, steps, learning_rate, l1_weight, *,
            batch_size: int):
  """The whole optimization as one ``fori_loop``; each iteration is one Adam step on a minibatch."""
  tx = optax.adam(learning_rate)
  params = (m, p)
  n = images.shape[0]

  def loss_fn(params, x, y):
    mask, pattern = _trigger(*params, allowed)
    logits = f(variables, _stamp(x, mask, pattern))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + l1_weight * jnp.mean(mask)

  def body(t, carry):
    params, opt_state = carry
    rows = jax.random.choice(jax.random.fold_in(rng, t), n, (batch_size,), replace=False)
    grads = jax.grad(loss_fn)(params, images[rows], labels[rows])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
  return _trigger(*params, allowed)


def invert_trigger(module: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
                   steps: int, learning_rate: float, l1_weight: float, rng, batch_size: int = 128,
                   init: str = 'random',
                   region: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Optimizes a (mask, pattern) trigger that makes the model classify ``images`` as ``labels``.

  Args:
    module, variables: the stolen model (evaluation mode).
    images, labels: the thief's labeled data, float (N, H, W, C) in [0, 1] and (N,) ints.
    steps: Adam steps.
    learning_rate: Adam's learning rate (on the logits ``m`` and ``p``).
    l1_weight: weight of ``mean(mask)``: larger favours smaller triggers.
    rng: a ``jax.random`` key (or int seed): initialization and minibatches.
    batch_size: examples per step (drawn without replacement, capped at N).
    init: 'random' (logits ~ N(0, 1)) or 'constant' (logits 0: mask and pattern 0.5 everywhere).
    region: (row, col, size) to search only that square (the mask is zero outside), or None.

  Returns:
    (mask (H, W, 1), pattern (H, W, C)) float32 numpy arrays in [0, 1].
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f'Expected a non-empty NHWC image batch, got shape {images.shape}.')
  if init not in INITS:
    raise ValueError(f'Unknown init {init!r}; expected one of {INITS}.')
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}.')
  h, w, c = images.shape[1:]
  allowed = region_mask((h, w), region)
  rng = jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
  init_rng, run_rng = jax.random.split(rng)
  if init == 'random':
    km, kp = jax.random.split(init_rng)
    m = jax.random.normal(km, (h, w, 1), jnp.float32)
    p = jax.random.normal(kp, (h, w, c), jnp.float32)
  else:
    m = jnp.zeros((h, w, 1), jnp.float32)
    p = jnp.zeros((h, w, c), jnp.float32)
  f = common.cached_logits_fn(module, None)
  variables = jax.tree.map(jnp.asarray, dict(variables))
  mask, pattern = _invert(f, variables, jnp.asarray(images), jnp.asarray(labels), jnp.asarray(allowed),
                          m, p, run_rng, jnp.int32(steps), jnp.float32(learning_rate),
                          jnp.float32(l1_weight), batch_size=int(min(batch_size, len(images))))
  return np.asarray(mask, np.float32), np.asarray(pattern, np.float32)


def as_key_arrays(mask: np.ndarray, pattern: np.ndarray) -> keys_lib.KeyArrays:
  """The recovered trigger as key arrays: ``keep = 1 - mask``, ``add = pattern * mask``.

  Stamping them (:func:`keys.stamp_arrays`) gives exactly the trigger's stamped input.
  """
  mask = np.asarray(mask, np.float32)
  pattern = np.asarray(pattern, np.float32)
  return keys_lib.KeyArrays(keep=1.0 - mask, add=pattern * mask)


def recovered_accuracy(module: nn.Module, variables: Any, mask: np.ndarray, pattern: np.ndarray,
                       test_images: np.ndarray, test_labels: np.ndarray, batch_size: int = 1000) -> float:
  """Accuracy of the model on test images stamped with the recovered trigger.

  The stamping is done on the host, chunk by chunk, so every new trigger reuses the model's compiled
  prediction (a trigger baked into a ``transform`` would compile a new function per trigger).
  """
  keep, add = as_key_arrays(mask, pattern)
  test_labels = np.asarray(test_labels)
  n = len(test_labels)
  if n == 0:
    return float('nan')
  chunk = min(batch_size, n)
  correct = 0
  for start in range(0, n, chunk):
    part = np.asarray(test_images[start:start + chunk], np.float32)
    m = len(part)
    if m < chunk:  # one shape for every chunk: one compiled prediction
      part = np.concatenate([part, np.zeros((chunk - m, *part.shape[1:]), np.float32)])
    pred = common.predict(module, variables, np.clip(part * keep + add, 0.0, 1.0), None, chunk)
    correct += int(np.sum(pred[:m] == test_labels[start:start + m]))
  return correct / n
