"""Tests of key replacement / revocation (securenet_jax.replace) and of the scheme configs."""

import importlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from securenet_jax import errors
from securenet_jax import inference
from securenet_jax import keys
from securenet_jax import replace
from securenet_jax import train
from tests import conftest


def scheme_config(name, idx_dir):
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.dataset.data_dir = idx_dir
  config.key.secret = f'{name}-secret'
  config.eval.clean_baseline = False
  config.objective.clean_distill_weight = 0.0  # its teacher would be the baseline
  return config


def replace_config(source, variant='smoke', **kw):
  from configs import replace_key  # pylint: disable=g-import-not-at-top
  config = replace_key.get_config(variant)
  config.source_workdir = str(source)
  config.update(kw)
  return config


@pytest.fixture(scope='module')
def replaced(tmp_path_factory, multi_key_workdir):
  """The multi-key model with its 'full' key replaced (new secret), trained once per run."""
  def build(path):
    replace.replace_and_evaluate(effects_replace_config(multi_key_workdir), path)
  return conftest.shared_dir(tmp_path_factory, 'replaced_multi_key', build)


def effects_replace_config(source):
  """configs/replace_key.py's recipe on the generated data: 6 epochs of all 2048 images (192 steps) at
  learning rate 5e-3 (the default 2e-3 revokes the old key of this small model only after more steps:
  revoked 0.88 after 192)."""
  config = replace_config(source, '', new_secret='fresh', revoke='full', train_fraction=1.0, num_epochs=6,
                          learning_rate=5e-3)
  config.eval.num_forged = 5
  return config


def _report(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / 'report' / 'metrics.json').read_text())


def test_replacement_registers_the_new_key_and_revokes_the_old(multi_key_workdir, replaced):
  source = inference.load(multi_key_workdir)
  model = inference.load(replaced)
  assert list(model.keys) == ['full.r2', 'clothing', 'basic'] and list(model.revoked_keys) == ['full']
  old = source.keys['full']
  assert model.revoked_keys['full'].fingerprint == old.fingerprint
  assert model.keys['full.r2'].fingerprint == keys.derive(
      'fresh', old.geometry, name='full.r2', scheme=old.scheme, classes=old.classes).fingerprint
  assert model.keys['clothing'].fingerprint == source.keys['clothing'].fingerprint
  metrics = _report(replaced)
  # Cost: 6 epochs on the whole (generated) training set against the source's 12.
  assert metrics['replace_steps'] == 6 * 32 and metrics['source_steps'] == 12 * 32
  assert metrics['replace_cost_ratio'] == pytest.approx(1 / 2, abs=1e-4)
  # The report's revoked_acc is what the public API gives with the old key.
  from securenet_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.load(model.config.dataset)
  old_acc = float(np.mean(model.predict(ds.test_images, key=model.revoked_keys['full']) == ds.test_labels))
  assert metrics['revoked_acc'] == pytest.approx(old_acc, abs=1e-4)


def test_replacement_works_the_new_key_and_stops_the_old(multi_key_workdir, replaced):
  before, after = _report(multi_key_workdir), _report(replaced)
  new = after['per_key']['full.r2']['granted_acc']
  assert new >= 0.85 and new >= before['per_key']['full']['granted_acc'] - 0.05
  assert after['revoked']['full']['revoked_acc'] <= new - 0.2
  assert after['no_key_acc'] <= 0.2 and after['forged_acc_max'] <= 0.25
  # The keys that stay keep working.
  for name in ('clothing', 'basic'):
    assert after['per_key'][name]['granted_acc'] >= before['per_key'][name]['granted_acc'] - 0.05, name
  assert after['per_key']['clothing']['denied_acc'] <= 0.05


def test_source_untouched_and_rerun_only_evaluates(multi_key_workdir, replaced, tmp_path):
  before = jax.tree.leaves(inference.load(multi_key_workdir).params)
  copy = tmp_path / 'replaced'
  shutil.copytree(replaced, copy)
  again = replace.replace_and_evaluate(effects_replace_config(multi_key_workdir), str(copy))
  assert again['replace_steps'] == 6 * 32
  for a, b in zip(before, jax.tree.leaves(inference.load(multi_key_workdir).params)):
    np.testing.assert_array_equal(a, b)


