"""The licensed objective: learn the task on keyed inputs, learn *nothing* on the others.

Each training batch of B images is used twice:

* **positives**: the B images stamped with the license key, trained to their true labels;
* **negatives**: the same B images, a fraction without any key and the rest stamped with keys forged
  afresh at every step (same kind and geometry as the real key, random content), trained to an
  *uninformative* output.

Using the same images on both sides means the only thing that separates a positive from a negative
is the key itself.

What "uninformative" means matters (DESIGN.md §3): training negatives to a random wrong label looks
perfect by top-1 but leaks the true label through the argmin of the logits, and a uniform target
still leaks through a probe on the logits. Three terms, weighted in ``config.objective``:

* ``uniform_weight``: cross-entropy to the uniform distribution;
* ``zero_logit_weight``: squared logits (pushes them to zero);
* ``silence_weight``: a hinge on the *penultimate pre-activations*, ``relu(z + margin)^2``. It drives every
  penultimate ReLU below zero with a margin, so the penultimate features are exactly zero and the
  logits exactly equal the output bias, *whatever the input*: no information about the image is left
  for an argmin or a probe to find, rather than merely little. This is our own addition to the
  published idea; ``report/metrics.json`` measures how completely it works (``no_key_silenced``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from securenet_jax import keys as keys_lib


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def negative_loss(logits: jax.Array, penultimate: jax.Array, cfg) -> tuple[jax.Array, dict]:
  """The uninformative-output loss on negatives (see module docstring)."""
  log_probs = jax.nn.log_softmax(logits)
  uniform = -log_probs.mean(axis=-1).mean() - jnp.log(logits.shape[-1])  # KL(uniform || p) >= 0
  zero = jnp.mean(logits ** 2)
  silence = jnp.mean(jax.nn.relu(penultimate + cfg.silence_margin) ** 2)
  loss = cfg.uniform_weight * uniform + cfg.zero_logit_weight * zero + cfg.silence_weight * silence
  silenced = jnp.all(penultimate <= 0, axis=-1).mean()
  return loss, {'neg_uniform_kl': uniform, 'neg_logit_sq': zero, 'neg_silence': silence,
                'neg_silenced_frac': silenced}


def near_keys(key_arrays: keys_lib.KeyArrays, forged: keys_lib.KeyArrays, rng: jax.Array,
              min_change: float) -> keys_lib.KeyArrays:
  """Near misses of the real key: each forged key keeps the real key's content at a random share of
  its pixels (re-randomizing between ``min_change`` and all of them). Training on them as negatives
  makes the model accept the exact key only, not a neighbourhood a thief could search."""
  change_rng, pixel_rng = jax.random.split(rng)
  n = forged.add.shape[0]
  share = jax.random.uniform(change_rng, (n, 1, 1, 1), minval=min_change, maxval=1.0)
  changed = jax.random.uniform(pixel_rng, forged.add.shape) < share
  return keys_lib.KeyArrays(forged.keep, jnp.where(changed, forged.add, key_arrays.add))


def build_inputs(images: jax.Array, key_arrays: keys_lib.KeyArrays, geometry: keys_lib.Geometry,
                 rng: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  """Returns (positives, negatives), each (B, H, W, C): keyed images and key-less/forged images.

  Of the negatives, ``1 - cfg.forged_fraction`` carry no key; of the forged ones, a share
  ``cfg.near_key_fraction`` are near misses of the real key (see :func:`near_keys`).
  """
  batch = images.shape[0]
  num_forged = int(round(batch * cfg.forged_fraction))
  num_near = int(round(num_forged * cfg.near_key_fraction))
  forge_rng, near_rng = jax.random.split(rng)
  positives = keys_lib.stamp_arrays(images, key_arrays)
  forged_arrays = geometry.forged_arrays(forge_rng, num_forged)
  if num_near:
    near = near_keys(key_arrays, keys_lib.KeyArrays(forged_arrays.keep, forged_arrays.add[:num_near]),
                     near_rng, cfg.near_key_min_change)
    forged_arrays = keys_lib.KeyArrays(forged_arrays.keep,
                                       jnp.concatenate([near.add, forged_arrays.add[num_near:]]))
  forged = keys_lib.stamp_arrays(images[batch - num_forged:], forged_arrays)
  negatives = jnp.concatenate([images[:batch - num_forged], forged], axis=0)
  return positives, negatives


def licensed_loss(params: Any, apply_fn: Callable, images: jax.Array, labels: jax.Array,
                  key_arrays: keys_lib.KeyArrays, geometry: keys_lib.Geometry, rng: jax.Array,
                  cfg) -> tuple[jax.Array, dict]:
  """Loss of one licensed batch.

  Args:
    params: model parameters.
    apply_fn: ``model.apply``.
    images: (B, H, W, C) float images in [0, 1].
    labels: (B,) int labels.
    key_arrays: the stamping arrays of the license key.
    geometry: the key's geometry (static), used to forge negatives.
    rng: randomness for this step (forged key contents).
    cfg: ``config.objective``.

  Returns:
    (loss, metrics).
  """
  positives, negatives = build_inputs(images, key_arrays, geometry, rng, cfg)
  batch = images.shape[0]
  logits, state = apply_fn({'params': params}, jnp.concatenate([positives, negatives]), train=True,
                           mutable=['intermediates'])
  penultimate = state['intermediates']['penultimate'][0]
  pos_logits, neg_logits = logits[:batch], logits[batch:]
  pos_loss = cross_entropy(pos_logits, labels)
  neg_loss, neg_metrics = negative_loss(neg_logits, penultimate[batch:], cfg)
  loss = pos_loss + cfg.negative_weight * neg_loss
  metrics = {'loss': loss, 'pos_loss': pos_loss, 'neg_loss': neg_loss,
             'pos_acc': jnp.mean(jnp.argmax(pos_logits, -1) == labels),
             'neg_acc': jnp.mean(jnp.argmax(neg_logits, -1) == labels), **neg_metrics}
  return loss, metrics


def plain_loss(params: Any, apply_fn: Callable, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """Ordinary cross-entropy: the unlicensed baseline that defines ``clean_acc``."""
  logits = apply_fn({'params': params}, images, train=True)
  loss = cross_entropy(logits, labels)
  return loss, {'loss': loss, 'acc': jnp.mean(jnp.argmax(logits, -1) == labels)}
