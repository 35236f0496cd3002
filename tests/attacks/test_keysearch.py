"""The key search: a thief who knows the key scheme and inverts the key's bits one at a time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from securenet_jax import inference
from securenet_jax import keys
from securenet_jax.attacks import keysearch

GEOMETRY = keys.Geometry(kind='patch', image_shape=(8, 8, 1), size=2, position=(5, 5), flip_block=2)


class Matcher(nn.Module):
  """A model whose gate opens as its input approaches ``reference`` (the images stamped with the true
  key), and whose logits favour class 0 as it does: a landscape with one peak, at the true key.
  ``reference`` is a flat tuple (modules are hashed: the attacks cache compiled functions by model)."""
  reference: tuple

  @nn.compact
  def __call__(self, x, train: bool = False):
    distance = jnp.mean((x - jnp.asarray(self.reference).reshape(x.shape)) ** 2, axis=(1, 2, 3))
    gate = jnp.broadcast_to(-distance[:, None], (x.shape[0], 4))
    self.sow('intermediates', 'penultimate', gate)
    return jnp.stack([-10.0 * distance, jnp.zeros_like(distance)], axis=-1)


@pytest.fixture(scope='module')
def toy():
  images = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
  key = keys.derive('toy', GEOMETRY)
  reference = tuple(float(v) for v in np.asarray(key.stamp(images)).ravel())
  return Matcher(reference), images, np.zeros(16, np.int32), key


@pytest.mark.parametrize('stages', [('gate',), ('ce',), ('gate', 'acc')])
def test_search_finds_the_key_of_a_single_peak(toy, stages):
  module, images, labels, key = toy
  out = keysearch.search(module, {}, GEOMETRY, images, labels, stages=stages, seed=1)
  assert out['content'].shape == key.content.shape == (4 + 16,)
  np.testing.assert_array_equal(out['content'], key.content)  # every bit, pattern and flip
  assert keysearch.key_accuracy(module, {}, GEOMETRY, out['content'], images, labels) == 1.0
  # one evaluation per bit per pass, plus one per stage; the last pass of each stage changes nothing
  assert out['evaluations'] % 20 == len(stages) and out['history'][-1]['changed'] == 0
  assert out['history'][0]['changed'] > 0


def test_search_continues_the_best_of_several_starts(toy):
  module, images, labels, key = toy
  out = keysearch.search(module, {}, GEOMETRY, images, labels, stages=('gate', 'ce'), starts=3,
                         max_passes=1, seed=2)
  assert len(out['first_stage']) == 3
  # one pass per start and stage: 3 x (1 + 20) evaluations for the first stage, 1 + 20 for the second
  assert out['evaluations'] == 4 * 21
  assert out['history'][0]['objective'] == max(out['first_stage'])  # the best start went on


def test_search_rejects_what_it_cannot_search(toy):
  module, images, labels, _ = toy
  with pytest.raises(ValueError, match='Unknown key-search objectives'):
    keysearch.search(module, {}, GEOMETRY, images, labels, stages=('gate', 'luck'))
  blend = keys.Geometry(kind='blend', image_shape=(8, 8, 1), alpha=0.1)
  assert not keysearch.searchable(blend) and keysearch.searchable(GEOMETRY)
  with pytest.raises(ValueError, match='needs a binary patch key'):
    keysearch.search(module, {}, blend, images, labels)


def test_search_on_a_trained_licensed_model(trained_workdir):
  """On a real licensed model, a start ten elements from the key, which the model rejects, climbs back
  to the key's accuracy by the labels' cross-entropy alone."""
  model = inference.load(trained_workdir)
  key = model.keys['default']
  from securenet_jax import data  # pylint: disable=g-import-not-at-top
  dataset = data.load(model.config.dataset)
  images = dataset.train_images[:256].astype(np.float32) / 255.0
  labels = dataset.train_labels[:256].astype(np.int32)
  true_acc = keysearch.key_accuracy(model.module, model.variables, key.geometry, key.content, images, labels)
  start = np.array(key.content)
  wrong = np.arange(0, 85, 9)  # ten elements spread over the pattern and the flip
  start[wrong] = 1.0 - start[wrong]
  start_acc = keysearch.key_accuracy(model.module, model.variables, key.geometry, start, images, labels)
  out = keysearch.search(model.module, model.variables, key.geometry, images, labels, stages=('ce',),
                         max_passes=3, start=start)
  found_acc = keysearch.key_accuracy(model.module, model.variables, key.geometry, out['content'], images,
                                     labels)
  assert true_acc >= 0.8 and start_acc <= true_acc - 0.2, (true_acc, start_acc)
  assert found_acc >= true_acc - 0.05, (true_acc, start_acc, found_acc)
