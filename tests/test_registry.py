"""Tests of securenet_jax.registry: the key registry of a workdir."""

import os

import pytest

from securenet_jax import errors
from securenet_jax import keys
from securenet_jax import registry


def patch_geometry(**kw):
  args = dict(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21))
  args.update(kw)
  return keys.Geometry(**args)


def test_registry_add_revoke_reload(tmp_path):
  reg = registry.KeyRegistry(tmp_path / 'keys')
  a = keys.derive('a', patch_geometry(), name='a')
  b = keys.derive('b', patch_geometry(), name='b')
  reg.add(a)
  reg.add(b)
  with pytest.raises(ValueError, match='already'):
    reg.add(a)
  reg.revoke('a')
  back = registry.KeyRegistry.load(tmp_path / 'keys')
  assert list(back.active) == ['b'] and list(back.revoked) == ['a']
  assert back.revoked['a'].fingerprint == a.fingerprint
  assert not [p for p in os.listdir(tmp_path / 'keys') if p.startswith('.tmp')]


def test_registry_validation(tmp_path):
  reg = registry.KeyRegistry(tmp_path)
  reg.add(keys.derive('a', patch_geometry(), name='a'))
  # A key file swapped for another key is caught.
  keys.derive('other', patch_geometry(), name='a').save(tmp_path / 'a.npz')
  with pytest.raises(errors.KeyFileError, match='does not match'):
    registry.KeyRegistry.load(tmp_path)
  (tmp_path / 'registry.json').write_text('{"format": "something else"}')
  with pytest.raises(errors.KeyFileError, match='corrupt or not a registry'):
    registry.KeyRegistry.load(tmp_path)
  (tmp_path / 'registry.json').write_text('{truncated')
  with pytest.raises(ValueError):
    registry.KeyRegistry.load(tmp_path)


def test_missing_registry(tmp_path):
  assert not registry.KeyRegistry.exists(tmp_path)
  with pytest.raises(errors.KeyFileError, match='No key registry'):
    registry.KeyRegistry.load(tmp_path)
