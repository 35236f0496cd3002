"""Tests of securenet_jax.train: data parallelism, resumption, failures."""

import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from securenet_jax import checkpointing
from securenet_jax import data as data_lib
from securenet_jax import keys
from securenet_jax import objective
from securenet_jax import parallel
from securenet_jax import train
from tests.conftest import REPO


@pytest.fixture
def small(smoke_config):
  """6 steps per epoch, 1 epoch."""
  smoke_config.dataset.train_limit = 384
  return smoke_config


def make_key(config, dataset):
  return keys.derive('test', keys.Geometry.from_config(config.key, dataset.image_shape))


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_one_and_four_devices_train_the_same_model(small, tmp_path):
  assert jax.device_count() >= 4, 'conftest forces 4 host devices'
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  one = train.train(small, str(tmp_path / 'one'), dataset, key, mesh=parallel.create_mesh(jax.devices()[:1]),
                    stop_after_steps=3)
  four = train.train(small, str(tmp_path / 'four'), dataset, key, mesh=parallel.create_mesh(jax.devices()[:4]),
                     stop_after_steps=3)
  assert int(one.step) == int(four.step) == 3
  for a, b in zip(jax.tree.leaves(params_of(one)), jax.tree.leaves(params_of(four))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  init = train.create_train_state(train.build_model(small, 10), small, dataset.image_shape,
                                  len(dataset.train_images), jax.random.fold_in(jax.random.key(0), 0))
  assert not np.allclose(jax.tree.leaves(init.params)[0], jax.tree.leaves(params_of(one))[0])


def test_train_step_traces_once(small):
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  mesh = parallel.create_mesh(jax.devices()[:2])
  step = train.jit_train_step(chex.assert_max_traces(train.make_train_step(small, key.geometry, True), n=1),
                              mesh)
  state = jax.device_put(train.create_train_state(train.build_model(small, 10), small, dataset.image_shape,
                                                  len(dataset.train_images), jax.random.key(0)),
                         parallel.replicated(mesh))
  batches = data_lib.train_batches(dataset.train_images, dataset.train_labels, 64, 0, 0)
  other_key = keys.derive('another', key.geometry)
  for i in range(3):  # a different key of the same geometry reuses the compiled step
    image, label = next(batches)
    batch = parallel.host_to_global({'image': image, 'label': label}, mesh)
    table = objective.license_table([key if i < 2 else other_key], [], 10)
    state, metrics = step(state, batch, table, jax.random.key(1), None)
  assert int(state.step) == 3 and np.isfinite(float(metrics['loss']))


def test_noise_augmentation_reaches_both_losses(small, monkeypatch):
  """dataset.noise_std: the licensed loss (which stamps positives and negatives from these images)
  and the baseline's plain loss both get the noisy images; a negative std is refused."""
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  table = objective.license_table([key], [], 10)
  image, label = next(data_lib.train_batches(dataset.train_images, dataset.train_labels, 64, 0, 0))
  batch = {'image': image, 'label': label}
  clean = np.asarray(keys.to_float_images(image))
  seen = {}
  for name in ('licensed_loss', 'plain_loss'):
    original = getattr(objective, name)

    def spy(*args, _original=original, _name=name, **kw):
      seen[_name] = np.asarray(kw['images'])
      return _original(*args, **kw)
    monkeypatch.setattr(objective, name, spy)
  small.dataset.noise_std = 0.2
  for licensed in (True, False):
    state = train.create_train_state(train.build_model(small, 10), small, dataset.image_shape,
                                     len(dataset.train_images), jax.random.key(0))
    train.make_train_step(small, key.geometry, licensed)(state, batch, table, jax.random.key(1))
  assert set(seen) == {'licensed_loss', 'plain_loss'}
  for images in seen.values():
    assert images.min() >= 0 and images.max() <= 1 and np.abs(images - clean).max() > 0.1
  small.dataset.noise_std = -0.1
  with pytest.raises(ValueError, match='noise_std'):
    train.make_train_step(small, key.geometry, True)


def test_interrupted_then_resumed_equals_uninterrupted(small, tmp_path):
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  mesh = parallel.create_mesh(jax.devices()[:2])
  straight = train.train(small, str(tmp_path / 'a'), dataset, key, mesh=mesh)
  partial = train.train(small, str(tmp_path / 'b'), dataset, key, mesh=mesh, stop_after_steps=4)
  assert int(partial.step) == 4
  resumed = train.train(small, str(tmp_path / 'b'), dataset, key, mesh=mesh)
  assert int(resumed.step) == int(straight.step) == 6
  for a, b in zip(jax.tree.leaves(params_of(straight)), jax.tree.leaves(params_of(resumed))):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_raises(small, tmp_path, monkeypatch):
  dataset = data_lib.load(small.dataset)
  real = objective.plain_loss

  def poisoned(*args, **kw):
    loss, (metrics, stats) = real(*args, **kw)
    return loss * np.nan, (dict(metrics, loss=loss * np.nan), stats)

  monkeypatch.setattr(objective, 'plain_loss', poisoned)
  with pytest.raises(FloatingPointError, match='Loss is nan at step'):
    train.train(small, str(tmp_path), dataset, None, mesh=parallel.create_mesh(jax.devices()[:1]))


def _checkpoint_errors_scenario(workdir: str, idx_dir: str) -> None:
  """Trains 2 steps, then restores with another architecture and from corrupted files."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke')
  config.dataset.data_dir, config.dataset.train_limit = idx_dir, 384
  dataset = data_lib.load(config.dataset)
  mesh = parallel.create_mesh(jax.devices()[:1])
  train.train(config, workdir, dataset, None, mesh=mesh, stop_after_steps=2)
  other = config.copy_and_resolve_references()
  other.model.kwargs = {'input_size': 36}  # another architecture: fc1 has another shape
  with pytest.raises(checkpointing.CheckpointError, match='cannot be restored|other shapes'):
    train.train(other, workdir, dataset, None, mesh=mesh)
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', '2')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')
  with pytest.raises(checkpointing.CheckpointError, match='cannot be restored'):
    train.train(config, workdir, dataset, None, mesh=mesh)
  # A checkpoint written before TrainState had batch_stats (flax's plain TrainState) still restores.
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  model = train.build_model(config, 10)
  new = train.create_train_state(model, config, (28, 28, 1), 384, jax.random.key(3))
  old = train_state.TrainState(step=new.step, apply_fn=new.apply_fn, params=new.params, tx=new.tx,
                               opt_state=new.opt_state)
  mngr = checkpointing.manager(os.path.join(workdir, 'legacy'), 1, 1)
  checkpointing.save_now(mngr, 1, old)
  mngr.wait_until_finished()
  restored = checkpointing.restore(mngr, train.abstract_train_state(model, config, (28, 28, 1), 384, mesh))
  mngr.close()
  assert restored.batch_stats == {} and int(restored.step) == 0
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_or_corrupt_checkpoint_is_an_error(tmp_path, idx_dir):
  # In a subprocess: a failed orbax restore leaves async reads behind that would surface as
  # unraisable-exception warnings in whichever test runs next.
  code = ('import sys; from tests.test_train import _checkpoint_errors_scenario as f; '
          'f(sys.argv[1], sys.argv[2]); print("SCENARIO OK")')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-W', 'ignore', '-c', code, str(tmp_path), idx_dir], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'SCENARIO OK' in proc.stdout, proc.stderr[-3000:]


def test_rerun_with_different_config_refused(smoke_config, tmp_path):
  train._check_config(smoke_config, str(tmp_path))  # pylint: disable=protected-access
  assert (tmp_path / 'config.json').exists()
  same = smoke_config.copy_and_resolve_references()
  same.eval.num_forged = 50  # evaluation settings may change between runs
  train._check_config(same, str(tmp_path))  # pylint: disable=protected-access
  other = smoke_config.copy_and_resolve_references()
  other.objective.silence_weight = 0.0
  with pytest.raises(ValueError, match='objective.silence_weight'):
    train._check_config(other, str(tmp_path))  # pylint: disable=protected-access


def test_setup_keys_registers_and_guards_secret(smoke_config, tmp_path):
  (key,), revoked = train.setup_keys(smoke_config, str(tmp_path), (28, 28, 1), 10)
  assert revoked == [] and key.classes == tuple(range(10)) and key.scheme == 'universal'
  assert keys.KeyRegistry.load(tmp_path / 'keys').active['default'].fingerprint == key.fingerprint
  (again,), _ = train.setup_keys(smoke_config, str(tmp_path), (28, 28, 1), 10)
  assert again.fingerprint == key.fingerprint
  wrong = smoke_config.copy_and_resolve_references()
  wrong.key.secret = 'another secret'
  with pytest.raises(ValueError, match='does not derive'):
    train.setup_keys(wrong, str(tmp_path), (28, 28, 1), 10)
  # Without a secret, each new workdir gets its own random key.
  fresh = smoke_config.copy_and_resolve_references()
  fresh.key.secret = ''
  k1 = train.setup_keys(fresh, str(tmp_path / 'x'), (28, 28, 1), 10)[0][0]
  k2 = train.setup_keys(fresh, str(tmp_path / 'y'), (28, 28, 1), 10)[0][0]
  assert k1.fingerprint != k2.fingerprint


def test_license_grants_from_matrix_and_tiers(smoke_config):
  config = smoke_config.copy_and_resolve_references()
  config.license.users = ('a', 'b')
  config.license.matrix = ((1, 1, 0, 0, 0, 0, 0, 0, 0, 0), (0,) * 9 + (1,))
  grants = train.license_grants(config, 10)
  assert [g['classes'] for g in grants] == [(0, 1), (9,)]
  config.license.tiers = ('basic', 'full')
  with pytest.raises(ValueError, match='partition'):
    config.license.groups = ((0, 1), (2,))
    train.license_grants(config, 10)
  config.license.groups = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
  grants = train.license_grants(config, 10)
  assert grants[0]['tier'] == 'basic' and grants[0]['groups'] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
  for bad in (((1,) * 10,), ((1,) * 10, (2,) * 10), ((1,) * 10, (0,) * 10)):
    config.license.matrix = bad
    with pytest.raises(ValueError):
      train.license_grants(config, 10)


def test_optimizers_and_adaptive_clipping_spare_the_head():
  import ml_collections  # pylint: disable=g-import-not-at-top
  params = {'conv': {'kernel': np.ones((3, 3), np.float32)}, 'head': {'kernel': np.ones((3, 3), np.float32)}}
  grads = jax.tree.map(lambda x: 100.0 * x, params)  # far above 1% of the weights' norm
  cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=0, final_lr_fraction=1.0,
                                       weight_decay=0.0, optimizer='sgd', momentum=0.0, agc_clip=0.01))
  tx = train.make_optimizer(cfg, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # AGC clips the conv's update to 1% of its weight norm; the head's is the raw gradient.
  np.testing.assert_allclose(np.linalg.norm(updates['conv']['kernel']), 0.01 * 3.0, rtol=1e-4)
  np.testing.assert_allclose(updates['head']['kernel'], -100.0 * np.ones((3, 3)), rtol=1e-6)
  cfg.optimizer = 'lamb'
  with pytest.raises(ValueError, match='train.optimizer'):
    train.make_optimizer(cfg, total_steps=10)


def test_rerun_of_a_workdir_from_before_new_fields(smoke_config, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  train._check_config(smoke_config, str(tmp_path))  # pylint: disable=protected-access
  saved = json.loads((tmp_path / 'config.json').read_text())
  del saved['objective']['adv_eps'], saved['train']['optimizer']  # an older release's config
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  train._check_config(smoke_config, str(tmp_path))  # neutral values: the same training  # pylint: disable=protected-access
  changed = smoke_config.copy_and_resolve_references()
  changed.objective.adv_eps = 0.1
  with pytest.raises(ValueError, match='adv_eps'):
    train._check_config(changed, str(tmp_path))  # pylint: disable=protected-access
  # Noise augmentation came later and is on by default: an older workdir trained without it (its
  # neutral value 0), so the current default would train a different model there.
  assert smoke_config.dataset.noise_std > 0
  del saved['dataset']['noise_std']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ValueError, match='noise_std'):
    train._check_config(smoke_config, str(tmp_path))  # pylint: disable=protected-access
  smoke_config.dataset.noise_std = 0.0
  train._check_config(smoke_config, str(tmp_path))  # pylint: disable=protected-access
