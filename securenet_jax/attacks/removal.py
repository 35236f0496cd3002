"""Removal attacks: a thief with the weights and no key tries to turn them into a working model.

Two ways to get rid of the protection:

* **Fine-tuning on a little labeled data** (:func:`finetune_vs_scratch`). The thief fine-tunes the
  stolen weights on key-less images. That only counts as an attack if it beats what the same data
  buys without the stolen weights, so every fine-tuning run is paired with training the same
  architecture from scratch on the same subset with the same recipe; the *gain* (fine-tune minus
  scratch accuracy) is what the stolen weights are worth to the thief.
* **Pruning** (:func:`magnitude_prune`, :func:`pruning_sweep`). If the "no key -> uninformative output"
  behaviour lives in a few large or small weights, removing the smallest weights might switch it off.
  The sweep reports, for each pruning fraction, the accuracy without the key (does it rise?) and with
  it (what pruning costs the licensee).

All accuracies are on the *raw* test images (no key) unless stated otherwise; images may be uint8 in
0..255 or float in [0, 1].
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from securenet_jax import images as images_lib
from securenet_jax.attacks import common

DEFAULT_FRACTIONS = (0.01, 0.05, 0.10)
DEFAULT_PRUNE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _lr_key(lr: float) -> str:
  return f'{float(lr):g}'


# --- fine-tuning vs. training from scratch -------------------------------------------------------------

def finetune_vs_scratch(module: nn.Module, stolen_variables: Any, train_images, train_labels,
                        test_images, test_labels, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                        epochs: int, batch_size: int = 128, learning_rate: float = 1e-3, seed: int = 0,
                        eval_transform: common.Transform = None,
                        learning_rates: Sequence[float] | None = None, min_steps: int = 200,
                        weight_decay: float = 1e-4) -> dict:
  """Is fine-tuning the stolen weights (no key) better than training from scratch on the same data?

  For each fraction ``k`` a class-stratified subset of the training data is drawn (:func:`common.subset`,
  seeded by ``seed``; the same subset for both arms) and

  (a) the stolen weights are fine-tuned on it without any key: ``common.fit(module, stolen, ...)``;
  (b) the same architecture is trained from a fresh initialization on it with the same recipe:
      ``common.fit(module, None, ...)``.

  Both are scored on the test images with ``eval_transform`` (``None``: the raw, key-less images,
  which is what the thief has).

  Args:
    module, stolen_variables: the stolen model.
    train_images, train_labels: the pool the thief's labeled data is drawn from.
    test_images, test_labels: held-out data for scoring.
    fractions: shares of the training pool the thief has labeled.
    epochs: training epochs; raised per fraction to reach ``min_steps`` (see :func:`epochs_for`).
    batch_size, learning_rate, weight_decay: the recipe (AdamW, cosine decay; see ``common.fit``).
    seed: subset draw, initialization of the scratch model, data order.
    eval_transform: applied to the test images before the model.
    learning_rates: optional fine-tuning sweep. The thief fine-tunes once per learning rate and keeps
      the best *test* accuracy (an upper bound on what a thief with a validation split would pick);
      the scratch arm keeps ``learning_rate``, so the reported gain, if anything, flatters the attack.
      ``None``: fine-tune with ``learning_rate`` only.
    min_steps: the fewest optimizer steps any run takes, however small the subset.

  Returns:
    ``{'stolen_acc', 'finetune_acc@k', 'scratch_acc@k', 'finetune_gain@k', 'subset_size@k',
    'epochs@k', ...}`` (``k`` as :func:`fraction_key` writes it), and with a sweep
    ``'finetune_acc_by_lr': {k: {lr: acc}}`` and ``'best_lr@k'``. ``stolen_acc`` is the stolen
    model's own accuracy under ``eval_transform``, before any training.
  """
  train_x, train_y = images_lib.to_float(train_images), np.asarray(train_labels, np.int32)
  test_x, test_y = images_lib.to_float(test_images), np.asarray(test_labels)
  lrs = tuple(learning_rates) if learning_rates else (learning_rate,)
  score = lambda variables: common.accuracy(module, variables, test_x, test_y, eval_transform)
  out: dict[str, Any] = {'stolen_acc': score(stolen_variables)}
  by_lr: dict[str, dict[str, float]] = {}
  for fraction in fractions:
    k = common.fraction_key(fraction)
    idx = common.subset_index(train_y, fraction, seed)
    x, y = train_x[idx], train_y[idx]
    n_epochs = common.epochs_for(len(idx), batch_size, epochs, min_steps)
    recipe = dict(epochs=n_epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    accs = {}
    for lr in lrs:
      tuned = common.fit(module, stolen_variables, x, y, learning_rate=lr, **recipe)
      accs[_lr_key(lr)] = score(tuned)
    scratch = common.fit(module, None, x, y, learning_rate=learning_rate, **recipe)
    best_lr = max(accs, key=accs.get)
    out[f'finetune_acc@{k}'] = accs[best_lr]
    out[f'scratch_acc@{k}'] = score(scratch)
    out[f'finetune_gain@{k}'] = out[f'finetune_acc@{k}'] - out[f'scratch_acc@{k}']
    out[f'subset_size@{k}'] = int(len(idx))
    out[f'epochs@{k}'] = int(n_epochs)
    if learning_rates:
      out[f'best_lr@{k}'] = float(best_lr)
      by_lr[k] = accs
  if learning_rates:
    out['finetune_acc_by_lr'] = by_lr
  return out


# --- pruning ---------------------------------------------------------------------------------------------

def _is_kernel(path) -> bool:
  last = path[-1] if path else None
  name = getattr(last, 'key', getattr(last, 'name', None))
  return name == 'kernel'


def magnitude_prune(variables: Any, fraction: float) -> dict:
  """Global unstructured magnitude pruning of every conv/dense kernel.

  The ``round(fraction * K)`` kernel weights of smallest ``|w|`` over *all* kernels together (``K``
  kernel weights in total; ties broken by position) are set to zero. Biases, normalization
  parameters and ``batch_stats`` are left alone. A kernel is a parameter named ``kernel``.

  Args:
    variables: ``{'params', 'batch_stats'?}`` (or bare params).
    fraction: in [0, 1]; 0 returns an unchanged copy.

  Returns:
    A new variables dict of host numpy arrays (the input is not modified).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'Pruning fraction must be in [0, 1], got {fraction}.')
  variables = dict(variables) if isinstance(variables, dict) and 'params' in variables else {
      'params': variables}
  variables = jax.tree.map(lambda a: np.array(a, copy=True), variables)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables['params'])
  kernels = [i for i, (path, leaf) in enumerate(leaves) if _is_kernel(path)]
  sizes = [leaves[i][1].size for i in kernels]
  total = int(sum(sizes))
  count = int(round(fraction * total))
  new = [leaf for _, leaf in leaves]
  if count and total:
    flat = np.concatenate([np.abs(leaves[i][1]).reshape(-1).astype(np.float32) for i in kernels])
    drop = np.zeros(total, bool)
    drop[np.argpartition(flat, count - 1)[:count] if count < total else slice(None)] = True
    start = 0
    for i, size in zip(kernels, sizes):
      leaf = new[i]
      mask = drop[start:start + size].reshape(leaf.shape)
      new[i] = np.where(mask, np.zeros((), leaf.dtype), leaf)
      start += size
  variables['params'] = jax.tree_util.tree_unflatten(treedef, new)
  return variables


