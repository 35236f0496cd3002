"""Evaluation of a licensed model: the metrics of DESIGN.md §4 and the run report.

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

import json
import os
import time

import numpy as np
from absl import logging

from securenet_jax import inference
from securenet_jax import keys as keys_lib


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == labels))


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0, max_dim: int = 1024) -> float:
  """Held-out accuracy of a multinomial logistic-regression probe: the thief's simplest decoder.

  Fitted on a random half of (features, labels) after standardization, scored on the other half.
  Features wider than ``max_dim`` (e.g. a ResNet's flattened last feature map) are first reduced by a
  fixed Gaussian random projection to ``max_dim`` dimensions, which keeps the fit tractable on a CPU.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  perm = np.random.default_rng(seed).permutation(len(labels))
  fit, score = perm[:len(perm) // 2], perm[len(perm) // 2:]
  features = np.asarray(features, np.float64).reshape(len(labels), -1)
  if features.shape[1] > max_dim:
    projection = np.random.default_rng(seed).standard_normal((features.shape[1], max_dim))
    features = features @ (projection / np.sqrt(max_dim))
  if len(np.unique(labels[fit])) < 2:
    return float(np.mean(labels[score] == labels[fit][0]))
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  probe.fit(features[fit], labels[fit])
  return float(probe.score(features[score], labels[score]))


def license_metrics(model: inference.LicensedModel, images: np.ndarray, labels: np.ndarray,
                    key: keys_lib.LicenseKey, num_forged: int, forge_seed: int,
                    probe_seed: int = 0) -> tuple[dict, np.ndarray]:
  """The licensing metrics of one key on one labelled set (see the module docstring).

  Returns:
    (metrics, accuracy of each forged key).
  """
  t0 = time.perf_counter()
  authorized = model.logits(images, key)
  no_key, no_key_feats = model.logits_and_features(images, None)
  forged = np.array([accuracy(model.logits(images, keys_lib.forge(key, forge_seed + i)), labels)
                     for i in range(num_forged)])
  metrics = {
      'authorized_acc': accuracy(authorized, labels),
      'no_key_acc': accuracy(no_key, labels),
      'forged_acc_mean': float(forged.mean()) if num_forged else float('nan'),
      'forged_acc_max': float(forged.max()) if num_forged else float('nan'),
      'num_forged': int(num_forged),
      'leak_argmin_acc': float(np.mean(np.argmin(no_key, -1) == labels)),
      'leak_probe_acc': probe_accuracy(no_key, labels, probe_seed),
      'leak_probe_features_acc': probe_accuracy(no_key_feats, labels, probe_seed),
      'no_key_silenced_frac': float(np.mean(np.all(no_key_feats <= 0, axis=-1))),
      'chance_acc': 1.0 / model.num_classes,
      'num_test': int(len(labels)),
  }
  logging.info('Evaluated key %r in %.1fs: %s', key.name, time.perf_counter() - t0,
               {k: round(v, 4) for k, v in metrics.items()})
  return metrics, forged


def key_metrics(model: inference.LicensedModel, images: np.ndarray, labels: np.ndarray,
                key: keys_lib.LicenseKey) -> dict:
  """Per-key figures: ``authorized_acc`` (all classes), ``granted_acc`` / ``denied_acc`` (classes the
  key grants / does not grant), ``denied_probe_acc`` (a probe on the denied images' logits) and, for basic-tier keys, ``coarse_acc`` (the argmax falls in the
  label's group), ``fine_acc`` (the argmax is the label) and ``fine_even_acc`` (what spreading the
  probability evenly within the group would give: the mean of 1/|group|)."""
  logits = model.logits(images, key)
  predictions = np.argmax(logits, -1)
  correct = predictions == labels
  granted = np.isin(labels, key.classes) if key.classes is not None else np.ones_like(correct)
  out = {'authorized_acc': float(correct.mean()), 'granted_acc': float(correct[granted].mean())}
  if (~granted).any():
    out['denied_acc'] = float(correct[~granted].mean())
    # What a licensee could still read about the classes they were not granted: a probe on the
    # logits of the denied images (chance: 1 / number of denied classes).
    out['denied_probe_acc'] = probe_accuracy(logits[~granted], labels[~granted])
  if key.tier == 'basic':
    group_of = np.zeros(model.num_classes, np.int64)
    for g, members in enumerate(key.groups):
      group_of[list(members)] = g
    sizes = np.array([len(key.groups[g]) for g in group_of])
    out.update(coarse_acc=float(np.mean(group_of[predictions] == group_of[labels])),
               fine_acc=float(correct.mean()), fine_even_acc=float(np.mean(1.0 / sizes[labels])))
  return out


def evaluate_and_report(config, workdir: str, dataset, params, active: list[keys_lib.LicenseKey],
                        revoked: list[keys_lib.LicenseKey] = (), baseline_params=None,
                        write: bool = True, extra: dict | None = None) -> dict:
  """Computes the metrics on the test set and writes ``WORKDIR/report/`` (when ``write``).

  The top-level figures are those of the first active key (for a universal model, *the* key);
  ``per_key`` has every active key's figures and ``revoked`` every revoked key's ``revoked_acc``.

  Returns:
    The metrics dict written to ``report/metrics.json``.
  """
  from securenet_jax import train  # pylint: disable=g-import-not-at-top
  module = train.build_model(config, dataset.num_classes)
  key = active[0]
  model = inference.LicensedModel(module, params, dataset.image_shape, dataset.num_classes,
                                  keys={k.name: k for k in active},
                                  revoked_keys={k.name: k for k in revoked},
                                  batch_size=config.eval.batch_size, config=config)
  images, labels = dataset.test_images, dataset.test_labels
  metrics, forged = license_metrics(model, images, labels, key, config.eval.num_forged,
                                    config.eval.forge_seed, config.eval.probe_seed)
  metrics['scheme'] = key.scheme
  metrics['per_key'] = {k.name: key_metrics(model, images, labels, k) for k in active}
  metrics.update({n: v for n, v in metrics['per_key'][key.name].items() if n != 'authorized_acc'})
  if revoked:
    metrics['revoked'] = {k.name: {'revoked_acc': accuracy(model.logits(images, k), labels)}
                          for k in revoked}
    metrics['revoked_acc'] = max(v['revoked_acc'] for v in metrics['revoked'].values())
  if baseline_params is not None:
    baseline = inference.LicensedModel(module, baseline_params, dataset.image_shape,
                                       dataset.num_classes, batch_size=config.eval.batch_size)
    base_pred = np.argmax(baseline.logits(images), -1)
    metrics['clean_acc'] = float(np.mean(base_pred == labels))
    metrics['authorized_minus_clean'] = metrics['authorized_acc'] - metrics['clean_acc']
    for name, k in model.keys.items():  # the clean model on each key's granted classes
      granted = np.isin(labels, k.classes) if k.classes is not None else np.ones(len(labels), bool)
      metrics['per_key'][name]['clean_granted_acc'] = float(np.mean(base_pred[granted] == labels[granted]))
  metrics.update(extra or {})
  if write:
    write_report(os.path.join(workdir, 'report'), config, metrics, forged, images, labels, key)
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
  lines = [f'# SecureNet-JAX report: {config.model.name} on {config.dataset.name}', '',
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
    columns = ['authorized_acc', 'granted_acc', 'denied_acc', 'denied_probe_acc', 'clean_granted_acc',
               'coarse_acc', 'fine_acc', 'fine_even_acc']
    lines += ['', '## Keys', '', '| key | status | ' + ' | '.join(columns) + ' |',
              '|---|---|' + '---|' * len(columns)]
    for name, m in per_key.items():
      cells = [f'{m[c]:.4f}' if c in m else '' for c in columns]
      lines.append(f'| {name} | active | ' + ' | '.join(cells) + ' |')
    for name, m in metrics.get('revoked', {}).items():
      lines.append(f'| {name} | revoked | {m["revoked_acc"]:.4f} |' + ' |' * (len(columns) - 1))
  return '\n'.join(lines) + '\n'


def write_report(report_dir: str, config, metrics: dict, forged_accs: np.ndarray, images: np.ndarray,
                 labels: np.ndarray, key: keys_lib.LicenseKey) -> None:
  """Writes metrics.json, summary.md and report.png into ``report_dir``."""
  os.makedirs(report_dir, exist_ok=True)
  keys_lib._atomic_write(os.path.join(report_dir, 'metrics.json'),  # pylint: disable=protected-access
                         lambda f: json.dump(metrics, f, indent=1, sort_keys=True))
  keys_lib._atomic_write(os.path.join(report_dir, 'summary.md'),  # pylint: disable=protected-access
                         lambda f: f.write(summary_markdown(config, metrics, key)))
  _figure(os.path.join(report_dir, 'report.png'), metrics, forged_accs, images, key)
  logging.info('Report written to %s', report_dir)


def _figure(path: str, metrics: dict, forged_accs: np.ndarray, images: np.ndarray,
            key: keys_lib.LicenseKey) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sample = images[:1]
  panels = [('clean input', keys_lib.to_float_images(sample)[0]),
            ('stamped with the key', key.stamp(sample)[0]),
            ('forged key (thief)', keys_lib.forge(key, 10**6).stamp(sample)[0]),
            ('the key alone (on gray)', key.stamp(np.full_like(sample, 128))[0])]
  fig = plt.figure(figsize=(14, 3.6))
  grid = fig.add_gridspec(1, 6, width_ratios=[1, 1, 1, 1, 2.6, 1.6])
  cmap = 'gray' if sample.shape[-1] == 1 else None
  for i, (title, img) in enumerate(panels):
    ax = fig.add_subplot(grid[0, i])
    img = np.asarray(img)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap=cmap, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis('off')
  ax = fig.add_subplot(grid[0, 4])
  names = [n for n, _ in _ROWS[:7] if n in metrics]
  ax.barh(names[::-1], [metrics[n] for n in names[::-1]], color='tab:blue')
  ax.axvline(metrics['chance_acc'], color='k', ls='--', lw=1, label='chance')
  ax.set_xlim(0, 1)
  ax.tick_params(axis='y', labelsize=7)
  ax.legend(fontsize=7, loc='lower right')
  ax.set_title('accuracy', fontsize=9)
  ax = fig.add_subplot(grid[0, 5])
  if len(forged_accs):
    ax.hist(forged_accs, bins=20, color='tab:red')
  ax.set_title(f'{len(forged_accs)} forged keys: accuracy', fontsize=8)
  ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
