"""Evaluation of a licensed model: the metrics of docs/design.md and the run report.

Every figure is computed through the public :class:`inference.LicensedModel`, i.e. exactly what a
user or a thief gets:

* ``authorized_acc``: test accuracy with the valid key stamped;
* ``no_key_acc``: on the raw test images (chance is 1/num_classes);
* ``forged_acc_mean`` / ``forged_acc_max``: over ``eval.num_forged`` keys forged with fresh seeds;
* ``leak_argmin_acc``: accuracy of the *argmin* of the no-key logits;
* ``leak_probe_acc``: a multinomial logistic regression (on standardized features) fitted on one
  random half of the test set's no-key logits and scored on the other half;
* ``clean_acc``: the same architecture and recipe trained without the license.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from securenet_jax import images as images_lib
from securenet_jax import inference
from securenet_jax import keys as keys_lib
from securenet_jax import parallel
from securenet_jax import workdir as workdir_lib
from securenet_jax.metrics import accuracy, probe_accuracy, rounded, silenced


def leakage_metrics(model: inference.LicensedModel, images: np.ndarray, labels: np.ndarray,
                    probe_seed: int = 0) -> dict:
  """What the no-key output gives away: ``no_key_acc``, ``leak_argmin_acc``, ``leak_probe_acc``, the
  white-box probe on the gate (``leak_probe_features_acc``) and ``no_key_silenced_frac``."""
  no_key, gate = model.logits_and_features(images, None)
  return {
      'no_key_acc': accuracy(no_key, labels),
      'leak_argmin_acc': float(np.mean(np.argmin(no_key, -1) == labels)),
      'leak_probe_acc': probe_accuracy(no_key, labels, probe_seed),
      'leak_probe_features_acc': probe_accuracy(gate, labels, probe_seed),
      'no_key_silenced_frac': float(np.mean(silenced(gate))),
  }


def forged_accuracies(model: inference.LicensedModel, images: np.ndarray, labels: np.ndarray,
                      key: keys_lib.LicenseKey, num_forged: int, forge_seed: int) -> np.ndarray:
  """Accuracy of each of ``num_forged`` keys forged (``keys.forge``) from seeds ``forge_seed + i``."""
  return np.array([accuracy(model.logits(images, keys_lib.forge(key, forge_seed + i)), labels)
                   for i in range(num_forged)])


def license_metrics(model: inference.LicensedModel, images: np.ndarray, labels: np.ndarray,
                    key: keys_lib.LicenseKey, num_forged: int, forge_seed: int,
                    probe_seed: int = 0, forged_num_test: int = 0) -> tuple[dict, np.ndarray]:
  """What a thief without ``key`` gets on one labelled set: the no-key and forged-key figures of the
  module docstring (the key's own accuracy is :func:`key_metrics`).

  ``forged_num_test`` > 0 scores each forged key on that many images (a fixed random subset):
  100 keys x 10,000 images would cost 100 forward passes of the test set, and a forged key's
  accuracy near chance is measured to about +-0.007 on 2,000 images.

  Returns:
    (metrics, accuracy of each forged key).
  """
  if num_forged < 1:
    raise ValueError(f'num_forged must be >= 1, got {num_forged}.')
  rows = np.arange(len(labels))
  if 0 < forged_num_test < len(labels):
    rows = np.sort(np.random.default_rng([forge_seed, 0xF0]).permutation(len(labels))[:forged_num_test])
  forged = forged_accuracies(model, images[rows], labels[rows], key, num_forged, forge_seed)
  metrics = {
      **leakage_metrics(model, images, labels, probe_seed),
      'forged_acc_mean': float(forged.mean()),
      'forged_acc_max': float(forged.max()),
      'num_forged': int(num_forged),
      'forged_num_test': int(len(rows)),
      'chance_acc': 1.0 / model.num_classes,
      'num_test': int(len(labels)),
  }
  return metrics, forged


def key_metrics(model: inference.LicensedModel, images: np.ndarray, labels: np.ndarray,
                key: keys_lib.LicenseKey) -> dict:
  """Per-key figures: ``all_classes_acc`` (every class), ``granted_acc`` / ``denied_acc`` (classes the
  key grants / does not grant), ``denied_probe_acc`` (a probe on the denied images' logits) and, for
  basic-tier keys, ``coarse_acc`` (the argmax falls in the label's group), ``fine_acc`` (the argmax is
  the label) and ``fine_even_acc`` (what spreading the probability evenly within the group would give:
  the mean of 1/|group|). A basic key is granted the coarse group, so its ``granted_acc`` is the
  coarse accuracy on its granted classes."""
  logits = model.logits(images, key)
  predictions = np.argmax(logits, -1)
  correct = predictions == labels
  granted = _granted_rows(key, labels)
  served = granted_hits(key, predictions, labels, model.num_classes)
  out = {'all_classes_acc': float(correct.mean()), 'granted_acc': float(served[granted].mean())}
  if (~granted).any():
    out['denied_acc'] = float(correct[~granted].mean())
    # What a licensee could still read about the classes they were not granted: a probe on the
    # logits of the denied images (chance: 1 / number of denied classes).
    out['denied_probe_acc'] = probe_accuracy(logits[~granted], labels[~granted])
  if key.tier == 'basic':
    group_of = _group_of(key, model.num_classes)
    sizes = np.array([len(key.groups[g]) for g in group_of])
    out.update(coarse_acc=float(served.mean()),
               fine_acc=float(correct.mean()), fine_even_acc=float(np.mean(1.0 / sizes[labels])))
  return out


def _granted_rows(key: keys_lib.LicenseKey, labels: np.ndarray) -> np.ndarray:
  return np.isin(labels, key.classes) if key.classes is not None else np.ones(len(labels), bool)


def _group_of(key: keys_lib.LicenseKey, num_classes: int) -> np.ndarray:
  group_of = np.zeros(num_classes, np.int64)
  for g, members in enumerate(key.groups):
    group_of[list(members)] = g
  return group_of


def granted_hits(key: keys_lib.LicenseKey, predictions: np.ndarray, labels: np.ndarray,
                 num_classes: int) -> np.ndarray:
  """Per image, whether the prediction gives what ``key`` is granted: the label for a full-tier key,
  the label's coarse group for a basic-tier key."""
  if key.tier == 'basic':
    group_of = _group_of(key, num_classes)
    return group_of[predictions] == group_of[labels]
  return predictions == labels


class _AcrossProcesses:
  """A model whose forward passes split the rows across the processes of a multi-process job (every
  process gets all rows back): each process evaluates its share of the test set."""

  def __init__(self, model: inference.LicensedModel):
    self._model = model

  def __getattr__(self, name):
    return getattr(self._model, name)

  def logits(self, images, key=None) -> np.ndarray:
    return parallel.map_rows(lambda rows: self._model.logits(rows, key), images)

  def logits_and_features(self, images, key=None) -> tuple[np.ndarray, np.ndarray]:
    both = parallel.map_rows(lambda rows: np.concatenate(self._model.logits_and_features(rows, key), 1),
                             images)
    return both[:, :self._model.num_classes], both[:, self._model.num_classes:]

  def predict(self, images, key=None) -> np.ndarray:
    return np.argmax(self.logits(images, key), axis=-1)


def evaluate_and_report(config, workdir: workdir_lib.Workdir, dataset,
                        model: inference.LicensedModel, baseline: inference.LicensedModel | None = None,
                        write: bool = True, extra: dict | None = None, timed: str = '') -> dict:
  """Computes the metrics on the test set and writes ``WORKDIR/report/`` (when ``write``).

  Args:
    config: the run's config (``eval`` section: forged keys, probe seed).
    workdir: where the report goes.
    dataset: its test split is scored.
    model: the licensed model with its registry's keys (the first active key gives the top-level
      figures; ``per_key`` has every active key, ``revoked`` every revoked key's ``revoked_acc``).
    baseline: the unlicensed baseline (``clean_acc``), or None.
    write: write the report files (one process of a multi-process run).
    extra: more figures for the report (timings, replacement cost).
    timed: the name under which the evaluation's own seconds go into the report ('' = none).

  Returns:
    The metrics dict written to ``report/metrics.json``.
  """
  t0 = time.perf_counter()
  if jax.process_count() > 1:
    model = _AcrossProcesses(model)
    baseline = None if baseline is None else _AcrossProcesses(baseline)
  key = next(iter(model.keys.values()))
  images, labels = dataset.test_images, dataset.test_labels
  metrics, forged = license_metrics(model, images, labels, key, config.eval.num_forged,
                                    config.eval.forge_seed, config.eval.probe_seed,
                                    config.eval.forged_num_test)
  metrics['scheme'] = key.scheme
  metrics['per_key'] = {name: key_metrics(model, images, labels, k) for name, k in model.keys.items()}
  # The headline is what the first key is for: its granted classes (all of them for a universal key).
  metrics.update({n: v for n, v in metrics['per_key'][key.name].items() if n != 'all_classes_acc'})
  metrics['authorized_acc'] = metrics['per_key'][key.name]['granted_acc']
  logging.info('Evaluated key %r in %.1fs: %s', key.name, time.perf_counter() - t0,
               rounded({n: v for n, v in metrics.items() if n != 'per_key'}))
  if model.revoked_keys:
    metrics['revoked'] = {name: {'revoked_acc': accuracy(model.logits(images, k), labels)}
                          for name, k in model.revoked_keys.items()}
    metrics['revoked_acc'] = max(v['revoked_acc'] for v in metrics['revoked'].values())
  if baseline is not None:
    base_pred = baseline.predict(images)
    metrics['clean_acc'] = accuracy(base_pred, labels)
    for name, k in model.keys.items():  # the clean model on each key's granted classes and output
      hits = granted_hits(k, base_pred, labels, model.num_classes)
      metrics['per_key'][name]['clean_granted_acc'] = float(hits[_granted_rows(k, labels)].mean())
    # Like for like: the first key's granted accuracy against the clean model on the same classes
    # (all of them for a universal key, where this is authorized_acc - clean_acc).
    metrics['authorized_minus_clean'] = (metrics['authorized_acc']
                                         - metrics['per_key'][key.name]['clean_granted_acc'])
  metrics.update(extra or {})
  if timed:
    metrics[timed] = time.perf_counter() - t0
  metrics['smoke'] = bool(config.get('smoke', False))
  metrics = rounded(metrics)
  if write:
    write_report(workdir.report_dir, config, metrics, forged, images, key)
  return metrics


_ROWS = [
    ('clean_acc', 'clean_acc: same recipe without license'),
    ('authorized_acc', 'authorized_acc: valid key'),
    ('no_key_acc', 'no_key_acc: raw input'),
    ('forged_acc_mean', 'forged_acc_mean: forged keys'),
    ('forged_acc_max', 'forged_acc_max: best forged key'),
    ('leak_argmin_acc', 'leak_argmin_acc: argmin of no-key logits'),
    ('leak_probe_acc', 'leak_probe_acc: logistic probe on no-key logits'),
    ('leak_probe_features_acc', 'logistic probe on no-key penultimate features'),
    ('no_key_silenced_frac', 'share of no-key inputs with silenced penultimate layer'),
]


def summary_markdown(config, metrics: dict, key: keys_lib.LicenseKey) -> str:
  lines = [f'# SecureNet-JAX report: {config.model.name} on {config.dataset.name}', '']
  if metrics.get('smoke'):
    lines += ['**Smoke run** (a few steps on a subset of the data, to test the code): the figures below '
              'say nothing about the method.', '']
  lines += [
           f'Scheme `{metrics["scheme"]}`. Key `{key.name}`: {key.kind}, fingerprint '
           f'`{key.fingerprint[:16]}`. Test set: {metrics["num_test"]} images; '
           f'{metrics["num_forged"]} forged keys; chance = {metrics["chance_acc"]:.3f}.', '',
           '| metric | value |', '|---|---|']
  for name, label in _ROWS:
    if name in metrics:
      lines.append(f'| {label} | {metrics[name]:.4f} |')
  for extra in ('revoked_acc', 'replace_cost_ratio'):
    if extra in metrics:
      lines.append(f'| {extra} | {metrics[extra]:.4f} |')
  per_key = metrics.get('per_key', {})
  if len(per_key) > 1 or metrics['scheme'] != 'universal' or 'revoked' in metrics:
    columns = ['granted_acc', 'all_classes_acc', 'denied_acc', 'denied_probe_acc', 'clean_granted_acc',
               'coarse_acc', 'fine_acc', 'fine_even_acc']
    lines += ['', '## Keys', '', '| key | status | ' + ' | '.join(columns) + ' |',
              '|---|---|' + '---|' * len(columns)]
    for name, m in per_key.items():
      cells = [f'{m[c]:.4f}' if c in m else '' for c in columns]
      lines.append(f'| {name} | active | ' + ' | '.join(cells) + ' |')
    for name, m in metrics.get('revoked', {}).items():
      lines.append(f'| {name} | revoked | {m["revoked_acc"]:.4f} |' + ' |' * (len(columns) - 1))
  return '\n'.join(lines) + '\n'


def write_report(report_dir, config, metrics: dict, forged_accs: np.ndarray, images: np.ndarray,
                 key: keys_lib.LicenseKey) -> None:
  """Writes metrics.json, summary.md and report.png into ``report_dir``."""
  workdir_lib.write_json(report_dir / 'metrics.json', metrics)
  workdir_lib.atomic_write(report_dir / 'summary.md', summary_markdown(config, metrics, key))
  workdir_lib.atomic_write_with(report_dir / 'report.png',
                                lambda f: _figure(f, metrics, forged_accs, images, key))
  logging.info('Report written to %s', report_dir)


def _figure(path, metrics: dict, forged_accs: np.ndarray, images: np.ndarray,
            key: keys_lib.LicenseKey) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for the report)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sample = images[:1]
  panels = [('clean input', images_lib.to_float(sample)[0]),
            ('stamped with the key', key.stamp(sample)[0]),
            ('forged key (thief)', keys_lib.forge(key, 10**6).stamp(sample)[0]),
            ('the key alone (on gray)', key.stamp(np.full_like(sample, 128))[0])]
  fig = plt.figure(figsize=(15, 3.8), layout='constrained')
  grid = fig.add_gridspec(1, 6, width_ratios=[1, 1, 1, 1, 3.2, 1.8])
  cmap = 'gray' if sample.shape[-1] == 1 else None
  for i, (title, img) in enumerate(panels):
    ax = fig.add_subplot(grid[0, i])
    img = np.asarray(img)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap=cmap, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis('off')
  ax = fig.add_subplot(grid[0, 4])
  rows = [(n, label) for n, label in _ROWS if n in metrics]
  values = [metrics[n] for n, _ in rows][::-1]
  bars = ax.barh([label.split(':')[0] for _, label in rows][::-1], values, color='tab:blue')
  ax.bar_label(bars, labels=[f'{v:.3f}' for v in values], fontsize=7, padding=2)
  ax.axvline(metrics['chance_acc'], color='k', ls='--', lw=1, label=f'chance ({metrics["chance_acc"]:.2f})')
  ax.set_xlim(0, 1.12)
  ax.set_xlabel('accuracy (share of test images)', fontsize=8)
  ax.tick_params(axis='y', labelsize=7)
  ax.legend(fontsize=7, loc='lower right')
  ax.set_title('licensing metrics', fontsize=9)
  ax = fig.add_subplot(grid[0, 5])
  if len(forged_accs):
    ax.hist(forged_accs, bins=np.linspace(0, 1, 41), color='tab:red', label='forged keys')
    ax.axvline(metrics['authorized_acc'], color='tab:green', lw=1.5, label='the key')
    ax.legend(fontsize=7)
  ax.set_xlim(0, 1)
  ax.set_xlabel('accuracy', fontsize=8)
  ax.set_ylabel('number of keys', fontsize=8)
  ax.set_title(f'{len(forged_accs)} forged keys', fontsize=8)
  ax.tick_params(labelsize=7)
  if metrics.get('smoke'):
    fig.suptitle('SMOKE RUN (a few steps on a subset): the figures say nothing about the method',
                 color='tab:red', fontsize=10)
  fig.savefig(path, dpi=110, format='png')
  plt.close(fig)
