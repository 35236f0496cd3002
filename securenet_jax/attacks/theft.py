"""A thief who holds the weights and some labeled data: every standard transfer move.

The thief has no key. He does not need the stolen model as it is; he needs whatever part of it makes
his own model better than one trained from scratch on his labeled data. So each move is scored
against *scratch*: the same architecture trained from a fresh initialization on the same data, with
the same optimizer sweep. The moves (:func:`steal`):

* ``scratch``: no stolen weights at all (the reference).
* ``finetune``: fine-tune every layer of the stolen weights as they are.
* ``reinit:<cut>``: re-initialize the layers above a cut point, fine-tune everything.
* ``freeze:<cut>``: keep the stolen layers below the cut frozen, train new layers above it.
* ``open_gate``: re-open silenced units first (shift the bias, or BatchNorm offset, of every layer
  whose outputs are dead on the thief's data so that half of them pass), then fine-tune everything.
* ``probe:<layer>/<pre|post>``: a logistic-regression probe on a layer's features, before or after
  its activation.

Every training move runs BatchNorm in training mode (batch statistics, running averages
re-estimated), and takes the best test accuracy over the optimizer sweep (Adam and SGD at a few
learning rates): an upper bound on what a thief with a validation split would pick.

Layers are grouped into *units* (a layer of LeNet-5, a residual block of a ResNet, a stage block of
NFNet, ...) in the order they are created; cut points are counted in units from the top
(:func:`cut_points`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from securenet_jax import images as images_lib
from securenet_jax import metrics
from securenet_jax import predict as predict_lib
from securenet_jax.attacks import common

# A parameter group belongs to the unit named by the first matching pattern's group 1 (else to
# itself): residual / MobileNet / NFNet blocks, stems, a dense layer and its BN (LeNet-5 with
# batch_norm), and conv+BN pairs (VGG, the ResNet stem, LeNet-5).
_UNIT_PATTERNS = (r'^(layer\d+_\d+)_', r'^(stage\d+_block\d+)$', r'^(block\d+)_', r'^(stem)_',
                  r'^(last)_', r'^(fc\d+)_', r'^(?:conv|bn)(\d+)$')
_STAGE = re.compile(r'^(layer\d+|stage\d+)_')
# Depth order of unit names (JAX sorts dict keys, so the creation order is not kept): stems and plain
# convs, then blocks, then the last conv, the fully connected layers and the head; numbers in order.
_RANKS = ((r'^(?:conv\d+|stem)$', 0), (r'^(?:layer|stage|block)', 1), (r'^(?:last|final)', 2),
          (r'^fc\d+$', 3), (r'^head$', 4))


def _unit_of(name: str) -> str:
  for pattern in _UNIT_PATTERNS:
    m = re.match(pattern, name)
    if m:
      return m.group(1) if not pattern.startswith('^(?:conv') else f'conv{m.group(1)}'
  return name


def _depth(unit: str) -> tuple:
  rank = next((r for pattern, r in _RANKS if re.match(pattern, unit)), 2)
  return (rank, *(int(n) for n in re.findall(r'\d+', unit)))


def units(params: dict) -> list[tuple[str, list[str]]]:
  """The model's units, bottom to top: (unit name, its top-level parameter names)."""
  grouped: dict[str, list[str]] = {}
  for name in params:
    grouped.setdefault(_unit_of(name), []).append(name)
  return sorted(grouped.items(), key=lambda item: _depth(item[0]))


def output_of(unit: str, names: Sequence[str]) -> str:
  """The unit's submodule whose output is the unit's pre-activation output (a residual block: its
  last BatchNorm; a conv + BN pair: the BN; a single layer: itself)."""
  candidates = [f'{unit}_bn3', f'{unit}_bn2', f'{unit}_project_bn', f'{unit}_bn', f'{unit}_conv3',
                'bn' + unit[4:] if unit.startswith('conv') else '', unit]
  return next((c for c in candidates if c in names), names[-1])


