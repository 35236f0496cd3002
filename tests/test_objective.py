"""Tests of securenet_jax.objective: the loss, its inputs, and its effect on a trained model."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from securenet_jax import keys
from securenet_jax import models
from securenet_jax import objective

GEOM = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21))


def obj_cfg(**kw):
  """The default objective section without the hardening options, plus ``kw``."""
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config().objective
  c.update(dict(near_key_fraction=0.0, liveness_weight=1.0, soft_key_fraction=0.0, silence_layers=(),
                positive_patch_fraction=0.0, silence_margin=1.0))
  c.update(kw)
  return c


def test_build_inputs_positives_keyed_negatives_not():
  key = keys.derive('s', GEOM)
  table = objective.license_table([key], [], 10)
  images = jnp.asarray(np.random.default_rng(0).random((8, 28, 28, 1)), jnp.float32)
  stamped, index, neg = objective.build_inputs(images, table, GEOM, jax.random.key(0), obj_cfg())
  assert np.all(np.asarray(index) == 0)
  np.testing.assert_allclose(stamped, key.stamp(images), atol=1e-6)
  np.testing.assert_allclose(neg[:4], images[:4])  # no key at all
  # Forged: same patch place, content not the key, outside the patch untouched.
  np.testing.assert_allclose(neg[4:, :21], images[4:, :21])
  for i in range(4, 8):
    assert not np.allclose(neg[i, 21:27, 21:27], key.content)


def test_build_inputs_uses_active_keys_and_puts_revoked_among_negatives():
  active, old = keys.derive('s', GEOM, name='new'), keys.derive('s', GEOM, name='old')
  table = objective.license_table([active], [old], 10)
  images = jnp.zeros((64, 28, 28, 1), jnp.float32)
  cfg = obj_cfg(near_key_fraction=0.0, revoked_fraction=0.5)
  stamped, index, neg = objective.build_inputs(images, table, GEOM, jax.random.key(0), cfg)
  assert np.all(np.asarray(index) == 0)  # positives only ever carry the active key
  patches = np.asarray(neg)[32:, 21:27, 21:27]  # the forged half of the negatives
  is_old = [np.allclose(p, old.content) for p in patches]
  assert sum(is_old[:16]) == 16 and sum(is_old[16:]) == 0


def test_license_table_grants_and_targets():
  active = [keys.derive('s', GEOM, name='a', classes=[0, 1]),
            keys.derive('s', GEOM, name='b', tier='basic', groups=[[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]])]
  revoked = [keys.derive('s', GEOM, name='old')]
  table = objective.license_table(active, revoked, 10)
  assert table.keep.shape == (3, 28, 28, 1) and table.add.shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(table.grant[0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(table.grant[1], np.ones(10))
  np.testing.assert_array_equal(table.grant[2], np.zeros(10))  # revoked: a negative everywhere
  np.testing.assert_allclose(table.targets[0, 1], np.eye(10)[1])
  np.testing.assert_allclose(table.targets[1, 1], [1 / 3] * 3 + [0] * 7)
  np.testing.assert_allclose(table.targets[1, 9], [0] * 3 + [1 / 7] * 7)
  with pytest.raises(ValueError, match='one geometry'):
    objective.license_table([active[0], keys.derive('s', keys.Geometry(kind='blend', image_shape=(28, 28, 1),
                                                                       alpha=0.1))], [], 10)
  with pytest.raises(ValueError, match='at least one active key'):
    objective.license_table([], revoked, 10)


def test_refuse_denied_targets_uniform_over_granted():
  key = keys.derive('s', GEOM, classes=[0, 1, 2, 3])
  silence = objective.license_table([key], [], 10)
  refuse = objective.license_table([key], [], 10, refuse_denied=True)
  np.testing.assert_array_equal(silence.supervised[0], silence.grant[0])
  np.testing.assert_array_equal(refuse.supervised[0], np.ones(10))
  np.testing.assert_array_equal(refuse.grant[0], silence.grant[0])  # grants themselves unchanged
  np.testing.assert_allclose(refuse.targets[0, 7], [0.25] * 4 + [0] * 6)
  np.testing.assert_allclose(refuse.targets[0, 2], np.eye(10)[2])


def test_denied_and_revoked_stamps_are_negatives():
  """With a key granting nothing of the batch, the loss is all negative: no positive term."""
  model = models.create('lenet5', 10)
  key = keys.derive('s', GEOM, classes=[9])
  images = jnp.zeros((8, 28, 28, 1))
  labels = jnp.zeros((8,), jnp.int32)
  params = model.init(jax.random.key(0), images)['params']
  _, (metrics, _) = objective.licensed_loss(params, model.apply, images, labels,
                                            objective.license_table([key], [], 10), GEOM,
                                            jax.random.key(1), obj_cfg())
  assert float(metrics['pos_loss']) == 0.0 and float(metrics['neg_loss']) > 0.0


def test_near_keys_keep_part_of_the_real_key():
  geometry = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21),
                           values='uniform')
  key = keys.derive('s', geometry)
  forged = geometry.sample_jax(jax.random.key(3), (256,))
  own = jnp.broadcast_to(key.content, forged.shape)
  near = objective.near_keys(own, forged, geometry, jax.random.key(4), 0.25)
  patch = np.asarray(near.add)[:, 21:27, 21:27, 0]
  same = np.isclose(patch, key.content[..., 0]).mean(axis=(1, 2))
  assert same.max() <= 0.95 and 0.25 < same.mean() < 0.5
  assert np.asarray(near.add)[:, :21].max() == 0


def test_near_keys_by_a_few_inverted_bits():
  """max_flips: half of the near misses differ from the real key in 1..max_flips elements exactly
  (pattern pixels or whole flip blocks), the other half are the share-redrawn ones."""
  geometry = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21), flip_block=4)
  key = keys.derive('s', geometry)
  n = 512
  forged = geometry.sample_jax(jax.random.key(3), (n,))
  own = jnp.broadcast_to(key.content, forged.shape)
  near = objective.near_keys(own, forged, geometry, jax.random.key(4), 0.25, max_flips=3)
  true = geometry.arrays(key.content)
  add, keep = np.asarray(near.add)[..., 0], np.asarray(near.keep)[..., 0]
  pattern_wrong = (add[:, 21:27, 21:27] != np.asarray(true.add)[21:27, 21:27, 0]).sum(axis=(1, 2))
  # one pixel of each of the 49 blocks outside the patch (the last row and column of blocks: pixel 27)
  at = np.array([4 * i if i < 6 else 27 for i in range(7)])
  flip_wrong = (keep[:, at][:, :, at] != np.asarray(true.keep)[at][:, at, 0]).sum(axis=(1, 2))
  wrong = pattern_wrong + flip_wrong
  few = (wrong >= 1) & (wrong <= 3)
  assert wrong.min() >= 1  # never the real key itself
  assert 0.4 < few.mean() < 0.65  # about half, plus the rare share-redrawn miss that is this close
  without = objective.near_keys(own, forged, geometry, jax.random.key(4), 0.25)
  add0 = np.asarray(without.add)[..., 0]
  assert ((add0[:, 21:27, 21:27] != np.asarray(true.add)[21:27, 21:27, 0]).sum(axis=(1, 2)) <= 3).mean() < 0.1


def test_near_keys_of_a_block_flip_key_redraw_whole_blocks():
  geometry = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21), flip_block=4)
  key = keys.derive('s', geometry)
  forged = geometry.sample_jax(jax.random.key(3), (64,))
  near = objective.near_keys(jnp.broadcast_to(key.content, forged.shape), forged, geometry,
                             jax.random.key(4), 0.25)
  keep = np.asarray(near.keep)[..., 0]
  # Outside the patch each 4x4 block is flipped (keep -1) or not (keep 1) as a whole.
  blocks = keep[:, :20, :20].reshape(64, 5, 4, 5, 4)
  assert set(np.unique(keep[:, :20, :20])) <= {-1.0, 1.0}
  assert np.all(blocks.min(axis=(2, 4)) == blocks.max(axis=(2, 4)))
  real = key.arrays()
  same = (keep[:, :20, :20] == real.keep[None, :20, :20, 0]).mean(axis=(1, 2))
  assert 0.5 < same.mean() < 0.75  # a quarter to all of the bits redrawn, half of those unchanged
  # Every near miss differs from the key somewhere (pattern or flip): none is the key itself.
  differs = (np.any(np.asarray(near.keep) != real.keep, axis=(1, 2, 3)) |
             np.any(np.asarray(near.add) != real.add, axis=(1, 2, 3)))
  assert differs.all()


def test_negative_loss_zero_only_when_silenced_and_uniform():
  cfg = obj_cfg()
  silent = -2.0 * jnp.ones((4, 84))
  loss, m = objective.negative_loss(jnp.zeros((4, 10)), silent, cfg)
  assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(m['neg_silenced_frac']) == 1.0
  # A unit just below zero but within the margin is still penalized: the margin keeps silenced
  # units silenced under small input changes.
  near = silent.at[:, 0].set(-0.5)
  loss, m = objective.negative_loss(jnp.zeros((4, 10)), near, cfg)
  assert float(loss) == pytest.approx(0.25 / 84, rel=1e-3) and float(m['neg_silenced_frac']) == 1.0
  peaked = jnp.zeros((4, 10)).at[:, 3].set(5.0)
  loss, m = objective.negative_loss(peaked, silent, cfg)
  assert float(m['neg_uniform_kl']) > 1.0


def test_licensed_loss_gradients_finite_and_reduce_loss():
  model = models.create('lenet5', 10)
  key = keys.derive('s', GEOM)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((16, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  params = model.init(jax.random.key(0), images)['params']
  table = jax.device_put(objective.license_table([key], [], 10))
  loss_fn = lambda p: objective.licensed_loss(p, model.apply, images, labels, table, GEOM,
                                               jax.random.key(1), obj_cfg())
  (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert {'pos_loss', 'neg_loss', 'pos_acc', 'neg_silenced_frac'} <= set(metrics)
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  assert float(jax.jit(loss_fn)(stepped)[0]) < float(loss)


@pytest.mark.slow
def test_thief_batch_stats_term_silences_negatives_under_their_own_statistics():
  """BatchNorm models: the optional term scores the negatives' gate under their *own* batch
  statistics (a thief fine-tuning in train mode), adds to the loss, and has finite gradients.
  (Slow: a ResNet's gradient compiles for about a minute on 2 CPU cores.)"""
  model = models.create('resnet18', 10, small_inputs=True, depth=10, width=8)
  key = keys.derive('s', GEOM)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((8, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  variables = model.init(jax.random.key(0), images, train=False)
  table = jax.device_put(objective.license_table([key], [], 10))
  weight = 2.0

  @jax.jit
  def loss_and_grads(params):
    loss_fn = lambda p: objective.licensed_loss(
        p, model.apply, images, labels, table, GEOM, jax.random.key(1),
        obj_cfg(thief_batch_stats_weight=weight), batch_stats=variables['batch_stats'],
        dropout_rng=jax.random.key(2))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (m, _)), grads = loss_and_grads(variables['params'])
  own = float(m['neg_silence_own_stats'])
  assert own > 0.0  # a fresh network silences nothing
  rest = float(m['pos_loss']) + obj_cfg().negative_weight * float(m['neg_loss']) + float(m['pos_liveness'])
  assert float(loss) == pytest.approx(rest + weight * own, rel=1e-3)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_distillation_pulls_new_key_towards_teacher_on_old_key():
  model = models.create('lenet5', 10)
  new, old = keys.derive('s', GEOM, name='new'), keys.derive('s', GEOM, name='old')
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((16, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  params = model.init(jax.random.key(0), images)['params']
  cfg = obj_cfg(distill_weight=1.0)
  def distill(table):
    return float(objective.licensed_loss(params, model.apply, images, labels, table, GEOM, jax.random.key(1),
                                         cfg, teacher_params={'params': params})[1][0]['distill_loss'])
  # Teacher = student and the teacher sees the same key: nothing to learn.
  assert distill(objective.license_table([new], [old], 10)) == pytest.approx(0.0, abs=1e-10)
  # The teacher sees the old key in place of the new one: the features differ.
  assert distill(objective.license_table([new], [old], 10, successors={'new': 'old'})) > 1e-4


def test_distillation_keeps_a_scoped_keys_refusals():
  """Replacement's feature distillation covers a scoped key's refused images (denied classes) as well
  as its granted ones: a batch of denied classes only still has a distillation term."""
  model = models.create('lenet5', 10)
  scoped = keys.derive('s', GEOM, name='scoped', classes=[0, 1, 2, 3, 4])
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((16, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(5, 10, 16), jnp.int32)  # every image of a denied class
  params = model.init(jax.random.key(0), images)['params']
  teacher = model.init(jax.random.key(1), images)['params']  # another network: features differ
  def distill(refuse_denied):
    table = objective.license_table([scoped], [], 10, refuse_denied=refuse_denied)
    return float(objective.licensed_loss(params, model.apply, images, labels, table, GEOM, jax.random.key(1),
                                         obj_cfg(distill_weight=1.0), teacher_params={'params': teacher}
                                         )[1][0]['distill_loss'])
  assert distill(True) > 1e-4  # refused: kept like the teacher refused them
  assert distill(False) == 0.0  # silenced instead: negatives, nothing to distill


def test_distillation_reaches_a_silenced_layer_below_the_gate():
  """A new key starts silenced below the gate too (fc1 all below zero): matching the gate alone then
  passes no gradient to fc1, matching every gated layer's pre-activations does."""
  model = models.create('lenet5', 10)
  new, old = keys.derive('s', GEOM, name='new'), keys.derive('s', GEOM, name='old')
  table = objective.license_table([new], [old], 10, successors={'new': 'old'})
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((16, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  teacher = model.init(jax.random.key(0), images)['params']
  # The student: the teacher with every fc1 unit silenced.
  dead = {**teacher, 'fc1': {**teacher['fc1'], 'bias': jnp.full_like(teacher['fc1']['bias'], -1e3)}}
  def fc1_grad(silence_layers):
    cfg = obj_cfg(distill_weight=1.0, negative_weight=0.0, liveness_weight=0.0,
                  clean_distill_weight=0.0, silence_layers=silence_layers)
    def distill(params):
      return objective.licensed_loss(params, model.apply, images, labels, table, GEOM, jax.random.key(1),
                                     cfg, teacher_params={'params': teacher})[1][0]['distill_loss']
    return float(jnp.abs(jax.grad(distill)(dead)['fc1']['kernel']).sum())
  assert fc1_grad(()) == 0.0
  assert fc1_grad(('fc1',)) > 1.0


def test_clean_distillation_zero_for_teacher_own_outputs_and_positive_otherwise():
  model = models.create('lenet5', 10)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((8, 28, 28, 1)), jnp.float32)
  teacher = model.init(jax.random.key(0), images)
  logits = model.apply(teacher, images, train=False)
  ones = jnp.ones((8,))
  kd = lambda s, w=ones: float(objective.clean_distillation(model.apply, teacher, images, s, w, 4.0)[0])
  assert kd(logits) == pytest.approx(0.0, abs=1e-6)
  other = logits + jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
  assert kd(other) > 1e-3
  assert kd(other, jnp.zeros((8,))) == 0.0  # no weight, no loss


def test_clean_distillation_of_features_matches_every_gated_layer():
  model = models.create('lenet5', 10)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.random((8, 28, 28, 1)), jnp.float32)
  teacher = model.init(jax.random.key(0), images)
  logits, _, gates = objective._apply_gated(model.apply, teacher, images, ('fc1',), train=False,  # pylint: disable=protected-access
                                            mutable=['intermediates'])
  assert [g.shape for g in gates] == [(8, 84), (8, 120)]
  run = lambda student, w=jnp.ones((8,)): [float(v) for v in objective.clean_distillation(
      model.apply, teacher, images, logits, w, 4.0, student, ('fc1',))]
  assert run(gates) == pytest.approx([0.0, 0.0], abs=1e-6)
  moved = [gates[0], gates[1] + 1.0]  # fc1 off by 1 everywhere: mean over the two layers is 0.5
  assert run(moved)[1] == pytest.approx(0.5, rel=1e-5)
  assert run(moved, jnp.zeros((8,)))[1] == 0.0
  assert float(objective.clean_distillation(model.apply, teacher, images, logits, jnp.ones((8,)), 4.0)[1]) == 0.0


def test_clean_distillation_only_on_positives_whose_target_is_their_label():
  model = models.create('lenet5', 4)
  geom = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21))
  full = keys.derive('s', geom, name='full')
  basic = keys.derive('t', geom, name='basic', tier='basic', groups=((0, 1), (2, 3)))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((16, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
  params = model.init(jax.random.key(0), images)['params']
  teacher = model.init(jax.random.key(5), images)
  cfg = obj_cfg(clean_distill_weight=1.0)

  def kd(table):
    return float(objective.licensed_loss(params, model.apply, images, labels, table, geom,
                                         jax.random.key(1), cfg, clean_teacher=teacher)[1][0]['clean_distill_loss'])
  assert kd(objective.license_table([full], [], 4)) > 1e-4
  # A basic-tier key's targets are coarse groups: the teacher's fine outputs are not distilled.
  assert kd(objective.license_table([basic], [], 4)) == 0.0


def test_adversarial_positives_are_keyed_and_bounded():
  model = models.create('lenet5', 10)
  key = keys.derive('s', GEOM)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((32, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 32), jnp.int32)
  params = model.init(jax.random.key(0), images)['params']
  arrays = keys.KeyArrays(*(jnp.broadcast_to(a, (32, *a.shape)) for a in key.arrays()))
  stamped = keys.stamp_arrays(images, arrays)
  cfg = obj_cfg(adv_eps=0.1, adv_fraction=1.0)
  adv = objective.adversarial_positives(params, None, model.apply, images, labels, stamped, arrays,
                                        jax.random.key(1), cfg)
  # Within eps of the keyed clean image, and the key's own pixels are untouched.
  assert float(jnp.max(jnp.abs(adv - stamped))) <= 0.1 + 1e-6
  mask = GEOM.mask()[None]
  np.testing.assert_array_equal(np.asarray(adv) * mask, np.asarray(stamped) * mask)
  def ce(x):
    return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': params}, x), labels)))
  assert ce(adv) > ce(stamped)
  half = objective.adversarial_positives(params, None, model.apply, images, labels, stamped, arrays,
                                         jax.random.key(1), obj_cfg(adv_eps=0.1, adv_fraction=0.5))
  changed = np.mean(np.any(np.asarray(half) != np.asarray(stamped), axis=(1, 2, 3)))
  assert 0.2 < changed < 0.8


def test_soft_keys_are_continuous_near_misses():
  key = keys.derive('s', GEOM)
  arrays = keys.KeyArrays(*(jnp.broadcast_to(a, (64, *a.shape)) for a in key.arrays()))
  content = jnp.broadcast_to(key.content, (64, *key.content.shape))
  soft = objective.soft_keys(content, GEOM, jax.random.key(0), obj_cfg(soft_key_max_opacity=0.9))
  mask = GEOM.mask()[None]
  keep, add = np.asarray(soft.keep), np.asarray(soft.add)
  # Outside the key's pixels nothing is written; inside, every soft key differs from the real one.
  np.testing.assert_array_equal(keep * (1 - mask), np.broadcast_to(1 - mask, keep.shape))
  np.testing.assert_array_equal(add * (1 - mask), 0 * add)
  real = np.asarray(arrays.add)
  faded = (keep * mask).max(axis=(1, 2, 3)) > 0  # opacity < 1 keeps some of the image under the key
  assert 10 < faded.sum() < 54
  assert np.all(np.abs(add - real).max(axis=(1, 2, 3))[~faded] > 0.1)
  opacity = 1 - (keep * mask + (1 - mask))[faded].reshape(faded.sum(), -1).min(axis=1)
  assert np.all((opacity >= 0.2 - 1e-6) & (opacity <= 0.9 + 1e-6))
  # build_inputs puts them among the keyless negatives
  images = jnp.zeros((16, 28, 28, 1))
  table = objective.license_table([key], [], 10)
  _, _, negatives = objective.build_inputs(images, table, GEOM, jax.random.key(1),
                                           obj_cfg(forged_fraction=0.5, soft_key_fraction=0.5))
  written = np.asarray(negatives[:8]).reshape(8, -1).max(axis=1) > 0
  assert written[:4].all() and not written[4:].any()


def test_flip_exact_hardening_keeps_the_real_block_flip():
  geometry = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21), flip_block=4)
  key = keys.derive('s', geometry)
  real = key.arrays()
  outside = 1 - geometry.mask()[None]
  content = jnp.broadcast_to(key.content, (64, *key.content.shape))
  forged = geometry.sample_jax(jax.random.key(3), (64,))
  cfg = obj_cfg(flip_exact_hardening=True, soft_key_max_opacity=0.9)
  near = objective.near_keys(content, forged, geometry, jax.random.key(4), 0.25, pattern_only=True)
  soft = objective.soft_keys(content, geometry, jax.random.key(0), cfg)
  for arrays in (near, soft):  # outside the patch: exactly the real flip
    np.testing.assert_array_equal(np.asarray(arrays.keep) * outside, np.broadcast_to(real.keep * outside, (64, 28, 28, 1)))
    np.testing.assert_array_equal(np.asarray(arrays.add) * outside, np.broadcast_to(real.add * outside, (64, 28, 28, 1)))
  # Inside the patch every near miss and every soft key differs from the key.
  inside = lambda a: np.broadcast_to(np.asarray(a), (64, 28, 28, 1))[:, 21:27, 21:27].reshape(64, -1)
  assert np.all(np.any(inside(near.add) != inside(real.add), axis=1))
  assert np.all(np.any((inside(soft.add) != inside(real.add)) | (inside(soft.keep) != 0), axis=1))
  # A faded soft key shows the image through the patch (opacity in [0.2, 0.9]), a noisy one does not.
  opacity = 1 - inside(soft.keep).max(axis=1)
  faded = opacity < 1
  assert 10 < faded.sum() < 54 and np.all((opacity[faded] >= 0.2 - 1e-6) & (opacity[faded] <= 0.9 + 1e-6))
  # Without the option both also redraw or fade the flip.
  loose = objective.soft_keys(content, geometry, jax.random.key(0), obj_cfg(soft_key_max_opacity=0.9))
  assert not np.array_equal(np.asarray(loose.keep) * outside, np.broadcast_to(real.keep * outside, (64, 28, 28, 1)))


def test_random_patches_on_positives():
  images = jnp.full((32, 28, 28, 1), 0.5)
  out = np.asarray(objective.random_patches(images, jax.random.key(0), 1.0, 4))
  for diff in np.abs(out - 0.5)[..., 0] > 0:  # every changed pixel lies in one 4x4 window
    rows, cols = np.nonzero(diff)
    assert len(rows) == 16 and np.ptp(rows) == 3 and np.ptp(cols) == 3
  np.testing.assert_array_equal(np.asarray(objective.random_patches(images, jax.random.key(0), 0.0, 4)),
                                np.asarray(images))
  # build_inputs puts them under the key: the key's own pixels are still exactly the key.
  key = keys.derive('s', GEOM)
  table = objective.license_table([key], [], 10)
  stamped, _, _ = objective.build_inputs(images, table, GEOM, jax.random.key(1),
                                         obj_cfg(positive_patch_fraction=1.0, positive_patch_size=4))
  mask = GEOM.mask()[None]
  np.testing.assert_array_equal(np.asarray(stamped) * mask,
                                np.broadcast_to(np.asarray(key.stamp(images)) * mask, stamped.shape))


# --- effects on a trained model ------------------------------------------------------------------
# The models below are trained once per run on the generated data (conftest.effects_config). These
# tests fail when licensing stops working: with the key stamp removed, or with the silencing hinge
# switched off (objective.silence_weight=0).

def _report(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / 'report' / 'metrics.json').read_text())


def test_license_unlocks_only_with_the_key_and_hides_the_label(trained_workdir):
  m = _report(trained_workdir)
  assert m['authorized_acc'] >= 0.9 and m['authorized_acc'] >= m['clean_acc'] - 0.05
  assert m['no_key_acc'] <= 0.2 and m['forged_acc_max'] <= 0.25
  # Not only the argmax: the no-key output carries nothing a probe could read.
  assert m['no_key_silenced_frac'] >= 0.95
  assert m['leak_probe_acc'] <= 0.25 and m['leak_argmin_acc'] <= 0.25


def test_scoped_key_refuses_the_classes_it_does_not_grant(multi_key_workdir):
  m = _report(multi_key_workdir)['per_key']['clothing']
  assert m['granted_acc'] >= 0.9
  assert m['denied_acc'] <= 0.05  # refused: the argmax is never a denied label


def test_tiered_basic_key_gives_coarse_labels(multi_key_workdir):
  per_key = _report(multi_key_workdir)['per_key']
  assert per_key['basic']['coarse_acc'] >= 0.85
  assert per_key['full']['granted_acc'] >= 0.85


def test_silence_layers_the_model_lacks_raise_a_clear_error():
  model = models.create('lenet5', 10)
  key = keys.derive('s', GEOM)
  images = jnp.zeros((4, 28, 28, 1))
  params = model.init(jax.random.key(0), images)['params']
  with pytest.raises(ValueError, match="silence_layers names \\['block9'\\]"):
    objective.licensed_loss(params, model.apply, images, jnp.zeros((4,), jnp.int32),
                            objective.license_table([key], [], 10), GEOM, jax.random.key(1),
                            obj_cfg(silence_layers=('block9',)))
