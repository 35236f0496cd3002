"""Key replacement and revocation: re-license a trained model at a fraction of its training cost.

    python -m securenet_jax.main --config configs/replace_key.py \
        --config.source_workdir=OLD --config.new_secret=S --workdir NEW

reads OLD (config, latest checkpoint, key registry) and writes a complete workdir NEW whose registry
marks the replaced key revoked and holds the new key (same grant) beside the untouched other keys.
The model is fine-tuned from OLD's weights with the licensed objective, where the revoked key is one
more negative: afterwards it is as useless as a forged key. With ``new_secret=''`` the key is only
revoked (e.g. one licensee of a multi-user model), and the others keep working.

The cost is reported as the ratio of optimizer steps of the fine-tuning to those of OLD's training.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
from absl import logging

from securenet_jax import checkpointing
from securenet_jax import data as data_lib
from securenet_jax import keys as keys_lib
from securenet_jax import parallel
from securenet_jax import train


def _source(source_workdir: str):
  path = os.path.join(source_workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'source_workdir {source_workdir!r} is not a SecureNet-JAX workdir '
                            f'(no config.json).')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  return config, keys_lib.KeyRegistry.load(os.path.join(source_workdir, 'keys'))


def derived_config(rcfg, source_config, num_train: int) -> ml_collections.ConfigDict:
  """The config of the new workdir: the source's model, data, key geometry and objective, with the
  fine-tuning recipe of ``rcfg`` (configs/replace_key.py) as its training section."""
  config = source_config.copy_and_resolve_references()
  config.dataset.train_limit = int(round(rcfg.train_fraction * num_train))
  config.train.num_epochs = rcfg.num_epochs
  config.train.learning_rate = rcfg.learning_rate
  config.train.warmup_steps = rcfg.warmup_steps
  config.objective.liveness_weight = rcfg.liveness_weight
  config.objective.revoked_fraction = rcfg.revoked_fraction
  config.objective.distill_weight = rcfg.distill_weight
  config.key.secret = ''
  config.eval.update(rcfg.eval)
  config.eval.clean_baseline = False
  config.replace = ml_collections.ConfigDict({'source_workdir': os.path.abspath(rcfg.source_workdir),
                                              'revoke': rcfg.revoke, 'new_key_name': rcfg.new_key_name})
  return config


def _plan_registry(rcfg, source: keys_lib.KeyRegistry):
  """Returns (active, revoked) key lists of the new workdir."""
  active, revoked = dict(source.active), dict(source.revoked)
  name = rcfg.revoke or (next(iter(active)) if len(active) == 1 else '')
  if not name:
    raise ValueError(f'The source has several active keys {sorted(active)}: say which one to revoke '
                     f'with --config.revoke=NAME.')
  if name not in active:
    raise ValueError(f'No active key {name!r} in the source registry (active: {sorted(active)}).')
  old = active.pop(name)
  revoked[name] = old
  if rcfg.new_secret:
    new_name = rcfg.new_key_name or _next_name(name, set(active) | set(revoked))
    if new_name in active or new_name in revoked:
      raise ValueError(f'Key name {new_name!r} is already used in the registry.')
    new = keys_lib.derive(rcfg.new_secret, old.geometry, name=new_name, scheme=old.scheme,
                          classes=old.classes, tier=old.tier, groups=old.groups)
    active = {new_name: new, **active}
  elif not active:
    raise ValueError('Revoking the only key without a new_secret would leave a model nobody can use.')
  return list(active.values()), list(revoked.values())


def successors(active, revoked) -> dict[str, str]:
  """New key -> the revoked key it replaces (same grant), for the teacher."""
  out = {}
  for new in active:
    for old in revoked:
      if (old.classes, old.tier, old.groups) == (new.classes, new.tier, new.groups) and old.name != new.name:
        out.setdefault(new.name, old.name)
  return out


def _next_name(name: str, taken: set[str]) -> str:
  base, _, suffix = name.rpartition('.r')
  stem, n = (base, int(suffix) + 1) if base and suffix.isdigit() else (name, 2)
  while f'{stem}.r{n}' in taken:
    n += 1
  return f'{stem}.r{n}'


def replace_and_evaluate(rcfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the replacement job (see module docstring) and returns the new workdir's metrics."""
  if not rcfg.source_workdir:
    raise ValueError('Set --config.source_workdir=OLD_WORKDIR.')
  if os.path.abspath(rcfg.source_workdir) == os.path.abspath(workdir):
    raise ValueError('--workdir must be a new directory, not the source workdir.')
  source_config, source_registry = _source(rcfg.source_workdir)
  full = data_lib.load(source_config.dataset)
  config = derived_config(rcfg, source_config, len(full.train_images))
  dataset = data_lib.load(config.dataset)
  train._check_config(config, workdir)  # pylint: disable=protected-access
  key_dir = os.path.join(workdir, 'keys')
  if keys_lib.KeyRegistry.exists(key_dir):  # resuming an interrupted replacement
    registry = keys_lib.KeyRegistry.load(key_dir)
    active, revoked = list(registry.active.values()), list(registry.revoked.values())
  else:
    active, revoked = _plan_registry(rcfg, source_registry)
    if jax.process_index() == 0:
      registry = keys_lib.KeyRegistry(key_dir)
      for key in active:
        registry.add(key)
      for key in revoked:
        registry.add(key, revoked=True)
  logging.info('Replacement: active %s, revoked %s', [k.name for k in active], [k.name for k in revoked])

  module = train.build_model(source_config, full.num_classes)
  mesh = parallel.create_mesh()
  mngr = checkpointing.manager(os.path.join(rcfg.source_workdir, 'checkpoints'), 1, 1, read_only=True)
  try:
    source_state = checkpointing.restore(mngr, train.abstract_train_state(
        module, source_config, full.image_shape, len(full.train_images), mesh))
  finally:
    mngr.close()
  t0 = time.perf_counter()
  source_params = train.host_params(source_state)  # host copies: the step donates its own buffers
  state = train.train(config, workdir, dataset, active, revoked, init_params=source_params,
                      teacher_params=source_params if rcfg.distill_weight else None,
                      successors=successors(active, revoked))
  seconds = time.perf_counter() - t0
  source_steps = source_config.train.num_epochs * train.steps_per_epoch(source_config,
                                                                         len(full.train_images))
  steps = config.train.num_epochs * train.steps_per_epoch(config, len(dataset.train_images))
  extra = {'replace_steps': steps, 'source_steps': source_steps,
           'replace_cost_ratio': steps / source_steps, 'replace_train_s': seconds}
  from securenet_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.evaluate_and_report(config, workdir, full, train.host_params(state), active, revoked,
                                      write=jax.process_index() == 0, extra=extra)