def cut_points(params: dict, max_top: int = 4) -> dict[str, list[str]]:
  """Named cut points -> the parameter names *above* the cut (re-initialized or trained anew).

  The top 1..``max_top`` units (never all of them); for staged networks (ResNet, NFNet) also the
  last stage and the last two stages, each with the head.
  """
  us = units(params)
  cuts: dict[str, list[str]] = {}
  for j in range(1, min(max_top, len(us) - 1) + 1):
    top = us[-j:]
    cuts[top[0][0] if j == 1 else f'{top[0][0]}..{top[-1][0]}'] = [p for _, ps in top for p in ps]
  stages = []
  for unit, _ in us:
    m = _STAGE.match(unit + '_')
    if m and (not stages or stages[-1] != m.group(1)):
      stages.append(m.group(1))
  for n in (1, 2):
    if len(stages) > n:
      chosen = set(stages[-n:])
      first = next(i for i, (u, _) in enumerate(us) if (_STAGE.match(u + '_') or [None, None])[1] in chosen)
      top = us[first:]
      cuts.setdefault(f'{top[0][0]}..{top[-1][0]}', [p for _, ps in top for p in ps])
  return cuts


def _probe_points(module: nn.Module, variables: Any, x: jax.Array) -> dict[str, jax.Array]:
  """Each unit's output before its activation: the output of the unit's last submodule."""
  _, state = module.apply(variables, x, train=False, capture_intermediates=True,
                          mutable=['intermediates'])
  captured = state['intermediates']
  out = {}
  for unit, names in units(variables['params'])[:-1]:  # the top unit's output is the logits
    last = output_of(unit, names)
    if last in captured and '__call__' in captured[last]:
      out[unit] = captured[last]['__call__'][0]
  return out


def layer_features(module: nn.Module, variables: Any, images: np.ndarray, batch_size: int = 256,
                   max_dim: int = 4096) -> dict[str, np.ndarray]:
  """Every unit's pre-activation output on ``images`` (N, ...), flattened; feature maps are average
  pooled 2x2 at a time until they have at most ``max_dim`` values per image."""

  @jax.jit
  def fn(x, v):
    out = {}
    for unit, f in _probe_points(module, v, x).items():
      f = f.astype(jnp.float32)
      while f.ndim == 4 and f[0].size > max_dim and min(f.shape[1:3]) >= 2:
        f = nn.avg_pool(f, (2, 2), strides=(2, 2))
      out[unit] = f.reshape(f.shape[0], -1)
    return out

  return predict_lib.batched(fn, np.asarray(images, np.float32), variables, batch_size=batch_size)


def open_gates(module: nn.Module, variables: Any, images: np.ndarray, dead_share: float = 0.99) -> dict:
  """Re-opens silenced units: unit by unit, bottom to top, every channel whose output is <= 0 on at
  least ``dead_share`` of the thief's images gets its bias (Dense/Conv ``bias``, or BatchNorm's
  offset) raised by minus its median, so that about half of the images pass it again."""
  variables = jax.tree.map(np.array, dict(variables))
  params = variables['params']
  for unit, names in units(params)[:-1]:
    last = output_of(unit, names)
    if 'bias' not in params[last]:
      continue
    feats = layer_features(module, variables, images, max_dim=1 << 30)
    if unit not in feats:
      continue
    bias = params[last]['bias']
    f = feats[unit].reshape(len(images), -1, bias.shape[-1])  # (N, positions, channels)
    dead = np.mean(f.max(axis=1) <= 0, axis=0) >= dead_share
    if dead.any():
      bias[dead] -= np.median(f[:, :, dead], axis=(0, 1))
  return variables


@dataclasses.dataclass
class Recipe:
  """The thief's optimizer sweep: every (optimizer, learning rate) pair, keeping the best."""
  adam_learning_rates: Sequence[float] = (1e-3, 3e-3)
  sgd_learning_rates: Sequence[float] = (0.01, 0.05)
  epochs: int = 10
  min_steps: int = 500
  batch_size: int = 64
  weight_decay: float = 1e-4

  def runs(self):
    return [('adamw', lr) for lr in self.adam_learning_rates] + [('sgd', lr) for lr in self.sgd_learning_rates]


def _reinit(variables: dict, fresh: dict, names: Sequence[str]) -> dict:
  out = {k: dict(v) for k, v in variables.items()}
  for collection in out:
    for name in names:
      if name in fresh.get(collection, {}):
        out[collection][name] = fresh[collection][name]
  return out


