"""Tests of securenet_jax.train: the step, data parallelism, resumption, failures."""

import chex
import jax
import numpy as np
import pytest

from securenet_jax import data as data_lib
from securenet_jax import images as images_lib
from securenet_jax import keys
from securenet_jax import models
from securenet_jax import objective
from securenet_jax import parallel
from securenet_jax import train
from securenet_jax.workdir import Workdir


@pytest.fixture
def small(smoke_config):
  """6 steps per epoch, 1 epoch."""
  smoke_config.dataset.train_limit = 384
  return smoke_config


def make_key(config, dataset):
  return keys.derive('test', keys.Geometry.from_config(config.key, dataset.image_shape))


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.mark.slow
def test_one_and_four_devices_train_the_same_model(small, tmp_path):
  assert jax.device_count() >= 4, 'conftest forces 4 host devices'
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  one = train.train(small, Workdir(tmp_path / 'one'), dataset, [key], mesh=parallel.create_mesh(jax.devices()[:1]),
                    stop_after_steps=3)
  four = train.train(small, Workdir(tmp_path / 'four'), dataset, [key], mesh=parallel.create_mesh(jax.devices()[:4]),
                     stop_after_steps=3)
  assert int(one.step) == int(four.step) == 3
  for a, b in zip(jax.tree.leaves(params_of(one)), jax.tree.leaves(params_of(four))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  init = train.create_train_state(models.build(small.model, 10), small, dataset.image_shape, 6,
                                  jax.random.fold_in(jax.random.key(0), 0))
  assert not np.allclose(jax.tree.leaves(init.params)[0], jax.tree.leaves(params_of(one))[0])


def test_train_step_traces_once(small):
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  mesh = parallel.create_mesh(jax.devices()[:2])
  step = train.jit_train_step(chex.assert_max_traces(train.make_train_step(small, key.geometry, True), n=1),
                              mesh)
  state = jax.device_put(train.create_train_state(models.build(small.model, 10), small, dataset.image_shape,
                                                  6, jax.random.key(0)),
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
  """augment.noise_std: the licensed loss (which stamps positives and negatives from these images)
  and the baseline's plain loss both get the noisy images; a negative std is refused."""
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  table = objective.license_table([key], [], 10)
  image, label = next(data_lib.train_batches(dataset.train_images, dataset.train_labels, 64, 0, 0))
  batch = {'image': image, 'label': label}
  clean = images_lib.to_float(image)
  seen = {}
  for name in ('licensed_loss', 'plain_loss'):
    original = getattr(objective, name)

    def spy(*args, _original=original, _name=name, **kw):
      jax.debug.callback(lambda x, _n=_name: seen.setdefault(_n, np.asarray(x)), kw['images'])
      return _original(*args, **kw)
    monkeypatch.setattr(objective, name, spy)
  small.augment.noise_std = 0.2
  model = models.build(small.model, 10)
  for licensed in (True, False):
    state = train.create_train_state(model, small, dataset.image_shape, 6, jax.random.key(0))
    step = jax.jit(train.make_train_step(small, key.geometry, licensed))
    jax.block_until_ready(step(state, batch, table, jax.random.key(1)))
  assert set(seen) == {'licensed_loss', 'plain_loss'}
  for images in seen.values():
    assert images.min() >= 0 and images.max() <= 1 and np.abs(images - clean).max() > 0.1
  small.augment.noise_std = -0.1
  with pytest.raises(ValueError, match='noise_std'):
    train.make_train_step(small, key.geometry, True)


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(small, tmp_path):
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  mesh = parallel.create_mesh(jax.devices()[:2])
  straight = train.train(small, Workdir(tmp_path / 'a'), dataset, [key], mesh=mesh)
  partial = train.train(small, Workdir(tmp_path / 'b'), dataset, [key], mesh=mesh, stop_after_steps=4)
  assert int(partial.step) == 4
  resumed = train.train(small, Workdir(tmp_path / 'b'), dataset, [key], mesh=mesh)
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
    train.train(small, Workdir(tmp_path), dataset, None, mesh=parallel.create_mesh(jax.devices()[:1]))


def test_optimizers_and_adaptive_clipping_spare_the_head():
  import ml_collections  # pylint: disable=g-import-not-at-top
  params = {'conv': {'kernel': np.ones((3, 3), np.float32)}, 'head': {'kernel': np.ones((3, 3), np.float32)}}
  grads = jax.tree.map(lambda x: 100.0 * x, params)  # far above 1% of the weights' norm
  cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=0, final_lr_fraction=1.0,
                                       weight_decay=0.0, optimizer='sgd', momentum=0.0, nesterov=False,
                                       agc_clip=0.01, grad_clip_norm=0.0))
  tx = train.make_optimizer(cfg, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # AGC clips the conv's update to 1% of its weight norm; the head's is the raw gradient.
  np.testing.assert_allclose(np.linalg.norm(updates['conv']['kernel']), 0.01 * 3.0, rtol=1e-4)
  np.testing.assert_allclose(updates['head']['kernel'], -100.0 * np.ones((3, 3)), rtol=1e-6)
  cfg.optimizer = 'lamb'
  with pytest.raises(ValueError, match='train.optimizer'):
    train.make_optimizer(cfg, total_steps=10)


def test_clean_distillation_needs_the_baseline(small, tmp_path):
  small.objective.clean_distill_weight = 1.0
  small.eval.clean_baseline = False
  with pytest.raises(ValueError, match='clean_baseline'):
    train.train_and_evaluate(small, str(tmp_path / 'wd'))


@pytest.mark.slow
def test_clean_distillation_trains_the_teacher_first(small, tmp_path):
  """With distillation on, the baseline is trained first and distilled into the licensed model (its
  loss term is reported and finite); the report has the clean accuracy as usual."""
  small.objective.clean_distill_weight = 1.0
  dataset = data_lib.load(small.dataset)
  key = make_key(small, dataset)
  reads = []  # the on_metrics hook: every log_every (4) steps and at the final checkpoint (6)
  baseline = train.host_variables(train.train(small, Workdir(tmp_path / 'base'), dataset, None,
                                              on_metrics=lambda s, m: reads.append((s, m))))
  assert [s for s, _ in reads] == [4, 6]
  assert all(np.isfinite(float(m['loss'])) and float(m['learning_rate']) > 0 for _, m in reads)
  step = jax.jit(train.make_train_step(small, key.geometry, True))
  state = train.create_train_state(models.build(small.model, 10), small, dataset.image_shape, 6,
                                   jax.random.key(0))
  batch = {'image': dataset.train_images[:64], 'label': dataset.train_labels[:64]}
  table = objective.license_table([key], [], 10)
  _, with_teacher = step(state, batch, table, jax.random.key(1), objective.Teachers(clean=baseline))
  _, without = step(state, batch, table, jax.random.key(1), None)
  assert float(with_teacher['clean_distill_loss']) > 0.0 and float(without['clean_distill_loss']) == 0.0
  # The default also matches the baseline's hidden features (clean_distill_features_weight).
  features = float(with_teacher['clean_distill_features_loss'])
  assert features > 0.0 and float(without['clean_distill_features_loss']) == 0.0
  assert float(with_teacher['loss']) == pytest.approx(
      float(without['loss']) + float(with_teacher['clean_distill_loss'])
      + small.objective.clean_distill_features_weight * features, rel=1e-4)
  metrics = train.train_and_evaluate(small, str(tmp_path / 'wd'))
  assert 0.0 <= metrics['clean_acc'] <= 1.0 and (tmp_path / 'wd' / 'baseline').is_dir()
