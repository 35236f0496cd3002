"""The licensed objective: learn the task on keyed inputs, learn *nothing* on the others.

Each training batch of B images is used twice:

* **positives**: the B images, each stamped with one of the active keys, trained to the key's target
  for its class (the true label; the label's coarse group for basic-tier keys; for a class the key
  does not grant, either a refusal — uniform over the granted classes — or, with
  ``license.denied_output='silence'``, one more negative). See :class:`LicenseTable`.
* **negatives**: the same B images, a fraction without any key and the rest stamped with keys forged
  afresh at every step (same kind and geometry as the real key, random content; some of them near
  misses of the real key) or with revoked keys, trained to an *uninformative* output.

Using the same images on both sides means the only thing that separates a positive from a negative
is the key itself.

What "uninformative" means matters (docs/design.md): training negatives to a random wrong label looks
perfect by top-1 but leaks the true label through the argmin of the logits, and a uniform target
still leaks through a probe on the logits. Three terms, weighted in ``config.objective``:

* ``uniform_weight``: cross-entropy to the uniform distribution;
* ``zero_logit_weight``: squared logits (pushes them to zero);
* ``silence_weight``: a hinge on the *penultimate pre-activations*, ``relu(z + margin)^2``. It drives every
  penultimate ReLU below zero with a margin, so the penultimate features are exactly zero and the
  logits exactly equal the output bias, *whatever the input*: no information about the image is left
  for an argmin or a probe to find, rather than merely little. This is our own addition to the
  published idea; ``report/metrics.json`` measures how completely it works (``no_key_silenced_frac``).

Two more terms serve fine-tuning (key replacement and revocation) and many-key models:
``liveness_weight`` keeps at least one penultimate unit of every positive above zero (a silenced
input passes no gradient through its ReLUs), and ``distill_weight`` pulls positives' pre-activations at
every gated layer towards a frozen teacher's (see :func:`licensed_loss`). ``clean_distill_weight``
distills the unlicensed baseline's softened outputs into the keyed positives (knowledge distillation,
Hinton et al. 2015): the licensed model learns the task in its keyed domain from a teacher that
learned it on raw images, which narrows the gap to the clean accuracy.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from securenet_jax import keys as keys_lib
from securenet_jax import models


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class Teachers(NamedTuple):
  """The frozen models a licensed step may learn from (variables, or None): ``source``, the model a
  key replacement starts from (feature distillation, ``distill_weight``), and ``clean``, the unlicensed
  baseline (output distillation, ``clean_distill_weight``)."""
  source: Any = None
  clean: Any = None


def clean_distillation(apply_fn: Callable, clean_teacher: Any, images: jax.Array, logits: jax.Array,
                       weights: jax.Array, temperature: float, student_gates: Sequence[jax.Array] = (),
                       extra_gates: Sequence[str] = ()) -> tuple[jax.Array, jax.Array]:
  """``T^2 KL(softmax(t / T) || softmax(s / T))`` between the clean teacher's logits ``t`` on the raw
  ``images`` and the student's ``logits`` ``s`` on the same images keyed, averaged with ``weights``;
  and, given ``student_gates`` (the student's gate and ``extra_gates`` pre-activations on the keyed
  images), their mean squared distance to the teacher's on the raw images, averaged the same way
  (0 without them)."""
  if student_gates:
    teacher, _, teacher_gates = _apply_gated(apply_fn, clean_teacher, images, extra_gates, train=False,
                                             mutable=['intermediates'])
  else:
    teacher, teacher_gates = apply_fn(clean_teacher, images, train=False), []
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  log_p = jax.nn.log_softmax(teacher / temperature)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)),
               axis=-1) * temperature ** 2
  norm = jnp.maximum(weights.sum(), 1.0)
  features = jnp.zeros(())
  if student_gates:
    features = jnp.sum(gate_distance(student_gates, teacher_gates) * weights) / norm
  return jnp.sum(kl * weights) / norm, features


def gate_distance(student: Sequence[jax.Array], teacher: Sequence[jax.Array]) -> jax.Array:
  """Per image, the mean squared distance between two lists of (N, D) gate pre-activations, averaged
  over the layers (the teacher's side is not differentiated)."""
  squared = [jnp.mean((s - jax.lax.stop_gradient(t)) ** 2, axis=-1) for s, t in zip(student, teacher)]
  return sum(squared) / len(squared)


class LicenseTable(NamedTuple):
  """Everything the licensed step needs to know about the registered keys, as arrays (K keys).

  keep, add: stacked stamping arrays, (K, H, W, 1) and (K, H, W, C).
  grant: (K, num_classes) 1.0 where key k unlocks class c. Revoked keys grant nothing.
  targets: (K, num_classes, num_classes) the output distribution key k must give for an image of
    class y: one-hot for full keys, uniform over the label's coarse group for basic (tiered) keys.
  teacher_index: (K,) for fine-tuning with a teacher (key replacement): the key whose stamp the
    teacher model sees in place of key k (the replaced key for its successor, k itself otherwise).
  supervised: (K, num_classes) 1.0 where a stamped image is trained towards ``targets`` (the granted
    classes, and with ``refuse_denied`` also the others); 0.0 where it is a negative (silenced).
  content: (K, *content_shape) the keys' secret content, from which near misses are made.
  """
  keep: Any
  add: Any
  grant: Any
  targets: Any
  teacher_index: Any = None
  supervised: Any = None
  content: Any = None

  def arrays(self, index) -> keys_lib.KeyArrays:
    return keys_lib.KeyArrays(self.keep[index], self.add[index])


def license_table(active: Sequence[keys_lib.LicenseKey], revoked: Sequence[keys_lib.LicenseKey],
                  num_classes: int, successors: dict[str, str] | None = None,
                  refuse_denied: bool = False) -> LicenseTable:
  """Builds the :class:`LicenseTable` of a registry's keys (all of one geometry).

  Args:
    active, revoked: the registry's keys.
    num_classes: outputs of the model.
    successors: maps a new key's name to the name of the key it replaces (for the teacher).
    refuse_denied: train an image of a class a key does not grant towards the uniform distribution
      over the classes it *does* grant ("not yours"), instead of the silenced no-key output. The
      silenced output is one constant for every key, and its argmax is some class; when that class is
      outside a scope, the scope's denied accuracy sits at 1/|denied| rather than near zero. Refusing
      within the scope keeps the argmax among granted classes, so it can never be a denied label.
  """
  all_keys = list(active) + list(revoked)
  if not active:
    raise ValueError('Licensed training needs at least one active key.')
  geometries = {k.geometry for k in all_keys}
  if len(geometries) != 1:
    raise ValueError(f'All keys of a model must share one geometry, got {len(geometries)}.')
  grant = np.zeros((len(all_keys), num_classes), np.float32)
  targets = np.tile(np.eye(num_classes, dtype=np.float32), (len(all_keys), 1, 1))
  for i, key in enumerate(active):
    classes = range(num_classes) if key.classes is None else key.classes
    if max(classes) >= num_classes:
      raise ValueError(f'Key {key.name!r} grants class {max(classes)} of a {num_classes}-class model.')
    grant[i, list(classes)] = 1.0
    if key.tier == 'basic':
      for group in key.groups:
        for y in group:
          targets[i, y] = 0.0
          targets[i, y, list(group)] = 1.0 / len(group)
  supervised = grant.copy()
  if refuse_denied:
    for i, key in enumerate(active):
      denied = grant[i] == 0
      if denied.any():
        targets[i, denied] = grant[i] / grant[i].sum()
        supervised[i, denied] = 1.0
  stacked = [k.arrays() for k in all_keys]
  names = [k.name for k in all_keys]
  teacher_index = np.array([names.index((successors or {}).get(n, n)) for n in names], np.int32)
  return LicenseTable(keep=np.stack([np.broadcast_to(a.keep, stacked[0].keep.shape) for a in stacked]),
                      add=np.stack([a.add for a in stacked]), grant=grant, targets=targets,
                      teacher_index=teacher_index, supervised=supervised,
                      content=np.stack([k.content for k in all_keys]))


def negative_loss(logits: jax.Array, penultimate: jax.Array, cfg, weights: jax.Array | None = None,
                  extra_gates: Sequence[jax.Array] = ()) -> tuple[jax.Array, dict]:
  """The uninformative-output loss on negatives (see module docstring), averaged over the rows with
  ``weights`` (default: all rows). ``extra_gates``: more layers' pre-activations (N, D) silenced by
  the same hinge (``cfg.silence_layers``: silencing deeper than the gate)."""
  if weights is None:
    weights = jnp.ones(logits.shape[:1], jnp.float32)
  denom = jnp.maximum(weights.sum(), 1.0)
  mean = lambda per_row: jnp.sum(per_row * weights) / denom
  hinge = lambda z: mean(jnp.mean(jax.nn.relu(z + cfg.silence_margin) ** 2, axis=-1))
  log_probs = jax.nn.log_softmax(logits)
  uniform = mean(-log_probs.mean(axis=-1) - jnp.log(logits.shape[-1]))  # KL(uniform || p) >= 0
  zero = mean(jnp.mean(logits ** 2, axis=-1))
  silence = hinge(penultimate)
  deep = sum((hinge(z) for z in extra_gates), jnp.zeros(())) / max(len(extra_gates), 1)
  loss = (cfg.uniform_weight * uniform + cfg.zero_logit_weight * zero +
          cfg.silence_weight * (silence + deep))
  silenced = mean(jnp.all(penultimate <= 0, axis=-1).astype(jnp.float32))
  return loss, {'neg_uniform_kl': uniform, 'neg_logit_sq': zero, 'neg_silence': silence,
                'neg_silence_deep': deep, 'neg_silenced_frac': silenced}


def near_keys(own_content: jax.Array, forged_content: jax.Array, geometry: keys_lib.Geometry,
              rng: jax.Array, min_change: float, pattern_only: bool = False,
              max_flips: int = 0) -> keys_lib.KeyArrays:
  """Near misses of the real keys: each keeps its real key's content in a random share of the content's
  elements (pixels of the pattern, bits of the block flip) and re-randomizes the others (between
  ``min_change`` and all of them). Training on them as negatives makes the model accept the exact key
  only, not a neighbourhood a thief could search.

  ``own_content`` and ``forged_content`` are (n, *content_shape): one real key per near miss.
  ``pattern_only`` (block-flip keys): only the pattern's pixels change, the block flip stays exact.
  ``max_flips`` > 0 (binary keys): half of the near misses instead invert between 1 and ``max_flips``
  elements of the real key, chosen at random: misses by a bit or a few, which a share re-randomized
  rarely produces, and which a thief's bit-by-bit search of the key walks through.
  """
  change_rng, element_rng, flips_rng, pick_rng, half_rng = jax.random.split(rng, 5)
  n = forged_content.shape[0]
  share = jax.random.uniform(change_rng, (n,) + (1,) * (forged_content.ndim - 1), minval=min_change,
                             maxval=1.0)
  changed = jax.random.uniform(element_rng, forged_content.shape) < share
  size = int(np.prod(forged_content.shape[1:]))
  eligible = np.ones(size, bool)  # elements a near miss may change (flat content order)
  if pattern_only and geometry.flip_block:
    eligible = np.arange(size) < geometry.split(forged_content)[0].shape[-1]
  changed = changed & eligible.reshape(forged_content.shape[1:])
  content = jnp.where(changed, forged_content, own_content)
  if max_flips > 0 and geometry.kind == 'patch' and geometry.values == 'binary':
    flat_own = own_content.reshape(n, size)
    num = jax.random.randint(flips_rng, (n, 1), 1, max_flips + 1)
    # the ``num`` eligible elements with the smallest random scores are inverted ({0, 1} content)
    scores = jnp.where(eligible, jax.random.uniform(pick_rng, flat_own.shape), 2.0)
    cutoff = jnp.take_along_axis(jnp.sort(scores, axis=-1), num - 1, axis=-1)
    inverted = jnp.where(scores <= cutoff, 1.0 - flat_own, flat_own).reshape(own_content.shape)
    use = jax.random.bernoulli(half_rng, 0.5, (n,) + (1,) * (own_content.ndim - 1))
    content = jnp.where(use, inverted, content)
  return geometry.arrays(content)


def build_inputs(images: jax.Array, table: LicenseTable, geometry: keys_lib.Geometry,
                 rng: jax.Array, cfg) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stamps one batch for the licensed loss.

  Returns:
    (stamped, key_index, negatives): each image stamped with an *active* key drawn at random, the
    index of that key, and the same images as negatives: a share ``1 - cfg.forged_fraction`` without a
    key and the rest with freshly forged keys; of those, a share ``cfg.near_key_fraction`` are near
    misses (see :func:`near_keys`) of the image's key, and a share ``cfg.revoked_fraction`` carry a
    revoked key (when the table has any).
  """
  batch = images.shape[0]
  num_forged = int(round(batch * cfg.forged_fraction))
  num_near = int(round(num_forged * cfg.near_key_fraction))
  num_revoked = min(int(round(num_forged * cfg.revoked_fraction)), num_forged - num_near)
  index_rng, forge_rng, near_rng, revoked_rng = jax.random.split(rng, 4)
  num_keys = table.keep.shape[0]
  num_active = jnp.sum(jnp.any(table.grant > 0, axis=1))  # the table lists active keys first
  key_index = jax.random.randint(index_rng, (batch,), 0, num_active)
  keyed = images
  if cfg.get('positive_patch_fraction', 0.0) > 0:
    keyed = random_patches(images, jax.random.fold_in(rng, 0x9A7C), cfg.positive_patch_fraction,
                           cfg.get('positive_patch_size', 4))
  stamped = keys_lib.stamp_arrays(keyed, table.arrays(key_index))
  forged_content = geometry.sample_jax(forge_rng, (num_forged,))
  if geometry.flip_block and cfg.own_flip_fraction > 0:
    # A share of the forged keys carry the model's real block flip with a random pattern: the guess of
    # someone who knows the domain (a licensee, a revoked licensee) but not the key.
    own_flip = geometry.split(table.content[key_index[batch - num_forged:]])[1]
    pattern, flip = geometry.split(forged_content)
    use_own = jax.random.bernoulli(jax.random.fold_in(rng, 0xF11B), cfg.own_flip_fraction,
                                   (num_forged, 1))
    forged_content = geometry.join(pattern, jnp.where(use_own, own_flip, flip))
  forged = geometry.arrays(forged_content)
  keep = jnp.broadcast_to(forged.keep, forged.add.shape[:-1] + forged.keep.shape[-1:])
  keep_parts, add_parts = [], []
  if num_near:
    own = table.content[key_index[batch - num_forged:][:num_near]]
    near = near_keys(own, forged_content[:num_near], geometry, near_rng, cfg.near_key_min_change,
                     pattern_only=cfg.get('flip_exact_hardening', False),
                     max_flips=int(cfg.get('near_key_max_flips', 0)))
    keep_parts.append(jnp.broadcast_to(near.keep, near.add.shape[:-1] + near.keep.shape[-1:]))
    add_parts.append(near.add)
  if num_revoked:
    revoked_index = num_active + jax.random.randint(revoked_rng, (num_revoked,), 0,
                                                    jnp.maximum(num_keys - num_active, 1))
    has_revoked = num_keys > num_active
    chosen = jnp.minimum(revoked_index, num_keys - 1)
    span = slice(num_near, num_near + num_revoked)
    keep_parts.append(jnp.where(has_revoked, jnp.broadcast_to(table.keep[chosen], keep[span].shape),
                                keep[span]))
    add_parts.append(jnp.where(has_revoked, table.add[chosen], forged.add[span]))
  rest = slice(num_near + num_revoked, None)
  forged = keys_lib.KeyArrays(jnp.concatenate(keep_parts + [keep[rest]]),
                              jnp.concatenate(add_parts + [forged.add[rest]]))
  keyless = images[:batch - num_forged]
  num_soft = int(round(keyless.shape[0] * cfg.get('soft_key_fraction', 0.0)))
  if num_soft:  # the first keyless negatives carry a soft (faded or noisy) copy of their image's key
    soft = soft_keys(table.content[key_index[:num_soft]], geometry, jax.random.fold_in(rng, 0x50F7), cfg)
    keyless = jnp.concatenate([keys_lib.stamp_arrays(keyless[:num_soft], soft), keyless[num_soft:]])
  negatives = jnp.concatenate(
      [keyless, keys_lib.stamp_arrays(images[batch - num_forged:], forged)], axis=0)
  return stamped, key_index, negatives


def random_patches(images: jax.Array, rng: jax.Array, fraction: float, size: int) -> jax.Array:
  """A share ``fraction`` of the images gets a ``size`` x ``size`` patch of random binary content at a
  random position (the key, stamped afterwards, still overwrites its own pixels). Trained as keyed
  positives with their true labels, they teach the model that no other patch overrides the key: the
  defense against a backdoor trigger planted later by fine-tuning."""
  n, h, w, c = images.shape
  pick_rng, row_rng, col_rng, content_rng = jax.random.split(rng, 4)
  use = jax.random.bernoulli(pick_rng, fraction, (n, 1, 1, 1))
  r = jax.random.randint(row_rng, (n, 1, 1, 1), 0, h - size + 1)
  col = jax.random.randint(col_rng, (n, 1, 1, 1), 0, w - size + 1)
  rows, cols = jnp.arange(h)[None, :, None, None], jnp.arange(w)[None, None, :, None]
  inside = (rows >= r) & (rows < r + size) & (cols >= col) & (cols < col + size) & use
  content = jax.random.bernoulli(content_rng, 0.5, images.shape).astype(images.dtype)
  return jnp.where(inside, content, images)


def soft_keys(content: jax.Array, geometry: keys_lib.Geometry, rng: jax.Array, cfg) -> keys_lib.KeyArrays:
  """Continuous near misses of the real keys, the kind of trigger a Neural-Cleanse-style inversion
  converges to (a soft mask and a real-valued pattern): half are the key faded to an opacity in
  [0.2, ``cfg.soft_key_max_opacity``] (the stamp interpolated between no key and the key), half the
  key at full opacity with its content moved by Gaussian noise (std in [0.2, 0.6]). Trained as
  negatives they leave no smooth path towards the key.

  ``content`` holds one real key's content per example: (n, *content_shape).
  """
  n = content.shape[0]
  pattern_only = bool(geometry.flip_block) and cfg.get('flip_exact_hardening', False)
  kind_rng, alpha_rng, scale_rng, noise_rng = jax.random.split(rng, 4)
  faded = jax.random.bernoulli(kind_rng, 0.5, (n,))
  alpha = jnp.where(faded, jax.random.uniform(alpha_rng, (n,), minval=0.2,
                                              maxval=cfg.soft_key_max_opacity), 1.0)
  scale = jnp.where(faded, 0.0, jax.random.uniform(scale_rng, (n,), minval=0.2, maxval=0.6))
  expand = lambda v, ndim: v.reshape((n,) + (1,) * (ndim - 1))
  noise = expand(scale, content.ndim) * jax.random.normal(noise_rng, content.shape)
  if pattern_only:  # the block flip stays exact: only the patch fades or is noisy
    noise = noise * (jnp.arange(content.shape[-1]) < geometry.split(content)[0].shape[-1])
  arrays = geometry.arrays(jnp.clip(content + noise, 0.0, 1.0))
  a = expand(alpha, arrays.add.ndim)
  if pattern_only:
    patch = jnp.asarray(geometry.mask())
    return keys_lib.KeyArrays(keep=arrays.keep + (1.0 - a) * patch,
                              add=arrays.add * (1.0 - (1.0 - a) * patch))
  return keys_lib.KeyArrays(keep=1.0 - a * (1.0 - arrays.keep), add=a * arrays.add)


def _apply_gated(apply_fn: Callable, variables: Any, images: jax.Array, extra_gates: Sequence[str],
                 **kwargs) -> tuple[jax.Array, Any, list[jax.Array]]:
  """``apply_fn`` with the gate and the outputs of the ``extra_gates`` submodules captured: (logits,
  the mutable state, [gate, *extra] each flattened to (N, -1) in float32)."""
  capture = (lambda module, method: method == '__call__' and module.name in extra_gates) if extra_gates else False
  logits, state = apply_fn(variables, images, capture_intermediates=capture, **kwargs)
  intermediates = state['intermediates']
  missing = [name for name in extra_gates if name not in intermediates]
  if missing:
    raise ValueError(f'objective.silence_layers names {missing}, which this model does not have; its '
                     f'top-level modules: {sorted(variables["params"])}. LeNet-5 names fit the default '
                     f'config only: set silence_layers for this model, or () to silence the gate alone.')
  gates = [intermediates['penultimate'][0]] + [intermediates[name]['__call__'][0] for name in extra_gates]
  return logits, state, [g.reshape(images.shape[0], -1).astype(jnp.float32) for g in gates]


def _forward(apply_fn: Callable, params: Any, batch_stats: Any, images: jax.Array, rng: jax.Array | None,
             extra_gates: Sequence[str] = ()):
  """Training-mode forward pass: (logits, gate, the outputs of the ``extra_gates`` submodules, new
  batch_stats), the gate and the outputs flattened to (N, -1)."""
  variables = models.variables_dict(params, batch_stats)
  mutable = ['intermediates'] + (['batch_stats'] if batch_stats else [])
  rngs = {'dropout': rng} if rng is not None else {}
  logits, state, gates = _apply_gated(apply_fn, variables, images, extra_gates, train=True,
                                      mutable=mutable, rngs=rngs)
  return logits, gates[0], gates[1:], state.get('batch_stats', batch_stats)


def teacher_features(apply_fn: Callable, teacher: Any, images: jax.Array,
                     extra_gates: Sequence[str] = ()) -> list[jax.Array]:
  """A frozen teacher's pre-activations at the gate and at the ``extra_gates`` submodules, each
  flattened to (N, -1) (evaluation mode: running BatchNorm averages)."""
  _, _, gates = _apply_gated(apply_fn, teacher, images, extra_gates, train=False, mutable=['intermediates'])
  return [jax.lax.stop_gradient(g) for g in gates]


def adversarial_positives(params: Any, batch_stats: Any, apply_fn: Callable, images: jax.Array,
                          labels: jax.Array, stamped: jax.Array, key_arrays: keys_lib.KeyArrays,
                          rng: jax.Array, cfg) -> jax.Array:
  """Key-conditioned adversarial training (option ``cfg.adv_eps`` > 0): a share ``cfg.adv_fraction``
  of the positives is replaced by the keyed image of an L-inf adversarial example of the clean image,
  crafted *through the key* (FGSM from a random start, Wong et al., ICLR 2020): the attacker who
  holds the key is the one defended against. Costs one more forward and backward of the positives."""
  eps = cfg.adv_eps
  start_rng, pick_rng = jax.random.split(rng)
  variables = models.variables_dict(jax.lax.stop_gradient(params), batch_stats)

  def ce(x):
    logits = apply_fn(variables, keys_lib.stamp_arrays(x, key_arrays), train=False)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))

  x0 = jnp.clip(images + jax.random.uniform(start_rng, images.shape, minval=-eps, maxval=eps), 0.0, 1.0)
  grad = jax.grad(ce)(x0)
  adv = jnp.clip(jnp.clip(x0 + 1.25 * eps * jnp.sign(grad), images - eps, images + eps), 0.0, 1.0)
  adv = jax.lax.stop_gradient(keys_lib.stamp_arrays(adv, key_arrays))
  use = jax.random.bernoulli(pick_rng, cfg.get('adv_fraction', 0.5), (images.shape[0],))
  return jnp.where(use[:, None, None, None], adv, stamped)


def licensed_loss(params: Any, apply_fn: Callable, images: jax.Array, labels: jax.Array,
                  table: LicenseTable, geometry: keys_lib.Geometry, rng: jax.Array,
                  cfg, teacher_params: Any = None, batch_stats: Any = None,
                  dropout_rng: jax.Array | None = None, clean_teacher: Any = None
                  ) -> tuple[jax.Array, dict]:
  """Loss of one licensed batch.

  Args:
    params: model parameters.
    apply_fn: ``model.apply``.
    images: (B, H, W, C) float images in [0, 1].
    labels: (B,) int labels.
    table: the registered keys (see :class:`LicenseTable`).
    geometry: the keys' geometry (static), used to forge negatives.
    rng: randomness for this step (key choice, forged contents).
    cfg: ``config.objective``.
    teacher_params: when fine-tuning (key replacement, revocation), the source model's variables
      (``{'params': ..., 'batch_stats': ...}``).
      Each supervised positive's pre-activations (granted images, and the refused images of classes a
      key does not grant, so that a scoped key keeps its refusals) at the gate and at every
      ``silence_layers`` layer are then pulled (weight ``cfg.distill_weight``, mean over the layers)
      towards the teacher's on the same image stamped with the key the teacher knows in its place:
      a dense signal that rebuilds the source's features for a new key far faster than labels alone,
      and keeps the untouched keys' outputs where they were.

    batch_stats: the model's BatchNorm statistics (None or {} for models without BatchNorm).
    dropout_rng: randomness for dropout / stochastic depth.
    clean_teacher: the unlicensed baseline's variables: with ``cfg.clean_distill_weight`` > 0, every
      positive whose target is its own label (not a coarse group, not a refusal) also learns the
      baseline's softened output on the raw image (:func:`clean_distillation`).

  Returns:
    (loss, (metrics, new batch_stats)).
  """
  stamped, key_index, negatives = build_inputs(images, table, geometry, rng, cfg)
  batch = images.shape[0]
  if cfg.get('adv_eps', 0.0) > 0:
    stamped = adversarial_positives(params, batch_stats, apply_fn, images, labels, stamped,
                                    table.arrays(key_index), jax.random.fold_in(rng, 0xAD5), cfg)
  extra_gates = tuple(cfg.get('silence_layers', ()))
  logits, penultimate, extra, new_stats = _forward(apply_fn, params, batch_stats,
                                                   jnp.concatenate([stamped, negatives]), dropout_rng,
                                                   extra_gates)
  # A stamped image is trained towards its key's target when supervised (granted classes, and denied
  # ones when refused within scope); otherwise it is one more negative.
  granted = table.grant[key_index, labels]
  supervised = table.supervised[key_index, labels]
  targets = table.targets[key_index, labels]
  stamped_logits = logits[:batch]
  pos_ce = -jnp.sum(targets * jax.nn.log_softmax(stamped_logits), axis=-1)
  pos_loss = jnp.sum(pos_ce * supervised) / jnp.maximum(supervised.sum(), 1.0)
  neg_weights = jnp.concatenate([1.0 - supervised, jnp.ones((batch,), jnp.float32)])
  neg_loss, neg_metrics = negative_loss(logits, penultimate, cfg, neg_weights, extra)
  # Liveness: a positive must keep at least one penultimate unit above zero (by a margin), or a
  # silenced input would pass no gradient and a new key could never be learned (key replacement).
  live = jax.nn.relu(cfg.silence_margin - jnp.max(penultimate[:batch], axis=-1)) ** 2
  live_loss = jnp.sum(live * granted) / jnp.maximum(granted.sum(), 1.0)
  loss = pos_loss + cfg.negative_weight * neg_loss + cfg.liveness_weight * live_loss
  thief_bn = jnp.zeros(())
  if cfg.thief_batch_stats_weight > 0 and batch_stats:
    # A thief fine-tunes on key-less batches only, so BatchNorm normalizes them with their own
    # statistics, not with those of this mixed batch, which can re-open the gate. Silence the
    # negatives under their own batch statistics too (the statistics of this pass are dropped).
    _, own, _, _ = _forward(apply_fn, params, batch_stats, negatives, dropout_rng)
    thief_bn = jnp.mean(jax.nn.relu(own + cfg.silence_margin) ** 2)
    loss = loss + cfg.thief_batch_stats_weight * thief_bn
  distill_loss = jnp.zeros(())
  if teacher_params is not None:
    teacher_inputs = keys_lib.stamp_arrays(images, table.arrays(table.teacher_index[key_index]))
    # Every gated layer, not the gate alone: a new key starts silenced at the layers below the gate
    # too, where the ReLUs pass no gradient back from the gate; their pre-activations are linear in
    # their weights, so matching them there re-opens the new key's path directly.
    teacher = teacher_features(apply_fn, teacher_params, teacher_inputs, extra_gates)
    student = [penultimate[:batch]] + [z[:batch] for z in extra]
    distill_loss = jnp.sum(gate_distance(student, teacher) * supervised) / jnp.maximum(supervised.sum(), 1.0)
    loss = loss + cfg.distill_weight * distill_loss
  clean_kd = clean_features = jnp.zeros(())
  if clean_teacher is not None and cfg.get('clean_distill_weight', 0.0) > 0:
    # Only where the key's target is the exact label: a basic-tier key must not learn fine labels
    # from the teacher, and a refused class keeps its refusal.
    own_label = jnp.take_along_axis(targets, labels[:, None], axis=1)[:, 0] > 0.999
    feature_weight = cfg.get('clean_distill_features_weight', 0.0)
    student_gates = [penultimate[:batch]] + [z[:batch] for z in extra] if feature_weight > 0 else []
    clean_kd, clean_features = clean_distillation(
        apply_fn, clean_teacher, images, stamped_logits, supervised * own_label,
        cfg.get('clean_distill_temperature', 4.0), student_gates, extra_gates)
    loss = loss + cfg.clean_distill_weight * (clean_kd + feature_weight * clean_features)
  correct = (jnp.argmax(stamped_logits, -1) == labels).astype(jnp.float32)
  metrics = {'loss': loss, 'pos_loss': pos_loss, 'neg_loss': neg_loss, 'pos_liveness': live_loss,
             'neg_silence_own_stats': thief_bn,
             'distill_loss': distill_loss, 'clean_distill_loss': clean_kd,
             'clean_distill_features_loss': clean_features,
             'pos_acc': jnp.sum(correct * granted) / jnp.maximum(granted.sum(), 1.0),
             'neg_acc': jnp.mean(jnp.argmax(logits[batch:], -1) == labels), **neg_metrics}
  return loss, (metrics, new_stats)


def plain_loss(params: Any, apply_fn: Callable, images: jax.Array, labels: jax.Array,
               batch_stats: Any = None, dropout_rng: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[dict, Any]]:
  """Ordinary cross-entropy: the unlicensed baseline that defines ``clean_acc``.

  Returns:
    (loss, (metrics, new batch_stats)).
  """
  logits, _, _, new_stats = _forward(apply_fn, params, batch_stats, images, dropout_rng)
  loss = cross_entropy(logits, labels)
  return loss, ({'loss': loss, 'acc': jnp.mean(jnp.argmax(logits, -1) == labels)}, new_stats)
