"""The security suite end to end (smoke sizes) and its building blocks."""

import json
import os

import numpy as np
import pytest

from securenet_jax import errors
from securenet_jax import keys
from securenet_jax import security
from securenet_jax import train
from securenet_jax.security import sections

FLAT = ('authorized_acc', 'forged_acc_max', 'leak_probe_acc', 'recovered_acc', 'finetune_acc@0.01',
        'scratch_acc@0.01', 'pgd_unprotected_robust_acc', 'pgd_keyless_robust_acc',
        'pgd_adaptive_robust_acc', 'backdoor_finetune_asr_licensed', 'backdoor_finetune_asr_unprotected')


def test_near_and_shifted_keys():
  geometry = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21))
  key = keys.derive('s', geometry)
  same = sections.near_key(key, 0.0, 0)
  np.testing.assert_array_equal(same.content, key.content)
  changed = [np.mean(sections.near_key(key, 1.0, seed).content != key.content) for seed in range(20)]
  assert 0.3 < np.mean(changed) < 0.7  # binary content: a redrawn pixel changes half the time
  # 25% of the 36 pixels redrawn: at most 9 differ
  assert np.sum(sections.near_key(key, 0.25, 3).content != key.content) <= 9
  shifted = sections.shifted_keys(key, 2)
  # the key sits 1 px from the bottom-right corner: only up and left fit for a 2 px shift
  assert sorted(k.geometry.position for k in shifted) == [(19, 21), (21, 19)]
  assert all(np.array_equal(k.content, key.content) for k in shifted)


def test_near_keys_of_a_block_flip_key():
  geometry = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21), flip_block=4)
  key = keys.derive('s', geometry)
  assert key.content.shape == (36 + 49,)
  np.testing.assert_array_equal(sections.near_key(key, 0.0, 0).content, key.content)
  near = sections.near_key(key, 0.25, 3)
  assert near.content.shape == key.content.shape and 0 < np.sum(near.content != key.content) <= 21
  assert sorted(k.geometry.position for k in sections.shifted_keys(key, 1)) == [(20, 21), (21, 20), (21, 22), (22, 21)]


def test_default_budgets_follow_the_image_type():
  assert sections.default_eps((28, 28, 1)) == (0.1, 0.2)
  assert sections.default_eps((32, 32, 3)) == (8 / 255,)
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  assert tuple(security_config.get_config().adversarial.eps) == ()  # () = by image type


@pytest.fixture
def trained(trained_workdir):
  return trained_workdir


@pytest.mark.slow
def test_smoke_suite_writes_every_figure(trained, tmp_path):
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  config = security_config.get_config('smoke')
  config.target_workdir = trained
  flat = security.run(config, str(tmp_path), train_fn=train.train_variables)
  with open(tmp_path / 'report' / 'security.json') as f:
    report = json.load(f)
  for k in FLAT:
    assert isinstance(report[k], float) and 0.0 <= report[k] <= 1.0, (k, report.get(k))
  assert set(report['sections']) == set(security.SECTIONS)
  # the automatic budgets of gray images: 0.1 gives the flat figures, 0.2 the @0.2 ones
  assert set(report['sections']['adversarial']) >= {'eps=0.1', 'eps=0.2'}
  assert 0.0 <= report['pgd_keyless_robust_acc@0.2'] <= 1.0
  assert 'backdoor_finetune_asr_licensed_before' in report
  assert isinstance(report['backdoor_finetune_open_before'], int)  # thief inputs the stolen gate passes
  assert flat == {k: v for k, v in report.items() if k in flat}
  assert os.path.getsize(tmp_path / 'report' / 'security.png') > 0
  assert '# Security report' in (tmp_path / 'report' / 'security.md').read_text()
  # The figures say what they should about a model that learned its license (conftest.effects_config).
  assert report['authorized_acc'] >= 0.9 and report['forged_acc_mean'] <= 0.25
  assert report['leak_probe_acc'] <= 0.3 and report['sections']['leakage']['unprotected_probe_acc'] >= 0.8
  assert report['sections']['forgery']['forged_quantiles']['q50'] <= 0.25


def test_fast_sections_on_a_trained_model(trained, tmp_path):
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  config = security_config.get_config('smoke')
  config.target_workdir = trained
  config.sections = ('forgery', 'leakage')
  flat = security.run(config, str(tmp_path), train_fn=train.train_variables)
  assert flat['authorized_acc'] >= 0.9 and flat['forged_acc_mean'] <= 0.25 and flat['no_key_acc'] <= 0.2
  assert flat['leak_probe_acc'] <= 0.3 and flat['no_key_silenced_frac'] >= 0.95
  report = json.loads((tmp_path / 'report' / 'security.json').read_text())
  # Shifting the key by a pixel or redrawing all of it unlocks nothing.
  assert report['sections']['forgery']['near_keys']['1.0']['max'] <= 0.3


def test_bad_requests(trained, tmp_path):
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  config = security_config.get_config('smoke')
  run = lambda workdir: security.run(config, str(workdir), train_fn=train.train_variables)
  with pytest.raises(errors.ConfigError, match='No target workdir') as info:
    run(tmp_path)
  assert 'target_workdir' in info.value.hint
  config.target_workdir = trained
  config.sections = ('forgery,telepathy',)  # as --config.sections=forgery,telepathy arrives
  with pytest.raises(errors.ConfigError, match=r"Unknown security sections \['telepathy'\]"):
    run(tmp_path)
  config.sections = ('forgery',)
  with pytest.raises(errors.ConfigError, match='must differ'):
    run(trained)
  config.key_name = 'nobody'
  with pytest.raises(ValueError, match='No active key'):
    run(tmp_path)


def test_theft_section_without_the_unprotected_twin(tmp_path):
  """theft.unprotected=False steals the licensed model alone (half the cost); the report says the
  twin was not run instead of failing."""
  import types  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  from securenet_jax import models  # pylint: disable=g-import-not-at-top
  from securenet_jax.security import report  # pylint: disable=g-import-not-at-top
  module = models.create('lenet5', num_classes=4)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  model = types.SimpleNamespace(module=module, variables=variables)
  rng = np.random.default_rng(0)
  images, labels = rng.random((40, 28, 28, 1)).astype(np.float32), np.arange(40) % 4
  t = types.SimpleNamespace(licensed=model, unprotected=model, module=module, train_images=images,
                            train_labels=labels, test_images=images[:16], test_labels=labels[:16])
  config = security_config.get_config('smoke')
  config.theft.fractions = (0.5,)
  config.theft.moves = ('scratch', 'finetune')
  config.theft.adam_learning_rates, config.theft.sgd_learning_rates = (1e-3,), ()
  config.theft.epochs, config.theft.min_steps, config.theft.batch_size = 1, 2, 8
  config.theft.unprotected = False
  flat, detail = sections.theft(t, config)
  assert set(flat) == {'theft_gain@0.50', 'theft_scratch_acc@0.50', 'theft_best_move@0.50'}
  assert set(detail['0.50']) == {'licensed'} and detail['0.50']['licensed']['best_move'] == 'finetune'
  text = report.markdown(flat, {'theft': detail}, {})
  assert '| finetune |' in text and 'not run' in text
  report.figure(str(tmp_path / 'f.png'), {'theft': detail})
  assert os.path.getsize(tmp_path / 'f.png') > 0
  config.theft.unprotected = True
  flat, detail = sections.theft(t, config)
  assert 'theft_gain_unprotected@0.50' in flat and set(detail['0.50']) == {'licensed', 'unprotected'}
