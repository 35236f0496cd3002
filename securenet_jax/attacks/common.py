"""What every attack needs: batched prediction, a small supervised training loop (the thief's
fine-tuning, a model trained from scratch on the thief's data, a surrogate for transfer attacks) and
the thief's labeled data (a class-stratified share of the training set)."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from securenet_jax import metrics
from securenet_jax import predict as predict_lib

Transform = Callable[[jax.Array], jax.Array] | None


def identity(x: jax.Array) -> jax.Array:
  return x


def logits_fn(module: nn.Module, transform: Transform = None) -> Callable[[Any, jax.Array], jax.Array]:
  """``f(variables, images) -> logits`` in evaluation mode, ``transform`` applied to the images first."""
  transform = transform or identity

  def f(variables, images):
    return module.apply(variables, transform(images), train=False).astype(jnp.float32)

  return f


@functools.lru_cache(maxsize=64)
def cached_logits_fn(module, transform):
  # One function object per (module, transform), so jit's cache is reused across calls.
  return logits_fn(module, transform)


@functools.lru_cache(maxsize=64)
def _predict_fn(module, transform):
  f = cached_logits_fn(module, transform)
  return jax.jit(lambda images, variables: jnp.argmax(f(variables, images), -1))


def predict(module: nn.Module, variables: Any, images: np.ndarray, transform: Transform = None,
            batch_size: int = 1000) -> np.ndarray:
  """Predicted labels of float images (N, H, W, C) in [0, 1] (``predict.batched`` chunks)."""
  return predict_lib.batched(_predict_fn(module, transform), np.asarray(images, np.float32), variables,
                             batch_size=batch_size)


def accuracy(module: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
             transform: Transform = None, batch_size: int = 1000) -> float:
  return metrics.accuracy(predict(module, variables, images, transform, batch_size), labels)


@functools.lru_cache(maxsize=64)
def _epoch_fn(module: nn.Module, optimizer: str, weight_decay: float, trainable: frozenset | None,
              transform: Transform, batch_size: int, steps: int):
  """One jitted epoch of :func:`fit` (a ``lax.scan`` over its steps), cached for every fit of the same
  model, optimizer, frozen layers and shapes: the learning rate and the data are arguments."""
  if optimizer == 'adamw':
    direction = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))
  elif optimizer == 'sgd':
    direction = optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=0.9))
  else:
    raise ValueError(f'optimizer must be "adamw" or "sgd", got {optimizer!r}.')
  transform = transform or identity

  def loss_fn(params, stats, x, y, mask, rng):
    v = {'params': params, **({'batch_stats': stats} if stats else {})}
    logits, new = module.apply(v, transform(x), train=True, rngs={'dropout': rng},
                               mutable=['batch_stats', 'intermediates'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1.0), new.get('batch_stats', stats)

  def epoch(carry, images, labels, perm, mask, learning_rates, rng):
    def body(carry, t):
      params, stats, opt_state = carry
      rows = jax.lax.dynamic_slice_in_dim(perm, t * batch_size, batch_size)
      m = jax.lax.dynamic_slice_in_dim(mask, t * batch_size, batch_size)
      grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats, images[rows], labels[rows], m,
                                                     jax.random.fold_in(rng, t))
      if trainable is not None:  # frozen layers: no gradient, no optimizer state that moves them
        grads = {k: (g if k in trainable else jax.tree.map(jnp.zeros_like, g)) for k, g in grads.items()}
      updates, opt_state = direction.update(grads, opt_state, params)
      lr = learning_rates[t]
      params = {k: (jax.tree.map(lambda p, u: p - lr * u, params[k], updates[k])
                    if trainable is None or k in trainable else params[k]) for k in params}
      return (params, stats, opt_state), None
    carry, _ = jax.lax.scan(body, carry, jnp.arange(steps))
    return carry

  return direction, jax.jit(epoch, donate_argnums=(0,))


def fit(module: nn.Module, variables: Any | None, images: np.ndarray, labels: np.ndarray, *,
        epochs: int, batch_size: int = 128, learning_rate: float = 1e-3, weight_decay: float = 1e-4,
        optimizer: str = 'adamw', seed: int = 0, transform: Transform = None,
        trainable: Collection[str] | None = None) -> dict:
  """Supervised training (cosine-decayed learning rate), cross-entropy on ``transform(images)``.

  BatchNorm layers run in training mode (batch statistics, running averages updated), as any
  fine-tuning does. The data stays on the device and each epoch is one compiled loop.

  Args:
    module: the architecture.
    variables: start from these (fine-tuning the stolen weights) or ``None`` (fresh initialization
      with ``seed``: training from scratch).
    images, labels: the training data (float NHWC in [0, 1], int labels). A last partial batch is
      kept (small data sets matter here), so every example is used each epoch.
    epochs, batch_size, learning_rate, weight_decay: the recipe.
    optimizer: 'adamw' (decoupled weight decay) or 'sgd' (momentum 0.9, L2 weight decay).
    seed: initialization (when ``variables`` is None), data order and dropout.
    transform: applied to each batch before the model (e.g. stamp a trigger or a key).
    trainable: names of the top-level parameter groups to train (e.g. ``{'fc1', 'fc2', 'fc3'}``);
      the others stay frozen. None trains everything.

  Returns:
    The trained variables ``{'params', 'batch_stats'?}`` (host numpy arrays).
  """
  images = jnp.asarray(np.asarray(images, np.float32))
  labels = jnp.asarray(np.asarray(labels, np.int32))
  n = len(images)
  if n == 0:
    raise ValueError('fit needs at least one training example.')
  rng = jax.random.key(seed)
  if variables is None:
    variables = module.init(jax.random.fold_in(rng, 0), jnp.zeros((1, *images.shape[1:])), train=False)
  variables = jax.tree.map(jnp.array, dict(variables))  # copies: the epoch donates its buffers
  batch_size = min(batch_size, n)
  steps = -(-n // batch_size)
  total = max(1, epochs * steps)
  direction, epoch = _epoch_fn(module, optimizer, float(weight_decay),
                               None if trainable is None else frozenset(trainable), transform,
                               batch_size, steps)
  params, stats = variables['params'], variables.get('batch_stats', {})
  carry = (params, stats, direction.init(params))
  # The last batch of an epoch is padded to a fixed shape (one compiled loop) and masked out.
  mask = jnp.asarray((np.arange(steps * batch_size) < n).astype(np.float32))
  schedule = learning_rate * 0.5 * (1 + np.cos(np.pi * np.arange(total) / total))  # cosine decay to 0
  order_rng = np.random.default_rng(seed)
  for e in range(epochs):
    perm = np.resize(order_rng.permutation(n), steps * batch_size)
    carry = epoch(carry, images, labels, jnp.asarray(perm, jnp.int32), mask,
                  jnp.asarray(schedule[e * steps:(e + 1) * steps], jnp.float32),
                  jax.random.fold_in(rng, 1 + e))
  params, stats, _ = carry
  out = {'params': params, **({'batch_stats': stats} if stats else {})}
  return jax.tree.map(np.asarray, out)


# --- the thief's labeled data ------------------------------------------------------------------

def fraction_key(fraction: float) -> str:
  """How a fraction is written in result keys: ``0.01``, ``0.05``, ``0.10``, ``0.5`` -> ``0.50``;
  fractions that two decimals would round (``0.005``) keep their digits."""
  fraction = float(fraction)
  two = f'{fraction:.2f}'
  return two if math.isclose(float(two), fraction, abs_tol=1e-12) else f'{fraction:g}'


def subset_index(labels, fraction: float, seed: int) -> np.ndarray:
  """Indices (sorted) of a class-stratified random subset of ``round(fraction * N)`` examples.

  Each class gets its share ``fraction * n_c`` rounded by largest remainder, and at least one example
  when the subset has room for every class present (``round(fraction * N) >= #classes``); the subset
  never has fewer than one example. Deterministic given ``seed``.
  """
  labels = np.asarray(labels).reshape(-1)
  n = len(labels)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction must be in (0, 1], got {fraction}.')
  if n == 0:
    raise ValueError('Cannot take a subset of an empty dataset.')
  classes, counts = np.unique(labels, return_counts=True)
  total = min(n, max(1, int(round(fraction * n))))
  ideal = counts * (total / n)
  quota = np.floor(ideal).astype(np.int64)
  if total >= len(classes):
    quota = np.maximum(quota, 1)
  # Largest remainder up to the total; then, if the minimum of one per class overshot it, take back
  # from the classes with the most examples in the subset (ties: the larger class keeps more).
  remainder = ideal - quota
  order = np.lexsort((-counts, -remainder))
  while quota.sum() < total:
    for c in order:
      if quota.sum() >= total:
        break
      if quota[c] < counts[c]:
        quota[c] += 1
  while quota.sum() > total:
    c = int(np.lexsort((counts, quota))[-1])
    quota[c] -= 1
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B5E7]))
  picked = []
  for c, q in zip(classes, quota):
    if q:
      members = np.flatnonzero(labels == c)
      picked.append(rng.choice(members, size=int(q), replace=False))
  return np.sort(np.concatenate(picked)) if picked else np.zeros((0,), np.int64)


def subset(images, labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A class-stratified random subset ``(images, labels)`` of the training data; see
  :func:`subset_index`. The arrays keep their dtypes."""
  idx = subset_index(labels, fraction, seed)
  return np.asarray(images)[idx], np.asarray(labels)[idx]


def epochs_for(num_examples: int, batch_size: int, epochs: int, min_steps: int) -> int:
  """``epochs``, raised so that training takes at least ``min_steps`` optimizer steps: 1% of a
  dataset is a handful of batches, and a few epochs of it would be a handful of steps."""
  steps_per_epoch = -(-num_examples // max(1, min(batch_size, num_examples)))
  return max(int(epochs), -(-int(min_steps) // steps_per_epoch))
