"""Tests of key replacement / revocation (securenet_jax.replace) and of the scheme configs."""

import importlib

import jax
import numpy as np
import pytest

from securenet_jax import inference
from securenet_jax import keys
from securenet_jax import replace
from securenet_jax import train


def scheme_config(name, idx_dir):
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.dataset.data_dir = idx_dir
  config.key.secret = f'{name}-secret'
  config.eval.clean_baseline = False
  return config


def replace_config(source, **kw):
  from configs import replace_key  # pylint: disable=g-import-not-at-top
  config = replace_key.get_config('smoke')
  config.source_workdir = str(source)
  config.update(kw)
  return config


@pytest.fixture(scope='module')
def universal(tmp_path_factory, idx_dir):
  wd = tmp_path_factory.mktemp('universal')
  train.train_and_evaluate(scheme_config('scheme_universal', idx_dir), str(wd))
  return wd


def test_replace_revokes_old_key_and_registers_new(universal, tmp_path):
  before = jax.tree.leaves(inference.load(str(universal)).params)
  metrics = replace.replace_and_evaluate(replace_config(universal, new_secret='fresh'), str(tmp_path))
  model = inference.load(str(tmp_path))
  assert list(model.keys) == ['default.r2'] and list(model.revoked_keys) == ['default']
  old = inference.load(str(universal)).keys['default']
  assert model.revoked_keys['default'].fingerprint == old.fingerprint
  assert model.keys['default.r2'].fingerprint == keys.derive(
      'fresh', old.geometry, name='default.r2', classes=old.classes).fingerprint
  # Cost: one epoch of fine-tuning against one epoch of original training, on the same data.
  assert metrics['replace_steps'] == metrics['source_steps'] == 16
  assert metrics['replace_cost_ratio'] == pytest.approx(1.0)
  # The report's revoked_acc is what the public API gives with the old key.
  from securenet_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.load(model.config.dataset)
  old_acc = float(np.mean(model.predict(ds.test_images, key=model.revoked_keys['default']) == ds.test_labels))
  assert metrics['revoked_acc'] == pytest.approx(old_acc, abs=1e-6)
  # The source workdir is untouched.
  for a, b in zip(before, jax.tree.leaves(inference.load(str(universal)).params)):
    np.testing.assert_array_equal(a, b)
  # Rerunning the finished job only re-evaluates.
  again = replace.replace_and_evaluate(replace_config(universal, new_secret='fresh'), str(tmp_path))
  assert again['replace_steps'] == 16


def test_replace_errors(universal, tmp_path):
  with pytest.raises(ValueError, match='source_workdir'):
    replace.replace_and_evaluate(replace_config(''), str(tmp_path / 'a'))
  with pytest.raises(FileNotFoundError, match='not a SecureNet-JAX workdir'):
    replace.replace_and_evaluate(replace_config(tmp_path / 'nothing', new_secret='x'), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match='new directory'):
    replace.replace_and_evaluate(replace_config(universal, new_secret='x'), str(universal))
  with pytest.raises(ValueError, match='No active key'):
    replace.replace_and_evaluate(replace_config(universal, new_secret='x', revoke='bob'), str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='nobody can use'):
    replace.replace_and_evaluate(replace_config(universal), str(tmp_path / 'd'))
  with pytest.raises(ValueError, match='already used'):
    replace.replace_and_evaluate(replace_config(universal, new_secret='scheme_universal-secret',
                                                new_key_name='default'), str(tmp_path / 'e'))


def test_next_name():
  assert replace._next_name('default', set()) == 'default.r2'  # pylint: disable=protected-access
  assert replace._next_name('default.r2', {'default.r3'}) == 'default.r4'  # pylint: disable=protected-access


def test_multi_user_revoke_one(tmp_path, idx_dir):
  config = scheme_config('scheme_multi_user', idx_dir)
  metrics = train.train_and_evaluate(config, str(tmp_path / 'multi'))
  assert set(metrics['per_key']) == {'alice', 'bob', 'carol', 'dave'}
  assert all('denied_acc' in m and 'granted_acc' in m for m in metrics['per_key'].values())
  with pytest.raises(ValueError, match='say which one to revoke'):
    replace.replace_and_evaluate(replace_config(tmp_path / 'multi'), str(tmp_path / 'x'))
  metrics = replace.replace_and_evaluate(replace_config(tmp_path / 'multi', revoke='alice'),
                                         str(tmp_path / 'revoked'))
  model = inference.load(str(tmp_path / 'revoked'))
  assert set(model.keys) == {'bob', 'carol', 'dave'} and set(model.revoked_keys) == {'alice'}
  assert model.keys['bob'].classes == (5, 6, 7, 8, 9)
  assert set(metrics['per_key']) == {'bob', 'carol', 'dave'} and 'alice' in metrics['revoked']


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
