"""Tests of the public inference API on a workdir trained by the real job (smoke size)."""

import jax
import numpy as np
import pytest

from securenet_jax import errors
from securenet_jax import inference
from securenet_jax import keys
from tests.conftest import make_images


@pytest.fixture
def workdir(trained_workdir):
  return trained_workdir


def test_load_and_predict(workdir):
  model = inference.load(workdir)
  assert list(model.keys) == ['default'] and model.revoked_keys == {}
  key = model.keys['default']
  images, _ = make_images(37, seed=5)
  images = images[..., None]
  logits = model.logits(images, key=key)
  assert logits.shape == (37, 10) and logits.dtype == np.float32
  np.testing.assert_array_equal(model.predict(images, key=key), np.argmax(logits, -1))
  # uint8 and float inputs, and a key by name or loaded from its file, give the same answer.
  np.testing.assert_allclose(model.logits(images.astype(np.float32) / 255.0, key='default'), logits,
                             atol=1e-5)
  from_file = keys.load(f'{workdir}/keys/default.npz')
  np.testing.assert_allclose(model.logits(images, key=from_file), logits, atol=1e-6)
  # Batch size does not change results (chunking and padding are invisible).
  np.testing.assert_allclose(model.logits(images[:5], key=key), logits[:5], atol=1e-5)
  assert model.logits(images).shape == (37, 10)  # no key


def test_keys_by_object_and_by_name_after_the_registry_changes(workdir):
  # The API remembers the last key object it stamped with; a name is looked up every time.
  model = inference.load(workdir)
  images = make_images(6, seed=3)[0][..., None]
  first, other = model.keys['default'], keys.forge(model.keys['default'], seed=4)
  fresh = inference.load(workdir)
  expected = {'first': fresh.logits(images, first), 'other': fresh.logits(images, other)}
  assert not np.allclose(expected['first'], expected['other'])
  for name, key in [('first', first), ('other', other), ('first', first), ('first', first)]:
    np.testing.assert_array_equal(model.logits(images, key), expected[name])
  np.testing.assert_array_equal(model.logits(images, 'default'), expected['first'])
  model.keys['default'] = other  # the name now means another key
  np.testing.assert_array_equal(model.logits(images, 'default'), expected['other'])
  np.testing.assert_array_equal(model.logits(images[1:2]), fresh.logits(images[1:2]))  # then no key


def test_images_of_every_layout_pass_the_check():
  from securenet_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  base = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
  for images in (base, base[:, ::-1], np.asfortranarray(base), base.view(np.memmap), list(base)):
    checked = images_lib.check(images, (4, 4, 1))
    np.testing.assert_array_equal(images_lib.check(images, np.array([4, 4, 1])), checked)  # any sequence
    assert type(checked) is np.ndarray and checked.dtype == np.uint8  # pylint: disable=unidiomatic-typecheck
    np.testing.assert_array_equal(checked, np.asarray(images))
  with pytest.raises(ValueError, match=r'shape \(N, 4, 4, 3\), got shape \(2, 4, 4, 1\)'):
    images_lib.check(base, (4, 4, 3))
  with pytest.raises(ValueError, match=r'shape \(N, 4, 4, 1\)'):
    images_lib.check(base[0], (4, 4, 1))


@pytest.mark.parametrize('images, match', [
    (np.zeros((2, 28, 28), np.uint8), r'NHWC images of shape \(N, 28, 28, 1\)'),
    (np.zeros((2, 32, 32, 1), np.uint8), r'NHWC images of shape \(N, 28, 28, 1\)'),
    (np.zeros((2, 28, 28, 1), np.int32), 'uint8 images in 0..255 or float'),
    (np.full((2, 28, 28, 1), 255.0, np.float32), r'in \[0, 1\]'),
    (np.full((2, 28, 28, 1), np.nan, np.float32), r'finite and in \[0, 1\]'),
])
def test_bad_images_raise(workdir, images, match):
  model = inference.load(workdir)
  with pytest.raises(ValueError, match=match):
    model.logits(images)


