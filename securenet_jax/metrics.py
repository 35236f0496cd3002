"""The two measurements every report uses: accuracy, and the accuracy of a fitted linear probe.

The metric *names* (``authorized_acc``, ``leak_probe_acc``, ...) are defined in docs/design.md.
"""

from __future__ import annotations

import numpy as np


def accuracy(outputs, labels) -> float:
  """Share of correct predictions; ``outputs`` are logits (N, C) or predicted labels (N,)."""
  outputs, labels = np.asarray(outputs), np.asarray(labels).reshape(-1)
  predictions = np.argmax(outputs, -1) if outputs.ndim == 2 else outputs
  if len(labels) == 0:
    return float('nan')
  return float(np.mean(predictions == labels))


def silenced(gate) -> np.ndarray:
  """Per input (rows of the gate's pre-activations): True where no gate unit passes it (every
  pre-activation <= 0), so the classifier sees zeros and no gradient flows below the gate."""
  return np.all(np.asarray(gate) <= 0, axis=-1)


def probe_accuracy(features, labels, seed: int = 0, max_dim: int = 1024,
                   fit_index=None, score_index=None) -> float:
  """Held-out accuracy of a multinomial logistic-regression probe: the thief's simplest decoder.

  Fitted on a random half of (features, labels) after standardization and scored on the other half,
  unless ``fit_index`` / ``score_index`` say which rows to use. Features wider than ``max_dim`` (a
  flattened feature map) are first reduced by a fixed Gaussian random projection to ``max_dim``
  dimensions, which keeps the fit tractable on a CPU.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top  (slow import)
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels).reshape(-1)
  if fit_index is None:
    perm = np.random.default_rng(seed).permutation(len(labels))
    fit_index, score_index = perm[:len(perm) // 2], perm[len(perm) // 2:]
  features = np.asarray(features, np.float64).reshape(len(labels), -1)
  if features.shape[1] > max_dim:
    projection = np.random.default_rng(seed).standard_normal((features.shape[1], max_dim))
    features = features @ (projection / np.sqrt(max_dim))
  fit_labels = labels[fit_index]
  if len(np.unique(fit_labels)) < 2:
    return float(np.mean(labels[score_index] == fit_labels[0]))
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  probe.fit(features[fit_index], fit_labels)
  return float(probe.score(features[score_index], labels[score_index]))


def rounded(value, digits: int = 4):
  """``value`` with every float rounded to ``digits`` decimals (nested dicts and lists too): reports
  show 0.1, not 0.09999999999999998."""
  if isinstance(value, dict):
    return {k: rounded(v, digits) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [rounded(v, digits) for v in value]
  if isinstance(value, (float, np.floating)):
    return round(float(value), digits) if np.isfinite(value) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value