def kernel_sparsity(variables: Any) -> float:
  """Share of exactly-zero weights over all kernels."""
  params = variables['params'] if isinstance(variables, dict) and 'params' in variables else variables
  leaves = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if _is_kernel(path)]
  total = sum(leaf.size for leaf in leaves)
  return float(sum(int(np.sum(leaf == 0)) for leaf in leaves) / max(total, 1))


def pruning_sweep(module: nn.Module, variables: Any, test_images, test_labels,
                  key_transform: common.Transform,
                  fractions: Sequence[float] = DEFAULT_PRUNE_FRACTIONS) -> dict:
  """Does pruning raise the accuracy without the key, and what does it cost with the key?

  Args:
    module, variables: the (stolen) model.
    test_images, test_labels: held-out data (raw, key-less).
    key_transform: stamps the license key (e.g. ``functools.partial(keys.stamp_arrays,
      arrays=key.arrays())``); ``None`` skips the authorized accuracy (an unprotected model).
    fractions: pruning fractions to try (each from the original weights, not cumulatively).

  Returns:
    ``{'fractions': [0.0, *fractions], 'no_key_acc@k', 'authorized_acc@k' for k in 0.00 (the unpruned
    model) and each fraction, 'max_no_key_acc', 'max_no_key_gain' (best pruned no-key accuracy minus
    the unpruned one), 'best_fraction'}``.
  """
  x, y = images_lib.to_float(test_images), np.asarray(test_labels)
  all_fractions = [0.0] + [float(f) for f in fractions if float(f) != 0.0]
  out: dict[str, Any] = {'fractions': all_fractions}
  no_key = {}
  for fraction in all_fractions:
    k = common.fraction_key(fraction)
    pruned = magnitude_prune(variables, fraction)
    no_key[fraction] = common.accuracy(module, pruned, x, y)
    out[f'no_key_acc@{k}'] = no_key[fraction]
    if key_transform is not None:
      out[f'authorized_acc@{k}'] = common.accuracy(module, pruned, x, y, key_transform)
  pruned_only = {f: a for f, a in no_key.items() if f != 0.0} or no_key
  best = max(pruned_only, key=pruned_only.get)
  out['best_fraction'] = best
  out['max_no_key_acc'] = pruned_only[best]
  out['max_no_key_gain'] = pruned_only[best] - no_key[0.0]
  return out
