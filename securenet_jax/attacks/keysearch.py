"""Key search: a white-box thief who knows the key *scheme* searches the key's bits one at a time.

Kerckhoffs: the thief knows everything but the secret: the geometry (patch size and position, the
block size of the flip), that the content is binary, and the weights. He also has a few labeled
images. He starts from random keys and inverts one element at a time (a pixel of the pattern, a bit
of the block flip), keeping the change when an objective improves (coordinate ascent with first
improvement, every element once per pass in a random order, until a pass changes nothing). The
objectives, in stages, each starting where the last stopped (the first from several random keys,
keeping the best):

* ``gate``: how far the gate opens, the mean over his images of the largest pre-activation of the
  penultimate layer (white-box: it reads a hidden layer). It moves even while every output is
  silenced, which is what a search needs to start.
* ``ce``: minus the cross-entropy of the stamped images' logits against his labels (the outputs,
  and his labels).
* ``acc``: his accuracy (a tie broken by the cross-entropy).

A recovered key is scored like any key, on key-less test data the thief never saw. The number of
model evaluations is reported: each is one forward of the thief's images.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from securenet_jax import keys as keys_lib
from securenet_jax.attacks import common

OBJECTIVES = ('gate', 'ce', 'acc')


def searchable(geometry: keys_lib.Geometry) -> bool:
  """Keys whose content is a bit vector: binary patch keys, with or without a block flip."""
  return geometry.kind == 'patch' and geometry.values == 'binary'


def objectives_fn(module: nn.Module, variables: Any, geometry: keys_lib.Geometry):
  """A jitted ``(content, images, labels) -> {objective: value}``, higher is better for the thief."""

  @jax.jit
  def fn(content, images, labels):
    stamped = keys_lib.stamp_arrays(images, geometry.arrays(content))
    logits, state = module.apply(variables, stamped, train=False, mutable=['intermediates'])
    gate = state['intermediates']['penultimate'][0].reshape(images.shape[0], -1).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return {'gate': jnp.mean(jnp.max(gate, axis=-1)), 'ce': -ce, 'acc': acc - 1e-3 * ce}

  return fn


def _ascend(fn, flat, shape, x, y, stage, max_passes, rng, history) -> tuple[float, int]:
  """Coordinate ascent of one objective, in place on ``flat``; returns (objective, evaluations)."""
  current = float(fn(flat.reshape(shape), x, y)[stage])
  evaluations = 1
  for _ in range(max_passes):
    changed = 0
    for i in rng.permutation(flat.size):
      flat[i] = 1.0 - flat[i]
      value = float(fn(flat.reshape(shape), x, y)[stage])
      evaluations += 1
      if value > current + 1e-7:
        current, changed = value, changed + 1
      else:
        flat[i] = 1.0 - flat[i]
    history.append({'stage': stage, 'objective': current, 'changed': changed})
    if not changed:
      break
  return current, evaluations


def search(module: nn.Module, variables: Any, geometry: keys_lib.Geometry, images: np.ndarray,
           labels: np.ndarray, *, stages: Sequence[str] = ('gate', 'ce'), max_passes: int = 8,
           starts: int = 1, seed: int = 0, start: np.ndarray | None = None) -> dict:
  """Coordinate ascent over the key's bits.

  The first stage runs from ``starts`` random keys (it stops in local optima, some far better than
  others); the key that ends it highest goes on through the later stages.

  Args:
    module, variables: the stolen model.
    geometry: the key's public geometry (binary patch key; :func:`searchable`).
    images, labels: the thief's labeled data (float NHWC in [0, 1]).
    stages: objectives of :data:`OBJECTIVES`, searched one after the other.
    max_passes: passes over every element per stage (a stage also stops after a pass with no change).
    starts: random starting keys of the first stage.
    seed: the random starts and the order of the elements.
    start: the (single) starting content instead of random ones.

  Returns:
    ``{'content': the key found, 'evaluations': model evaluations, 'first_stage': the first stage's
    final objective per start, 'history': [per pass of the continued key: stage, objective value,
    elements changed], 'seconds'}``.
  """
  if not searchable(geometry):
    raise ValueError(f'Key search needs a binary patch key; this key is {geometry.kind!r} with '
                     f'{geometry.values!r} values.')
  unknown = [s for s in stages if s not in OBJECTIVES]
  if unknown or not stages:
    raise ValueError(f'Unknown key-search objectives {unknown or list(stages)}; expected some of '
                     f'{OBJECTIVES}.')
  rng = np.random.default_rng(seed)
  fn = objectives_fn(module, variables, geometry)
  x, y = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
  shape, t0, evaluations = geometry.content_shape, time.time(), 0
  candidates = []
  for _ in range(1 if start is not None else max(1, starts)):
    flat = (geometry.sample_numpy(rng) if start is None else np.array(start)).astype(np.float32).reshape(-1)
    history: list[dict] = []
    value, n = _ascend(fn, flat, shape, x, y, stages[0], max_passes, rng, history)
    evaluations += n
    candidates.append((value, flat, history))
  _, flat, history = max(candidates, key=lambda c: c[0])
  for stage in stages[1:]:
    _, n = _ascend(fn, flat, shape, x, y, stage, max_passes, rng, history)
    evaluations += n
  return {'content': flat.reshape(shape).copy(), 'evaluations': evaluations,
          'first_stage': [c[0] for c in candidates], 'history': history, 'seconds': time.time() - t0}


def key_accuracy(module: nn.Module, variables: Any, geometry: keys_lib.Geometry, content: np.ndarray,
                 images: np.ndarray, labels: np.ndarray) -> float:
  """Accuracy of the model on ``images`` stamped with the key ``content``."""
  arrays = geometry.arrays(np.asarray(content, np.float32))
  transform = functools.partial(keys_lib.stamp_arrays, arrays=arrays)
  return common.accuracy(module, variables, images, labels, transform=transform)
