"""The sections of the security suite, each ``section(target, config) -> (flat figures, details)``.

Every attack runs against the licensed model of the target workdir and, beside it, the unprotected
baseline trained there (see ``securenet_jax/security/__init__.py`` and docs/security.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from securenet_jax import data as data_lib
from securenet_jax import errors
from securenet_jax import evaluate
from securenet_jax import images as images_lib
from securenet_jax import inference
from securenet_jax import keys as keys_lib
from securenet_jax import metrics
from securenet_jax import workdir as workdir_lib
from securenet_jax.attacks import adversarial as adversarial_lib
from securenet_jax.attacks import backdoor as backdoor_lib
from securenet_jax.attacks import common
from securenet_jax.attacks import keysearch as keysearch_lib
from securenet_jax.attacks import recovery as recovery_lib
from securenet_jax.attacks import removal as removal_lib
from securenet_jax.attacks import theft as theft_lib

# The owner's training procedure, for the sections that retrain (owner poisoning):
# (config, workdir, dataset, keys or None) -> trained variables. The job passes it in, so this module
# does not depend on the trainer.
TrainFn = Callable[[ml_collections.ConfigDict, workdir_lib.Workdir, data_lib.Dataset, Any], dict]


@dataclasses.dataclass
class Target:
  """What the attacks need: the licensed and the unprotected model, the key and the data."""
  licensed: inference.LicensedModel
  unprotected: inference.LicensedModel
  key: keys_lib.LicenseKey
  key_transform: object  # images -> images stamped with the true key
  train_images: np.ndarray  # float [0, 1]
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  config: ml_collections.ConfigDict  # the target's training config

  @property
  def module(self):
    """The network as it was trained (the attacks fine-tune and differentiate it)."""
    return self.licensed.training_module


def load_target(config) -> Target:
  if not config.target_workdir:
    raise errors.ConfigError('No target workdir given.', hint='Add --config.target_workdir=W (a trained workdir).')
  licensed = inference.load(config.target_workdir)
  try:
    unprotected = inference.load(config.target_workdir, baseline=True)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e} The security report compares against the unprotected baseline: '
                            f'train W with eval.clean_baseline=True.') from e
  if not licensed.keys:
    raise ValueError(f'{config.target_workdir} has no active key.')
  name = config.key_name or sorted(licensed.keys)[0]
  if name not in licensed.keys:
    raise ValueError(f'No active key {name!r} in {config.target_workdir}; active: {sorted(licensed.keys)}.')
  key = licensed.keys[name]
  dataset = data_lib.load(licensed.config.dataset)
  test_images, test_labels = dataset.test_images, dataset.test_labels
  return Target(licensed, unprotected, key,
                functools.partial(keys_lib.stamp_arrays, arrays=key.arrays()),
                images_lib.to_float(dataset.train_images), dataset.train_labels.astype(np.int32),
                images_lib.to_float(test_images), test_labels.astype(np.int32), licensed.config)


def _test_subset(t: Target, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  if not n or n >= len(t.test_labels):
    return t.test_images, t.test_labels
  rows = np.sort(np.random.default_rng([seed, 7]).permutation(len(t.test_labels))[:n])
  return t.test_images[rows], t.test_labels[rows]


def _acc(model: inference.LicensedModel, images, labels, key=None) -> float:
  return metrics.accuracy(model.logits(images, key), labels)


# --- 1. forgery -----------------------------------------------------------------------------------
def near_key(key: keys_lib.LicenseKey, fraction: float, seed: int) -> keys_lib.LicenseKey:
  """The true key with ``fraction`` of its pixels (all channels of each) drawn afresh; for a key with
  a block flip (flat content), ``fraction`` of its elements: pattern values and flip bits alike."""
  rng = np.random.default_rng([seed, 0x4EA7])
  content = np.array(key.content)
  units = content.shape[0] * content.shape[1] if content.ndim >= 2 else content.shape[0]
  chosen = rng.permutation(units)[:int(round(fraction * units))]
  fresh = key.geometry.sample_numpy(rng)
  flat, fresh_flat = content.reshape(units, -1), fresh.reshape(units, -1)
  flat[chosen] = fresh_flat[chosen]
  return key.replace(name=f'near-{fraction}-{seed}', content=flat.reshape(content.shape))


def shifted_keys(key: keys_lib.LicenseKey, shift: int) -> list[keys_lib.LicenseKey]:
  """The true key moved by ``shift`` pixels up, down, left and right (where it still fits)."""
  g = key.geometry
  if g.kind != 'patch':
    return []
  out = []
  for dr, dc in ((-shift, 0), (shift, 0), (0, -shift), (0, shift)):
    r, c = g.position[0] + dr, g.position[1] + dc
    if 0 <= r <= g.image_shape[0] - g.size and 0 <= c <= g.image_shape[1] - g.size:
      out.append(key.replace(name=f'shift-{dr}-{dc}', geometry=dataclasses.replace(g, position=(r, c))))
  return out


def forgery(t: Target, cfg) -> tuple[dict, dict]:
  f = cfg.forgery
  images, labels = _test_subset(t, f.num_test, cfg.seed + 5)
  forged = np.array([_acc(t.licensed, images, labels, keys_lib.forge(t.key, f.seed + i))
                     for i in range(f.num_forged)])
  near = {}
  for fraction in f.near_fractions:
    accs = [_acc(t.licensed, images, labels, near_key(t.key, fraction, cfg.seed * 1000 + d))
            for d in range(f.near_draws)]
    near[str(fraction)] = {'mean': float(np.mean(accs)), 'max': float(np.max(accs))}
  shifted = {}
  for s in f.shifts:
    accs = [_acc(t.licensed, images, labels, k) for k in shifted_keys(t.key, s)]
    if accs:
      shifted[str(s)] = {'mean': float(np.mean(accs)), 'max': float(np.max(accs))}
  quantiles = {f'q{q}': float(np.quantile(forged, q / 100)) for q in (50, 90, 99)}
  flat = {'authorized_acc': _acc(t.licensed, images, labels, t.key),
          'no_key_acc': _acc(t.licensed, images, labels),
          'forged_acc_mean': float(forged.mean()), 'forged_acc_max': float(forged.max()),
          'num_forged': int(f.num_forged), 'unprotected_acc': _acc(t.unprotected, images, labels)}
  return flat, {'forged_quantiles': quantiles, 'forged_acc': forged.tolist(), 'near_keys': near,
                'shifted_keys': shifted}


# --- 2. leakage -----------------------------------------------------------------------------------
def leakage(t: Target, cfg) -> tuple[dict, dict]:
  images, labels = _test_subset(t, cfg.num_test, cfg.seed)
  m = evaluate.leakage_metrics(t.licensed, images, labels, cfg.seed)
  flat = {k: m[k] for k in ('leak_argmin_acc', 'leak_probe_acc', 'leak_probe_features_acc',
                            'no_key_silenced_frac')}
  # The unprotected model leaks by design: a probe on its logits is its own accuracy.
  logits = t.unprotected.logits(images)
  return flat, {'unprotected_probe_acc': metrics.probe_accuracy(logits, labels, cfg.seed),
                'chance_acc': 1.0 / t.licensed.num_classes}


# --- 3. key recovery ------------------------------------------------------------------------------
def recovery(t: Target, cfg) -> tuple[dict, dict]:
  r = cfg.recovery
  images, labels = common.subset(t.train_images, t.train_labels, r.data_fraction, cfg.seed)
  test_images, test_labels = _test_subset(t, cfg.num_test, cfg.seed)
  h, w, _ = t.licensed.image_shape
  regions = {'whole': None, 'top_left': (0, 0, h // 2), 'top_right': (0, w - w // 2, h // 2),
             'bottom_left': (h - h // 2, 0, h // 2), 'bottom_right': (h - h // 2, w - w // 2, h // 2)}
  trials = {}
  for region_name, region in regions.items():
    for l1 in r.l1_weights:
      mask, pattern = recovery_lib.invert_trigger(
          t.module, t.licensed.variables, images, labels, steps=r.steps, learning_rate=r.learning_rate,
          l1_weight=l1, rng=jax.random.key(cfg.seed), batch_size=r.batch_size, region=region)
      acc = recovery_lib.recovered_accuracy(t.module, t.licensed.variables, mask, pattern, test_images,
                                        test_labels)
      trials[f'{region_name}/l1={l1}'] = {'acc': acc, 'mask_l1': float(np.mean(mask))}
  best = max(trials.values(), key=lambda d: d['acc'])
  return ({'recovered_acc': best['acc'], 'recovery_data_size': int(len(labels))},
          {'trials': trials, 'unprotected_acc': _acc(t.unprotected, test_images, test_labels)})


def keysearch(t: Target, cfg) -> tuple[dict, dict]:
  """A white-box thief who knows the key scheme searches the key bit by bit (attacks/keysearch.py)
  with his labeled data; the key he ends with is scored on key-less test data."""
  k = cfg.keysearch
  geometry = t.key.geometry
  if not keysearch_lib.searchable(geometry):
    return {}, {'skipped': f'not a binary patch key ({geometry.kind}, {geometry.values})'}
  images, labels = common.subset(t.train_images, t.train_labels, k.data_fraction, cfg.seed)
  test_images, test_labels = _test_subset(t, cfg.num_test, cfg.seed)
  out = keysearch_lib.search(t.module, t.licensed.variables, geometry, images, labels,
                             stages=tuple(k.stages), max_passes=k.max_passes, starts=k.starts,
                             seed=k.seed)
  found, true = out['content'].reshape(-1), np.asarray(t.key.content).reshape(-1)
  acc = functools.partial(keysearch_lib.key_accuracy, t.module, t.licensed.variables, geometry,
                          out['content'])
  flat = {'keysearch_acc': acc(test_images, test_labels),
          'keysearch_agreement': float(np.mean(found == true)),
          'keysearch_evaluations': int(out['evaluations'])}
  return flat, {'thief_data_acc': acc(images, labels), 'data_size': int(len(labels)),
                'elements': int(true.size), 'first_stage': out['first_stage'],
                'history': out['history'], 'seconds': out['seconds']}


# --- 4. removal -----------------------------------------------------------------------------------
def removal(t: Target, cfg) -> tuple[dict, dict]:
  r = cfg.removal
  test_images, test_labels = _test_subset(t, cfg.num_test, cfg.seed)
  result = removal_lib.finetune_vs_scratch(
      t.module, t.licensed.variables, t.train_images, t.train_labels, test_images, test_labels,
      fractions=tuple(r.fractions), epochs=r.epochs, batch_size=r.batch_size,
      learning_rates=tuple(r.learning_rates), seed=cfg.seed, min_steps=r.min_steps)
  flat = {k: v for k, v in result.items() if isinstance(v, float)}
  prune = removal_lib.pruning_sweep(t.module, t.licensed.variables, test_images, test_labels,
                                t.key_transform, fractions=tuple(r.prune_fractions))
  prune_unprotected = removal_lib.pruning_sweep(t.module, t.unprotected.variables, test_images, test_labels,
                                            None, fractions=tuple(r.prune_fractions))
  flat['prune_no_key_acc_max'] = float(prune['max_no_key_acc'])
  flat['prune_no_key_gain_max'] = float(prune['max_no_key_gain'])
  return flat, {'finetune': result, 'pruning': prune, 'pruning_unprotected': prune_unprotected}


# --- theft: the weights' worth to a thief with labeled data -------------------------------------
def theft(t: Target, cfg) -> tuple[dict, dict]:
  """Every transfer move (attacks/theft.py) on the licensed model and on the unprotected baseline, at
  each labeled fraction: ``theft_gain@k`` = best licensed move - scratch, and the unprotected twin."""
  c = cfg.theft
  recipe = theft_lib.Recipe(adam_learning_rates=tuple(c.adam_learning_rates),
                            sgd_learning_rates=tuple(c.sgd_learning_rates), epochs=c.epochs,
                            min_steps=c.min_steps, batch_size=c.batch_size)
  test_images, test_labels = _test_subset(t, cfg.num_test, cfg.seed)
  moves = tuple(c.moves) or None
  flat, detail = {}, {}
  for fraction in c.fractions:
    k = common.fraction_key(fraction)
    run = functools.partial(theft_lib.steal, t.module, train_images=t.train_images,
                            train_labels=t.train_labels, test_images=test_images,
                            test_labels=test_labels, fraction=fraction, recipe=recipe, seed=cfg.seed,
                            moves=moves)
    licensed = run(t.licensed.variables)
    detail[k] = {'licensed': licensed}
    flat[f'theft_gain@{k}'] = licensed['gain']
    if c.get('unprotected', True):
      unprotected = run(t.unprotected.variables, scratch_acc=licensed['scratch_acc'])  # same data, same sweep
      detail[k]['unprotected'] = unprotected
      flat[f'theft_gain_unprotected@{k}'] = unprotected['gain']
    flat[f'theft_scratch_acc@{k}'] = licensed['scratch_acc']
    flat[f'theft_best_move@{k}'] = licensed['best_move']
  return flat, detail


# --- 5. adversarial -------------------------------------------------------------------------------
def default_eps(image_shape) -> tuple[float, ...]:
  """The L-inf budgets when ``adversarial_lib.eps`` is empty: 0.1 and 0.2 for
  gray images (MNIST-like), 8/255 for color images (CIFAR-like)."""
  return (0.1, 0.2) if image_shape[-1] == 1 else (8 / 255,)


def adversarial(t: Target, cfg) -> tuple[dict, dict]:
  a = cfg.adversarial
  budgets = tuple(a.eps) or default_eps(t.licensed.image_shape)
  images, labels = _test_subset(t, a.num_test, cfg.seed + 1)
  rng = jax.random.key(cfg.seed)
  forged = keys_lib.forge(t.key, cfg.forgery.seed + 10 ** 6)
  forged_transform = functools.partial(keys_lib.stamp_arrays, arrays=forged.arrays())
  sur_images, sur_labels = common.subset(t.train_images, t.train_labels, a.surrogate_fraction, cfg.seed + 2)
  surrogate = common.fit(t.module, None, sur_images, sur_labels, epochs=a.surrogate_epochs,
                         learning_rate=1e-3, seed=cfg.seed + 3)
  lic, unp, mod = t.licensed.variables, t.unprotected.variables, t.module
  # Robust accuracy: the unprotected model on the adversarial images as they are; the licensed
  # pipeline on them stamped with the true key (the licensee stamps whatever input arrives).
  unprotected_acc = functools.partial(adversarial_lib.robust_accuracy, mod, unp, labels=labels)
  licensed_acc = functools.partial(adversarial_lib.robust_accuracy, mod, lic, labels=labels,
                                   eval_transform=t.key_transform)
  detail, flat = {}, {}
  for eps in budgets:
    step = a.step_size_factor * eps / a.steps
    pgd = functools.partial(adversarial_lib.pgd, mod, images=images, labels=labels, eps=eps, steps=a.steps,
                            step_size=step, restarts=a.restarts, rng=rng)
    fgsm = functools.partial(adversarial_lib.fgsm, mod, images=images, labels=labels, eps=eps)
    key = t.key_transform
    transfer = pgd(surrogate, transform=None)
    e = {
        'unprotected_clean': unprotected_acc(images),
        'pgd_unprotected': unprotected_acc(pgd(unp, transform=None)),
        'fgsm_unprotected': unprotected_acc(fgsm(unp, transform=None)),
        'transfer_unprotected': unprotected_acc(transfer),
        'licensed_clean': licensed_acc(images),
        'pgd_keyless_no_key': licensed_acc(pgd(lic, transform=None)),
        'pgd_keyless_forged_key': licensed_acc(pgd(lic, transform=forged_transform)),
        'pgd_keyless_transfer': licensed_acc(transfer),
        'fgsm_keyless_no_key': licensed_acc(fgsm(lic, transform=None)),
        'pgd_adaptive': licensed_acc(pgd(lic, transform=key)),
        'fgsm_adaptive': licensed_acc(fgsm(lic, transform=key)),
    }
    e['pgd_keyless'] = min(e['pgd_keyless_no_key'], e['pgd_keyless_forged_key'], e['pgd_keyless_transfer'])
    detail[f'eps={eps:g}'] = e
    suffix = '' if eps == budgets[0] else f'@{eps:g}'
    flat[f'pgd_unprotected_robust_acc{suffix}'] = e['pgd_unprotected']
    flat[f'pgd_keyless_robust_acc{suffix}'] = e['pgd_keyless']
    flat[f'pgd_adaptive_robust_acc{suffix}'] = e['pgd_adaptive']
  detail['surrogate_acc'] = adversarial_lib.robust_accuracy(mod, surrogate, images, labels)
  detail['num_test'] = int(len(labels))
  return flat, detail


# --- 6. backdoor ----------------------------------------------------------------------------------
def _trigger(name: str, image_shape, seed: int) -> keys_lib.KeyArrays:
  if name == 'badnets':
    return backdoor_lib.badnets_trigger(image_shape, seed=seed)
  if name == 'blend':
    return backdoor_lib.blend_trigger(image_shape, seed=seed)
  raise ValueError(f'Unknown trigger {name!r}; expected "badnets" or "blend".')


def backdoor(t: Target, cfg, out_dir: workdir_lib.Workdir, train_fn: TrainFn
                     ) -> tuple[dict, dict]:
  b = cfg.backdoor
  test_images, test_labels = _test_subset(t, cfg.num_test, cfg.seed)
  thief, owner = {}, {}
  for name in b.triggers:
    trigger = _trigger(name, t.licensed.image_shape, cfg.seed)
    common_kw = dict(trigger=trigger, target=b.target, poison_rate=b.thief_poison_rate,
                     data_fraction=b.thief_data_fraction, epochs=b.thief_epochs,
                     learning_rate=b.thief_learning_rate, seed=cfg.seed)
    thief[name] = {
        'licensed': backdoor_lib.thief_backdoor_finetune(
            t.module, t.licensed.variables, t.train_images, t.train_labels, test_images, test_labels,
            key_transform=t.key_transform,
            gate_open=lambda x: ~metrics.silenced(t.licensed.features(x, None)), **common_kw),
        'unprotected': backdoor_lib.thief_backdoor_finetune(
            t.module, t.unprotected.variables, t.train_images, t.train_labels, test_images, test_labels,
            key_transform=None, **common_kw)}
  first = b.triggers[0]
  trigger = _trigger(first, t.licensed.image_shape, cfg.seed)
  for rate in b.owner_rates:
    owner[str(rate)] = _owner_poisoning(t, cfg, trigger, rate, out_dir.sub(f'owner_{first}_{rate}'),
                                        test_images, test_labels, train_fn)
  flat = {'backdoor_finetune_asr_licensed': max(v['licensed']['asr_licensed'] for v in thief.values()),
          'backdoor_finetune_asr_unprotected': max(v['unprotected']['asr_raw'] for v in thief.values()),
          'backdoor_finetune_clean_acc_licensed': min(v['licensed']['clean_acc_licensed']
                                                      for v in thief.values()),
          'backdoor_finetune_asr_licensed_before': max(v['licensed']['asr_licensed_before']
                                                       for v in thief.values()),
          # the thief's inputs the stolen gate passes: one is enough to re-open it (docs/security.md)
          'backdoor_finetune_open_before': max(v['licensed']['num_open_before'] for v in thief.values())}
  for rate, v in owner.items():
    flat[f'backdoor_owner_asr_licensed@{rate}'] = v['asr_licensed']
    flat[f'backdoor_owner_asr_unprotected@{rate}'] = v['asr_unprotected']
  return flat, {'thief_finetune': thief, 'owner_poisoning': owner, 'owner_trigger': first}


def _owner_poisoning(t: Target, cfg, trigger, rate: float, workdir: workdir_lib.Workdir, test_images,
                     test_labels, train_fn: TrainFn) -> dict:
  """The owner's own (shortened) training on poisoned data: licensed and unprotected."""
  b = cfg.backdoor
  config = ml_collections.ConfigDict(t.config.to_dict())
  config.train.num_epochs = b.owner_epochs
  n = min(b.owner_train_limit or len(t.train_labels), len(t.train_labels))
  images = np.round(t.train_images[:n] * 255).astype(np.uint8)
  images, labels, _ = backdoor_lib.poison(images, t.train_labels[:n], trigger, b.target, rate, cfg.seed)
  dataset = data_lib.Dataset(t.config.dataset.name, t.licensed.num_classes, images, labels.astype(np.int32),
                             np.round(test_images * 255).astype(np.uint8), test_labels)
  lic = train_fn(config, workdir.sub('licensed'), dataset, [t.key])
  unp = train_fn(config, workdir.sub('unprotected'), dataset, None)
  asr = functools.partial(backdoor_lib.attack_success_rate, t.module, images=test_images, labels=test_labels,
                          trigger=trigger, target=b.target)
  return {'asr_licensed': asr(lic, transform=t.key_transform), 'asr_unprotected': asr(unp),
          'clean_acc_licensed': common.accuracy(t.module, lic, test_images, test_labels, t.key_transform),
          'clean_acc_unprotected': common.accuracy(t.module, unp, test_images, test_labels),
          'epochs': int(b.owner_epochs), 'train_examples': int(n)}


