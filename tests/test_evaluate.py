"""Tests of securenet_jax.evaluate: the report of a trained workdir and the metrics behind it."""

import json
import pathlib

import numpy as np
import pytest

from securenet_jax import evaluate
from securenet_jax import inference
from securenet_jax import metrics
from securenet_jax import workdir as workdir_lib
from securenet_jax.data import load as load_data


def test_report_files_and_design_metric_names(trained_workdir):
  report = pathlib.Path(trained_workdir) / 'report'
  values = json.loads((report / 'metrics.json').read_text())
  for name in ('clean_acc', 'authorized_acc', 'no_key_acc', 'forged_acc_mean', 'forged_acc_max',
               'leak_argmin_acc', 'leak_probe_acc', 'leak_probe_features_acc', 'no_key_silenced_frac'):
    assert 0.0 <= values[name] <= 1.0, name
    assert values[name] == round(values[name], 4), name  # rounded: no float noise in the report
  assert values['num_forged'] == 5 and values['num_test'] == 512 and values['forged_num_test'] == 512
  summary = (report / 'summary.md').read_text()
  assert 'authorized_acc' in summary and 'leak_probe_acc' in summary
  assert (report / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_report_figures_are_what_the_public_api_gives(trained_workdir):
  model = inference.load(trained_workdir)
  data = load_data(model.config.dataset)
  key = model.keys['default']
  values = json.loads((pathlib.Path(trained_workdir) / 'report' / 'metrics.json').read_text())
  assert values['authorized_acc'] == pytest.approx(
      metrics.accuracy(model.logits(data.test_images, key), data.test_labels), abs=1e-4)
  forged = evaluate.forged_accuracies(model, data.test_images, data.test_labels, key, 5,
                                      model.config.eval.forge_seed)
  assert values['forged_acc_max'] == pytest.approx(forged.max(), abs=1e-4)
  assert values['clean_acc'] == pytest.approx(
      metrics.accuracy(inference.load(trained_workdir, baseline=True).logits(data.test_images),
                       data.test_labels), abs=1e-4)


def test_silenced_means_no_gate_unit_above_zero():
  gate = np.array([[-1.0, 0.0], [-1.0, 1e-6], [0.5, 2.0]])
  np.testing.assert_array_equal(metrics.silenced(gate), [True, False, False])


def test_license_metrics_needs_forged_keys(trained_workdir):
  model = inference.load(trained_workdir)
  images = np.zeros((4, 28, 28, 1), np.uint8)
  with pytest.raises(ValueError, match='num_forged'):
    evaluate.license_metrics(model, images, np.zeros(4, np.int64), model.keys['default'], 0, 0)


def test_key_metrics_of_a_scoped_key(trained_workdir):
  """granted/denied split by the key's classes, and the denied probe only where classes are denied."""
  model = inference.load(trained_workdir)
  data = load_data(model.config.dataset)
  scoped = model.keys['default'].replace(name='scoped', classes=(0, 1, 2, 3, 4))
  out = evaluate.key_metrics(model, data.test_images, data.test_labels, scoped)
  granted = np.isin(data.test_labels, (0, 1, 2, 3, 4))
  predictions = model.predict(data.test_images, scoped)
  assert out['granted_acc'] == pytest.approx(np.mean(predictions[granted] == data.test_labels[granted]))
  assert out['denied_acc'] == pytest.approx(np.mean(predictions[~granted] == data.test_labels[~granted]))
  assert 'denied_probe_acc' in out
  full = evaluate.key_metrics(model, data.test_images, data.test_labels, model.keys['default'])
  assert 'denied_acc' not in full and full['granted_acc'] == full['all_classes_acc']


def _with_keys(model: inference.LicensedModel, keys) -> inference.LicensedModel:
  """The same trained variables behind another key set (None: no keys, the keyless model)."""
  return inference.LicensedModel(model.module, model.variables, model.image_shape, model.num_classes,
                                 keys=keys, config=model.config)


def test_scoped_report_compares_like_for_like(trained_workdir):
  """A scoped key's headline is its granted accuracy; authorized_minus_clean sets it against the
  clean model on the same classes, not on all ten."""
  model = inference.load(trained_workdir)
  data = load_data(model.config.dataset)
  scoped = model.keys['default'].replace(name='scoped', classes=(0, 1, 2, 3, 4))
  scoped_model = _with_keys(model, {'scoped': scoped})
  # As the 'clean' model, the licensed one without a key: its constant output scores differently on
  # five classes than on ten, which a perfect baseline of this easy data would not.
  baseline = _with_keys(model, None)
  out = evaluate.evaluate_and_report(model.config, workdir_lib.Workdir(trained_workdir), data,
                                     scoped_model, baseline, write=False)
  granted = np.isin(data.test_labels, (0, 1, 2, 3, 4))
  clean_granted = np.mean(baseline.predict(data.test_images)[granted] == data.test_labels[granted])
  assert out['per_key']['scoped']['clean_granted_acc'] == pytest.approx(clean_granted, abs=1e-4)
  assert out['authorized_acc'] == out['per_key']['scoped']['granted_acc']
  assert out['authorized_minus_clean'] == pytest.approx(out['authorized_acc'] - clean_granted, abs=2e-4)
  assert abs(clean_granted - out['clean_acc']) > 0.02  # else the test could not tell them apart


def test_basic_key_is_scored_on_the_coarse_groups_it_is_granted(trained_workdir):
  """A basic-tier key is granted the label's coarse group: its granted accuracy (the headline when it
  is the first key) and the clean model's figure beside it count an argmax in the right group."""
  model = inference.load(trained_workdir)
  data = load_data(model.config.dataset)
  groups = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
  basic = model.keys['default'].replace(name='basic', tier='basic', groups=groups)
  baseline = _with_keys(model, None)  # as in the test above: a constant output, far from its coarse score
  out = evaluate.evaluate_and_report(model.config, workdir_lib.Workdir(trained_workdir), data,
                                     _with_keys(model, {'basic': basic}), baseline, write=False)
  group_of = np.array([0] * 5 + [1] * 5)
  labels = data.test_labels
  coarse = np.mean(group_of[model.predict(data.test_images, key=basic)] == group_of[labels])
  clean_coarse = np.mean(group_of[baseline.predict(data.test_images)] == group_of[labels])
  per_key = out['per_key']['basic']
  assert per_key['granted_acc'] == pytest.approx(coarse, abs=1e-4)
  assert per_key['coarse_acc'] == per_key['granted_acc']
  assert out['authorized_acc'] == per_key['granted_acc']
  assert per_key['clean_granted_acc'] == pytest.approx(clean_coarse, abs=1e-4)
  assert clean_coarse - out['clean_acc'] > 0.2  # else the test could not tell coarse from fine


def test_report_forwards_the_test_set_once_per_key(trained_workdir):
  """The headline and the per-key figures share one forward pass of the test set with each key."""
  model = inference.load(trained_workdir)
  data = load_data(model.config.dataset)
  calls = []
  forward = model.logits
  model.logits = lambda images, key=None: calls.append((len(images), key)) or forward(images, key)
  out = evaluate.evaluate_and_report(model.config, workdir_lib.Workdir(trained_workdir), data, model,
                                     None, write=False)
  real = model.keys['default'].fingerprint
  assert [n for n, key in calls if key is not None and key.fingerprint == real] == [len(data.test_labels)]
  assert sum(key is not None for _, key in calls) == 1 + model.config.eval.num_forged
  assert out['authorized_acc'] == pytest.approx(
      metrics.accuracy(forward(data.test_images, model.keys['default']), data.test_labels), abs=1e-4)
