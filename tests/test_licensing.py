"""Tests of securenet_jax.licensing: grants, the keys of a training run, replacement plans."""

import pytest

from securenet_jax import errors
from securenet_jax import licensing
from securenet_jax import registry
from securenet_jax.workdir import Workdir


def test_setup_keys_registers_and_guards_secret(smoke_config, tmp_path):
  (key,), revoked = licensing.training_keys(smoke_config, Workdir(tmp_path), (28, 28, 1), 10)
  assert revoked == [] and key.classes == tuple(range(10)) and key.scheme == 'universal'
  assert registry.KeyRegistry.load(tmp_path / 'keys').active['default'].fingerprint == key.fingerprint
  (again,), _ = licensing.training_keys(smoke_config, Workdir(tmp_path), (28, 28, 1), 10)
  assert again.fingerprint == key.fingerprint
  wrong = smoke_config.copy_and_resolve_references()
  wrong.key.secret = 'another secret'
  with pytest.raises(errors.KeyFileError, match='does not derive'):
    licensing.training_keys(wrong, Workdir(tmp_path), (28, 28, 1), 10)
  # Without a secret, each new workdir gets its own random key.
  fresh = smoke_config.copy_and_resolve_references()
  fresh.key.secret = ''
  k1 = licensing.training_keys(fresh, Workdir(tmp_path / 'x'), (28, 28, 1), 10)[0][0]
  k2 = licensing.training_keys(fresh, Workdir(tmp_path / 'y'), (28, 28, 1), 10)[0][0]
  assert k1.fingerprint != k2.fingerprint


def test_license_grants_from_matrix_and_tiers(smoke_config):
  config = smoke_config.copy_and_resolve_references()
  config.license.users = ('a', 'b')
  config.license.matrix = ((1, 1, 0, 0, 0, 0, 0, 0, 0, 0), (0,) * 9 + (1,))
  grants = licensing.grants(config.license, 10)
  assert [g['classes'] for g in grants] == [(0, 1), (9,)]
  config.license.tiers = ('basic', 'full')
  with pytest.raises(ValueError, match='partition'):
    config.license.groups = ((0, 1), (2,))
    licensing.grants(config.license, 10)
  config.license.groups = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
  grants = licensing.grants(config.license, 10)
  assert grants[0]['tier'] == 'basic' and grants[0]['groups'] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
  for bad in (((1,) * 10,), ((1,) * 10, (2,) * 10), ((1,) * 10, (0,) * 10)):
    config.license.matrix = bad
    with pytest.raises(ValueError):
      licensing.grants(config.license, 10)


def test_next_name():
  assert licensing.next_name('default', set()) == 'default.r2'
  assert licensing.next_name('default.r2', {'default.r3'}) == 'default.r4'