def steal(module: nn.Module, stolen: Any, train_images, train_labels, test_images, test_labels, *,
          fraction: float, recipe: Recipe, seed: int = 0, moves: Sequence[str] | None = None,
          probe_seed: int = 0, scratch_acc: float | None = None) -> dict:
  """Runs the thief's moves on a class-stratified ``fraction`` of the training data.

  Args:
    module, stolen: the architecture and the stolen variables.
    train_images, train_labels: the pool the thief's labeled data is drawn from.
    test_images, test_labels: key-less test data every move is scored on.
    fraction: the share of the training set the thief has labeled.
    recipe: the optimizer sweep.
    seed: the thief's data draw, initializations and data order.
    moves: a subset of move kinds ('scratch', 'finetune', 'reinit', 'freeze', 'open_gate', 'probe');
      None runs all.
    probe_seed: the probes' random projection.
    scratch_acc: the scratch accuracy, when already measured for the same architecture, data,
      ``fraction``, ``recipe`` and ``seed`` (it does not depend on the stolen weights): not retrained.

  Returns:
    ``{'moves': {move: accuracy}, 'scratch_acc', 'best_move', 'best_acc', 'gain', 'subset_size',
    'steps'}``: the best move other than scratch, and its gain over scratch.
  """
  wanted = set(moves or ('scratch', 'finetune', 'reinit', 'freeze', 'open_gate', 'probe'))
  x_pool, y_pool = images_lib.to_float(train_images), np.asarray(train_labels, np.int32)
  test_x, test_y = images_lib.to_float(test_images), np.asarray(test_labels)
  idx = common.subset_index(y_pool, fraction, seed)
  x, y = x_pool[idx], y_pool[idx]
  epochs = common.epochs_for(len(idx), recipe.batch_size, recipe.epochs, recipe.min_steps)
  stolen = jax.tree.map(np.asarray, dict(stolen))
  fresh = jax.tree.map(np.asarray, dict(module.init(jax.random.key(seed + 1), jnp.zeros((1, *x.shape[1:])),
                                                    train=False)))
  score = lambda v: common.accuracy(module, v, test_x, test_y)

  def best_fit(start, trainable=None):
    accs = []
    for optimizer, lr in recipe.runs():
      fitted = common.fit(module, start, x, y, epochs=epochs, batch_size=recipe.batch_size,
                          learning_rate=lr, weight_decay=recipe.weight_decay, optimizer=optimizer,
                          seed=seed, trainable=trainable)
      accs.append(score(fitted))
    return max(accs)

  results: dict[str, float] = {}
  results['scratch'] = best_fit(None) if scratch_acc is None else float(scratch_acc)
  if 'finetune' in wanted:
    results['finetune'] = best_fit(stolen)
  cuts = cut_points(stolen['params'])
  for cut, top in cuts.items():
    if 'reinit' in wanted:
      results[f'reinit:{cut}'] = best_fit(_reinit(stolen, fresh, top))
    if 'freeze' in wanted:
      top_set = frozenset(top)
      results[f'freeze:{cut}'] = best_fit(_reinit(stolen, fresh, top), trainable=top_set)
  if 'open_gate' in wanted:
    results['open_gate'] = best_fit(open_gates(module, stolen, x))
  if 'probe' in wanted:
    train_feats = layer_features(module, stolen, x)
    test_feats = layer_features(module, stolen, test_x)
    n_fit = len(y)
    for unit in train_feats:
      for kind in ('pre', 'post'):
        act = (lambda f: f) if kind == 'pre' else (lambda f: np.maximum(f, 0))
        features = np.concatenate([act(train_feats[unit]), act(test_feats[unit])])
        labels = np.concatenate([y, test_y])
        results[f'probe:{unit}/{kind}'] = metrics.probe_accuracy(
            features, labels, probe_seed, fit_index=np.arange(n_fit),
            score_index=np.arange(n_fit, len(labels)))
  best = max((m for m in results if m != 'scratch'), key=results.get, default='scratch')
  return {'moves': results, 'scratch_acc': results['scratch'], 'best_move': best,
          'best_acc': results[best], 'gain': results[best] - results['scratch'],
          'subset_size': int(len(idx)), 'steps': int(epochs * -(-len(idx) // recipe.batch_size))}