def test_derived_config_keeps_distilling_the_source_baseline_only_where_there_is_one():
  from configs import default  # pylint: disable=g-import-not-at-top
  rcfg = replace_config('/nowhere', '', new_secret='x')
  with_baseline = default.get_config()  # the default distills its baseline
  assert replace.derived_config(rcfg, with_baseline, 1000).objective.clean_distill_weight == 1.0
  rcfg.clean_distill_weight = 0.0
  assert replace.derived_config(rcfg, with_baseline, 1000).objective.clean_distill_weight == 0.0
  rcfg.clean_distill_weight = 1.0
  without = default.get_config()
  without.eval.clean_baseline, without.objective.clean_distill_weight = False, 0.0
  derived = replace.derived_config(rcfg, without, 1000)
  assert derived.objective.clean_distill_weight == 0.0 and not derived.eval.clean_baseline
  assert derived.dataset.train_limit == 500 and derived.train.num_epochs == rcfg.num_epochs


def test_replace_errors(trained_workdir, tmp_path):
  universal = trained_workdir
  with pytest.raises(errors.ConfigError, match='No source workdir') as info:
    replace.replace_and_evaluate(replace_config(''), str(tmp_path / 'a'))
  assert 'source_workdir' in info.value.hint
  with pytest.raises(errors.WorkdirError, match='not a SecureNet-JAX workdir'):
    replace.replace_and_evaluate(replace_config(tmp_path / 'nothing', new_secret='x'), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match='new directory'):
    replace.replace_and_evaluate(replace_config(universal, new_secret='x'), str(universal))
  with pytest.raises(ValueError, match='No active key'):
    replace.replace_and_evaluate(replace_config(universal, new_secret='x', revoke='bob'), str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='nobody can use'):
    replace.replace_and_evaluate(replace_config(universal), str(tmp_path / 'd'))
  no_baseline = tmp_path / 'no_baseline'
  shutil.copytree(universal, no_baseline, ignore=shutil.ignore_patterns('baseline'))
  with pytest.raises(errors.WorkdirError, match='baseline, which is missing') as info:
    replace.replace_and_evaluate(replace_config(no_baseline, new_secret='x'), str(tmp_path / 'f'))
  assert 'clean_distill_weight=0' in info.value.hint and not (tmp_path / 'f').exists()
  with pytest.raises(ValueError, match='already used'):
    replace.replace_and_evaluate(replace_config(universal, new_secret='effects',
                                                new_key_name='default'), str(tmp_path / 'e'))


@pytest.mark.slow
def test_multi_user_revoke_one(tmp_path, multi_key_workdir):
  with pytest.raises(errors.ConfigError, match='say which one to revoke'):
    replace.replace_and_evaluate(replace_config(multi_key_workdir), str(tmp_path / 'x'))
  metrics = replace.replace_and_evaluate(replace_config(multi_key_workdir, revoke='clothing'),
                                         str(tmp_path / 'revoked'))
  model = inference.load(str(tmp_path / 'revoked'))
  assert set(model.keys) == {'full', 'basic'} and set(model.revoked_keys) == {'clothing'}
  assert model.keys['basic'].tier == 'basic' and model.revoked_keys['clothing'].classes == (0, 1, 2, 3, 4)
  assert set(metrics['per_key']) == {'full', 'basic'} and 'clothing' in metrics['revoked']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['scheme_scoped', 'scheme_tiered'])
def test_scheme_configs_run_and_report(name, tmp_path, idx_dir):
  metrics = train.train_and_evaluate(scheme_config(name, idx_dir), str(tmp_path))
  model = inference.load(str(tmp_path))
  if name == 'scheme_scoped':
    assert list(model.keys) == ['clothing'] and model.keys['clothing'].classes == (0, 1, 2, 3, 4)
    assert {'granted_acc', 'denied_acc'} <= set(metrics['per_key']['clothing'])
  else:
    basic, full = model.keys['basic'], model.keys['full']
    assert basic.tier == 'basic' and full.tier == 'full' and len(basic.groups) == 4
    assert {'coarse_acc', 'fine_acc', 'fine_even_acc'} <= set(metrics['per_key']['basic'])
    assert metrics['per_key']['basic']['fine_even_acc'] == pytest.approx(
        np.mean([1 / 5, 1, 1 / 5, 1 / 5, 1 / 5, 1 / 3, 1 / 5, 1 / 3, 1, 1 / 3]), abs=0.05)
  assert (tmp_path / 'report' / 'summary.md').read_text().count('| active |') == len(model.keys)
