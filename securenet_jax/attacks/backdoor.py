"""Backdoor (data poisoning) attacks, and whether a thief can plant one in stolen weights.

A backdoor trigger is one more per-pixel affine map, exactly like a license key
(``clip(x * keep + add, 0, 1)``), so triggers are :class:`keys.KeyArrays` and stamp with
:func:`keys.stamp_arrays`:

* :func:`badnets_trigger` (Gu et al., 2017, "BadNets"): a small patch of fixed random binary content,
  by default in the top-left corner, away from a patch license key (bottom-right). A trigger that
  overlaps a patch key would be overwritten by it when the licensee stamps the key.
* :func:`blend_trigger` (Chen et al., 2017, "Targeted backdoor attacks ... using data poisoning"): a
  fixed random whole-image pattern blended in with weight ``alpha``.

:func:`poison` stamps a share of the training data and relabels it to the target class; the attack
success rate (:func:`attack_success_rate`) is the share of non-target test images classified as the
target once triggered. For a licensed model the licensee stamps the key on whatever input arrives, so
a triggered input is seen as ``key(trigger(x))``.

:func:`thief_backdoor_finetune` is the scenario of interest: the thief fine-tunes stolen weights on a
little key-less, partly poisoned data. Does the backdoor survive into licensed use (with the key)?
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import numpy as np

from securenet_jax import images as images_lib
from securenet_jax import keys
from securenet_jax.attacks import common


def _rng(seed: int, tag: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed), tag]))


def badnets_trigger(image_shape, size: int = 3, position: tuple[int, int] | None = None,
                    seed: int = 0) -> keys.KeyArrays:
  """A ``size`` x ``size`` patch of fixed random binary content (never all one value).

  Args:
    image_shape: (H, W, C).
    size: side of the patch in pixels.
    position: (row, col) of its top-left corner; default ``(1, 1)``: the top-left corner with a one
      pixel margin, away from the bottom-right patch license key.
    seed: the content.
  """
  geometry = keys.Geometry(kind='patch', image_shape=tuple(image_shape), values='binary', size=size,
                           position=(1, 1) if position is None else tuple(position))
  rng = _rng(seed, 0xBAD)
  content = geometry.sample_numpy(rng)
  while content.size > 1 and np.all(content == content.flat[0]):
    content = geometry.sample_numpy(rng)
  return geometry.arrays(content.astype(np.float32))


def blend_trigger(image_shape, alpha: float = 0.1, seed: int = 0) -> keys.KeyArrays:
  """A fixed uniform-random pattern over the whole image: ``keep = 1 - alpha``, ``add = alpha * p``."""
  geometry = keys.Geometry(kind='blend', image_shape=tuple(image_shape), values='uniform',
                           alpha=float(alpha))
  return geometry.arrays(geometry.sample_numpy(_rng(seed, 0xB1E)).astype(np.float32))


def stamp(images, trigger: keys.KeyArrays) -> np.ndarray:
  """Stamps a trigger on host images; uint8 in -> uint8 out (stamped in float, rounded back), float
  in -> float32 in [0, 1] out."""
  images = np.asarray(images)
  out = np.asarray(keys.stamp_arrays(images_lib.to_float(images), trigger))
  if images.dtype == np.uint8:
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
  return out.astype(images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32)


def poison(images, labels, trigger: keys.KeyArrays, target: int, rate: float,
           seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Stamps ``round(rate * N)`` examples with the trigger and relabels them ``target``.

  The poisoned examples are drawn (seeded) among those whose label is not ``target``; if there are
  fewer of them than asked, all are poisoned. The inputs are not modified.

  Returns:
    ``(images, labels, poisoned_index)``: new arrays of the input dtypes, and the sorted indices of
    the poisoned examples.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'Poison rate must be in [0, 1], got {rate}.')
  candidates = np.flatnonzero(labels.reshape(-1) != target)
  count = min(len(candidates), int(round(rate * len(labels))))
  index = np.sort(_rng(seed, 0x9015).choice(candidates, size=count, replace=False))
  images, labels = images.copy(), labels.copy()
  if count:
    images[index] = stamp(images[index], trigger)
    labels[index] = target
  return images, labels, index.astype(np.int64)


def attack_success_rate(module: nn.Module, variables: Any, images, labels, trigger: keys.KeyArrays,
                        target: int, transform: common.Transform = None) -> float:
  """Share of test images of a class other than ``target`` that are predicted ``target`` once
  triggered: the model sees ``transform(stamp(x, trigger))`` (the trigger first, then e.g. the
  license key the licensee stamps on every input)."""
  labels = np.asarray(labels).reshape(-1)
  keep = labels != target
  if not np.any(keep):
    return float('nan')
  triggered = stamp(images_lib.to_float(np.asarray(images)[keep]), trigger)
  return float(np.mean(common.predict(module, variables, triggered, transform) == target))


def thief_backdoor_finetune(module: nn.Module, stolen_variables: Any, train_images, train_labels,
                            test_images, test_labels, *, trigger: keys.KeyArrays, target: int,
                            poison_rate: float = 0.1, data_fraction: float, epochs: int,
                            learning_rate: float, seed: int,
                            key_transform: common.Transform = None, batch_size: int = 128,
                            min_steps: int = 0,
                            gate_open: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
  """The thief fine-tunes stolen weights, without the key, on a partly poisoned labeled subset.

  A class-stratified ``data_fraction`` of the training data (``common.subset``) is drawn, a
  ``poison_rate`` share of it poisoned (:func:`poison`), and the stolen weights fine-tuned on it with
  ``common.fit`` (``epochs``, raised to reach ``min_steps`` optimizer steps).

  Returns:
    ``asr_licensed`` / ``clean_acc_licensed``: attack success rate and clean accuracy with the key
    stamped by ``key_transform`` after the trigger (what a licensee of the tampered model would see);
    ``None`` when ``key_transform`` is None (an unprotected model: read the raw figures).
    ``asr_raw`` / ``clean_acc_raw``: the same without any key. ``asr_licensed_before`` /
    ``asr_raw_before``: the stolen weights' rate on the same triggered inputs *before* the fine-tune,
    the share owed to the trigger's natural effect rather than to the poison. Also ``num_train``,
    ``num_poisoned`` and ``epochs`` (as run). With ``gate_open`` (images -> one bool per image: does
    any gate unit of the stolen model pass it), ``num_open_before``: how many of the thief's
    (poisoned) training inputs the stolen model does not silence. One is enough for an adaptive
    optimizer to re-open the gate, since a silenced input passes no gradient at all and an open one
    gets full-size Adam steps (docs/security.md).
  """
  x, y = common.subset(images_lib.to_float(train_images), np.asarray(train_labels, np.int32),
                        data_fraction, seed)
  x, y, index = poison(x, y, trigger, target, poison_rate, seed)
  n_epochs = common.epochs_for(len(x), batch_size, epochs, min_steps)
  tuned = common.fit(module, stolen_variables, x, y, epochs=n_epochs, batch_size=batch_size,
                     learning_rate=learning_rate, seed=seed)
  test_x, test_y = images_lib.to_float(test_images), np.asarray(test_labels)
  out: dict[str, Any] = {
      'asr_raw': attack_success_rate(module, tuned, test_x, test_y, trigger, target),
      'asr_raw_before': attack_success_rate(module, stolen_variables, test_x, test_y, trigger, target),
      'clean_acc_raw': common.accuracy(module, tuned, test_x, test_y),
      'asr_licensed': None,
      'asr_licensed_before': None,
      'clean_acc_licensed': None,
      'num_train': int(len(x)),
      'num_poisoned': int(len(index)),
      'epochs': int(n_epochs),
  }
  if gate_open is not None:
    out['num_open_before'] = int(np.sum(gate_open(x)))
  if key_transform is not None:
    out['asr_licensed'] = attack_success_rate(module, tuned, test_x, test_y, trigger, target,
                                              key_transform)
    out['asr_licensed_before'] = attack_success_rate(module, stolen_variables, test_x, test_y, trigger,
                                                     target, key_transform)
    out['clean_acc_licensed'] = common.accuracy(module, tuned, test_x, test_y, key_transform)
  return out
