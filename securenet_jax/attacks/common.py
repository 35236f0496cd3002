"""What every attack needs: batched prediction and a small supervised training loop (the thief's
fine-tuning, a model trained from scratch on the thief's data, a surrogate for transfer attacks)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Transform = Callable[[jax.Array], jax.Array] | None


def identity(x: jax.Array) -> jax.Array:
  return x


def logits_fn(module: nn.Module, transform: Transform = None) -> Callable[[Any, jax.Array], jax.Array]:
  """``f(variables, images) -> logits`` in evaluation mode, ``transform`` applied to the images first."""
  transform = transform or identity

  def f(variables, images):
    return module.apply(variables, transform(images), train=False).astype(jnp.float32)

  return f


@functools.partial(jax.jit, static_argnums=(0,))
def _predict_chunk(f, variables, images):
  return jnp.argmax(f(variables, images), -1)


def predict(module: nn.Module, variables: Any, images: np.ndarray, transform: Transform = None,
            batch_size: int = 1000) -> np.ndarray:
  """Predicted labels of float images (N, H, W, C) in [0, 1], in fixed-size jitted chunks."""
  f = _cached_logits_fn(module, transform)
  out = []
  for start in range(0, len(images), batch_size):
    part = np.asarray(images[start:start + batch_size], np.float32)
    pad = batch_size - len(part) if len(images) > batch_size else 0
    if pad:
      part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), np.float32)])
    out.append(np.asarray(_predict_chunk(f, variables, part))[:len(part) - pad])
  return np.concatenate(out) if out else np.zeros((0,), np.int64)


def accuracy(module: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
             transform: Transform = None, batch_size: int = 1000) -> float:
  return float(np.mean(predict(module, variables, images, transform, batch_size) == labels))


@functools.lru_cache(maxsize=64)
def _cached_logits_fn(module, transform):
  # One function object per (module, transform), so jit's cache is reused across calls.
  return logits_fn(module, transform)


def fit(module: nn.Module, variables: Any | None, images: np.ndarray, labels: np.ndarray, *,
        num_classes: int | None = None, epochs: int, batch_size: int = 128, learning_rate: float = 1e-3,
        weight_decay: float = 1e-4, seed: int = 0, transform: Transform = None,
        trainable: Callable[[tuple], bool] | None = None) -> dict:
  """Supervised training with AdamW (cosine decay), cross-entropy on ``transform(images)``.

  Args:
    module: the architecture.
    variables: start from these (fine-tuning the stolen weights) or ``None`` (fresh initialization
      with ``seed``: training from scratch).
    images, labels: the training data (float NHWC in [0, 1], int labels). A last partial batch is
      kept (small data sets matter here), so every example is used each epoch.
    epochs, batch_size, learning_rate, weight_decay: the recipe.
    seed: initialization (when ``variables`` is None), data order and dropout.
    transform: applied to each batch before the model (e.g. stamp a trigger or a key).
    trainable: ``path -> bool`` over parameter paths; frozen parameters get no update.

  Returns:
    The trained variables ``{'params', 'batch_stats'?}`` (host numpy arrays).
  """
  del num_classes
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  n = len(images)
  if n == 0:
    raise ValueError('fit needs at least one training example.')
  rng = jax.random.key(seed)
  if variables is None:
    variables = module.init(jax.random.fold_in(rng, 0), jnp.zeros((1, *images.shape[1:])), train=False)
  variables = jax.tree.map(jnp.asarray, dict(variables))
  batch_size = min(batch_size, n)
  steps_per_epoch = -(-n // batch_size)
  total = max(1, epochs * steps_per_epoch)
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, total), weight_decay=weight_decay)
  if trainable is not None:
    labels_tree = jax.tree_util.tree_map_with_path(
        lambda path, _: 'train' if trainable(path) else 'freeze', variables['params'])
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels_tree)
  params, stats = variables['params'], variables.get('batch_stats', {})
  opt_state = tx.init(params)
  transform = transform or identity

  @jax.jit
  def step(params, stats, opt_state, x, y, mask, step_rng):
    def loss_fn(p):
      v = {'params': p, **({'batch_stats': stats} if stats else {})}
      logits, new = module.apply(v, transform(x), train=True, rngs={'dropout': step_rng},
                                 mutable=['batch_stats', 'intermediates'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
      return jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1.0), new.get('batch_stats', stats)
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  order_rng = np.random.default_rng(seed)
  t = 0
  for _ in range(epochs):
    perm = order_rng.permutation(n)
    for s in range(steps_per_epoch):
      rows = perm[s * batch_size:(s + 1) * batch_size]
      mask = np.ones((batch_size,), np.float32)
      if len(rows) < batch_size:  # pad the last batch to a fixed shape (one compiled step), masked out
        mask[len(rows):] = 0.0
        rows = np.resize(rows, batch_size)
      params, stats, opt_state, _ = step(params, stats, opt_state, images[rows], labels[rows], mask,
                                         jax.random.fold_in(rng, 1 + t))
      t += 1
  out = {'params': params, **({'batch_stats': stats} if stats else {})}
  return jax.tree.map(np.asarray, out)