def test_bad_keys_raise(workdir):
  model = inference.load(workdir)
  images = np.zeros((2, 28, 28, 1), np.uint8)
  other_shape = keys.derive('x', keys.Geometry(kind='patch', image_shape=(32, 32, 3), size=4,
                                               position=(0, 0)))
  with pytest.raises(ValueError, match=r'made for images of shape \(32, 32, 3\)'):
    model.logits(images, key=other_shape)
  with pytest.raises(ValueError, match='No active key named'):
    model.logits(images, key='nobody')
  with pytest.raises(ValueError, match='must be a LicenseKey'):
    model.logits(images, key=42)


def test_load_errors(tmp_path):
  with pytest.raises(errors.WorkdirError, match='not a SecureNet-JAX workdir'):
    inference.load(str(tmp_path))


def test_exported_artifact_round_trips_bit_exactly(workdir, tmp_path):
  model = inference.load(workdir)
  path = inference.export(workdir, tmp_path / 'model.npz')
  exported = inference.load_exported(path)
  assert exported.image_shape == model.image_shape and list(exported.keys) == ['default']
  assert 'content' not in str(exported.keys['default'])  # public data only: the key stays a secret
  key = model.keys['default']
  for n in (1, 37, 300):
    images = make_images(n, seed=n)[0][..., None]
    for k in (key, None, keys.forge(key, 3)):
      np.testing.assert_array_equal(exported.logits(images, k), model.logits(images, k))
      floats = images.astype(np.float32) / 255.0
      np.testing.assert_array_equal(exported.logits(floats, k), model.logits(floats, k))
  np.testing.assert_array_equal(exported.predict(images, key), model.predict(images, key))


def test_exported_artifact_refuses_bad_keys_and_files(workdir, tmp_path):
  exported = inference.load_exported(inference.export(workdir, tmp_path / 'model.npz'))
  images = np.zeros((2, 28, 28, 1), np.uint8)
  other_shape = keys.derive('x', keys.Geometry(kind='patch', image_shape=(32, 32, 3), size=4, position=(0, 0)))
  with pytest.raises(ValueError, match=r'made for images of shape \(32, 32, 3\)'):
    exported.logits(images, other_shape)
  with pytest.raises(ValueError, match='must be a LicenseKey'):
    exported.logits(images, 'default')
  with pytest.raises(ValueError, match='NHWC images'):
    exported.logits(np.zeros((2, 28, 28), np.uint8))
  (tmp_path / 'junk.npz').write_bytes(b'not an artifact')
  with pytest.raises(errors.WorkdirError, match='not a readable'):
    inference.load_exported(tmp_path / 'junk.npz')


@pytest.mark.parametrize('n, batch_size, chunks', [
    (0, 8, [1]), (1, 8, [1]), (8, 8, [8]), (4, 8, [4]), (5, 8, [8]), (19, 8, [8, 8, 8]),
    (6, 6, [6]), (4, 6, [4]), (5, 6, [6]), (7, 6, [6, 6])])
def test_batched_returns_every_row_once_in_order(n, batch_size, chunks):
  """predict.batched over one full chunk, a padded chunk and several chunks: the
  outputs of exactly the N images, in order, as writable numpy arrays, for a pytree output too; the
  chunks it runs are powers of two up to the batch size (or the batch size itself)."""
  from securenet_jax import predict  # pylint: disable=g-import-not-at-top
  images = np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2, 1)
  jitted = jax.jit(lambda x, scale: {'sum': x.sum(axis=(1, 2, 3)) * scale, 'first': x[:, 0, 0, 0]})
  seen = []

  def fn(x, scale):
    seen.append(len(x))
    return jitted(x, scale)

  out = predict.batched(fn, images, 2.0, batch_size=batch_size)
  assert seen == chunks and all(c == predict.chunk_size(n, batch_size) for c in seen)
  assert isinstance(out['sum'], np.ndarray) and out['sum'].shape == (n,)
  np.testing.assert_array_equal(out['sum'], images.sum(axis=(1, 2, 3)) * 2.0)
  np.testing.assert_array_equal(out['first'], images[:, 0, 0, 0])
  assert all(a.flags.writeable and a.flags.owndata for a in out.values())  # the caller's own arrays
  # One array out:
  single = predict.batched(jax.jit(lambda x: x[:, 0, 0, 0] + 1.0), images, batch_size=batch_size)
  np.testing.assert_array_equal(single, images[:, 0, 0, 0] + 1.0)
  assert single.shape == (n,) and single.flags.writeable and single.flags.owndata
