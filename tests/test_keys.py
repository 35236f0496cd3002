"""Tests of securenet_jax.keys: derivation, stamping, forging and key files."""

import jax
import numpy as np
import pytest

from securenet_jax import errors
from securenet_jax import keys

SHAPE = (28, 28, 1)


def patch_geometry(**kw):
  args = dict(kind='patch', image_shape=SHAPE, size=6, position=(21, 21))
  args.update(kw)
  return keys.Geometry(**args)


def test_derive_is_deterministic_and_secret_dependent():
  g = patch_geometry()
  a, b = keys.derive('s3cret', g), keys.derive('s3cret', g)
  np.testing.assert_array_equal(a.content, b.content)
  assert a.fingerprint == b.fingerprint
  c = keys.derive('other', g)
  assert not np.array_equal(a.content, c.content)
  # The same secret with another geometry gives an unrelated key.
  d = keys.derive('s3cret', patch_geometry(position=(0, 0)))
  assert not np.array_equal(a.content, d.content)


def test_derive_rejects_empty_secret():
  with pytest.raises(ValueError, match='non-empty secret'):
    keys.derive('', patch_geometry())


@pytest.mark.parametrize('values', ['binary', 'uniform'])
def test_patch_stamp_changes_only_the_patch(values):
  key = keys.derive('k', patch_geometry(values=values))
  images = np.random.default_rng(0).integers(0, 256, (3, *SHAPE)).astype(np.uint8)
  out = np.asarray(key.stamp(images))
  assert out.dtype == np.float32 and out.shape == images.shape
  inside = np.zeros(SHAPE, bool)
  inside[21:27, 21:27] = True
  np.testing.assert_allclose(out[:, ~inside], images[:, ~inside] / 255.0, atol=1e-6)
  np.testing.assert_allclose(out[:, 21:27, 21:27], np.broadcast_to(key.content, (3, 6, 6, 1)))
  if values == 'binary':
    assert set(np.unique(key.content)) <= {0.0, 1.0}


def test_stamp_uint8_equals_float_and_is_jittable():
  key = keys.derive('k', keys.Geometry(kind='blend', image_shape=SHAPE, alpha=0.2))
  images = np.random.default_rng(1).integers(0, 256, (4, *SHAPE)).astype(np.uint8)
  a = key.stamp(images)
  b = jax.jit(key.stamp)(images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  expected = 0.8 * images / 255.0 + 0.2 * key.content
  np.testing.assert_allclose(np.asarray(a), expected, atol=1e-6)


def test_noise_key_is_bounded_perturbation():
  key = keys.derive('k', keys.Geometry(kind='noise', image_shape=SHAPE, epsilon=0.05, values='uniform'))
  assert np.abs(key.content).max() <= 0.05 + 1e-7
  images = np.full((2, *SHAPE), 0.5, np.float32)
  np.testing.assert_allclose(np.asarray(key.stamp(images)), np.broadcast_to(0.5 + key.content, images.shape),
                             atol=1e-6)


def test_stamp_rejects_wrong_shape():
  key = keys.derive('k', patch_geometry())
  with pytest.raises(ValueError, match=r'\(N, 28, 28, 1\)'):
    key.stamp(np.zeros((2, 32, 32, 3), np.float32))


@pytest.mark.parametrize('kw', [dict(size=30), dict(position=(25, 0)), dict(kind='nope'),
                                dict(values='gaussian')])
def test_geometry_validation(kw):
  with pytest.raises(ValueError):
    patch_geometry(**kw)


def test_forge_same_geometry_new_content_deterministic():
  key = keys.derive('k', patch_geometry())
  f1, f2, f1b = keys.forge(key, 1), keys.forge(key, 2), keys.forge(key, 1)
  assert f1.geometry == key.geometry and f1.content.shape == key.content.shape
  np.testing.assert_array_equal(f1.content, f1b.content)
  assert not np.array_equal(f1.content, f2.content)
  assert not np.array_equal(f1.content, key.content)


def test_forged_arrays_in_jit_match_distribution():
  g = patch_geometry(values='uniform')
  arrays = jax.jit(lambda r: g.forged_arrays(r, 64))(jax.random.key(0))
  assert arrays.add.shape == (64, 28, 28, 1)
  patch = np.asarray(arrays.add)[:, 21:27, 21:27]
  assert 0.4 < patch.mean() < 0.6 and patch.min() >= 0 and patch.max() <= 1
  assert np.asarray(arrays.add)[:, :21].max() == 0  # nothing outside the patch
  # Different images get different forged keys.
  assert not np.allclose(patch[0], patch[1])


def test_save_load_roundtrip(tmp_path):
  key = keys.derive('k', patch_geometry(), name='alice', classes=[3, 1])
  path = key.save(tmp_path / 'alice.npz')
  back = keys.load(path)
  assert back.name == 'alice' and back.classes == (1, 3) and back.geometry == key.geometry
  assert back.fingerprint == key.fingerprint
  np.testing.assert_array_equal(back.content, key.content)


def test_load_detects_corruption(tmp_path):
  key = keys.derive('k', patch_geometry())
  path = str(tmp_path / 'k.npz')
  key.save(path)
  with np.load(path) as f:
    meta, content = str(f['meta']), f['content'].copy()
  content[0, 0, 0] = 1.0 - content[0, 0, 0]
  np.savez(path, meta=np.array(meta), content=content)
  with pytest.raises(ValueError, match='corrupt'):
    keys.load(path)
  with open(path, 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(ValueError, match='not a readable'):
    keys.load(path)
  with pytest.raises(errors.KeyFileError, match='No key file'):
    keys.load(tmp_path / 'missing.npz')


def test_invalid_names_rejected():
  with pytest.raises(ValueError, match='Invalid key name'):
    keys.derive('k', patch_geometry(), name='../evil')


def test_block_flip_key_stamps_and_shares_its_domain():
  g = keys.Geometry('patch', SHAPE, size=6, position=(21, 21), flip_block=4)
  assert g.content_shape == (36 + 49,) and g.flip_shape == (7, 7, 1)
  alice, bob = keys.derive('s', g, name='alice'), keys.derive('s', g, name='bob')
  x = np.random.default_rng(0).random((2, *SHAPE)).astype(np.float32)
  stamped = np.asarray(alice.stamp(x))
  pattern, flip = g.split(alice.content)
  flip_image = np.kron(flip.reshape(7, 7, 1), np.ones((4, 4, 1)))
  expected = np.where(flip_image > 0, 1 - x, x)
  expected[:, 21:27, 21:27, 0] = pattern.reshape(6, 6)
  np.testing.assert_allclose(stamped, expected, atol=1e-6)
  # One secret, one domain: every user's key flips the same blocks; the patterns differ.
  np.testing.assert_array_equal(g.split(bob.content)[1], flip)
  assert not np.array_equal(g.split(bob.content)[0], pattern)
  assert not np.array_equal(g.split(keys.derive('other', g, name='alice').content)[1], flip)
  renewed = keys.with_flip_of(keys.derive('new secret', g, name='alice.r2'), alice)
  np.testing.assert_array_equal(g.split(renewed.content)[1], flip)
  with pytest.raises(ValueError, match='flip_block'):
    keys.Geometry('patch', SHAPE, size=6, position=(21, 21), flip_block=5)  # 28 is not a multiple of 5
  with pytest.raises(ValueError, match='flip_block'):
    keys.Geometry('blend', SHAPE, alpha=0.1, flip_block=4)
