"""Key replacement and revocation: re-license a trained model at a fraction of its training cost.

    python -m securenet_jax.main --config configs/replace_key.py \\
        --config.source_workdir=OLD --config.new_secret=S --workdir NEW

reads OLD (config, newest checkpoint, key registry) and writes a complete workdir NEW whose registry
marks the replaced key revoked and holds the new key (same grant) beside the untouched other keys.
The model is fine-tuned from OLD's weights with the licensed objective, where the revoked key is one
more negative: afterwards it is as useless as a forged key. With ``new_secret=''`` the key is only
revoked (e.g. one licensee of a multi-user model), and the others keep working.

The cost is reported as the ratio of optimizer steps of the fine-tuning to those of OLD's training.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from securenet_jax import checkpointing
from securenet_jax import data as data_lib
from securenet_jax import errors
from securenet_jax import evaluate
from securenet_jax import inference
from securenet_jax import licensing
from securenet_jax import models
from securenet_jax import parallel
from securenet_jax import train
from securenet_jax import workdir as workdir_lib


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
  # The source's own distillation from its unlicensed baseline goes on where the source has one.
  source_kd = source_config.objective.get('clean_distill_weight', 0.0) > 0 and source_config.eval.clean_baseline
  config.objective.clean_distill_weight = float(rcfg.clean_distill_weight) if source_kd else 0.0
  config.key.secret = ''
  config.smoke = bool(rcfg.smoke or source_config.smoke)
  config.eval.update(rcfg.eval)
  config.eval.clean_baseline = False
  config.replace = ml_collections.ConfigDict({
      'source_workdir': str(workdir_lib.Workdir(rcfg.source_workdir)), 'revoke': rcfg.revoke,
      'new_key_name': rcfg.new_key_name})
  return config


def replace_and_evaluate(rcfg: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """Runs the replacement job (see module docstring) and returns the new workdir's metrics.
  ``mesh``: the devices it trains on (default: every device of every process)."""
  if not rcfg.source_workdir:
    raise errors.ConfigError('No source workdir given.', hint='Add --config.source_workdir=OLD_WORKDIR.')
  source, wd = workdir_lib.Workdir(rcfg.source_workdir), workdir_lib.Workdir(workdir)
  if source.same_as(workdir):
    raise errors.ConfigError('--workdir must be a new directory, not the source workdir.')
  primary = parallel.is_primary()
  source_config = source.load_config()
  source_registry = licensing.load(source)
  if source_registry is None:
    raise errors.WorkdirError(f'{source} has no key registry: it holds no licensed model.')
  full = data_lib.load(source_config.dataset)
  config = derived_config(rcfg, source_config, len(full.train_images))
  if config.objective.clean_distill_weight > 0 and not source.baseline.checkpoints_dir.is_dir():
    raise errors.WorkdirError(
        f'{source} was trained with distillation from its unlicensed baseline, which is missing '
        f'({source.baseline.checkpoints_dir}).', hint='Add --config.clean_distill_weight=0.')
  dataset = data_lib.load(config.dataset)
  wd.save_or_check_config(config, write=primary)
  if primary:
    wd.write_model_info(full.num_classes, full.image_shape)
  # Every process looks at the registry before the primary can write one (the check waits for all).
  registry = licensing.load(wd)
  if parallel.same_on_every_process(registry is not None, f'{wd} holds a key registry'):
    # resuming an interrupted replacement
    active, revoked = list(registry.active.values()), list(registry.revoked.values())
  else:
    active, revoked = licensing.plan_replacement(source_registry, rcfg.revoke, rcfg.new_secret,
                                                 rcfg.new_key_name)
    if primary:
      licensing.register(wd, active, revoked)
  parallel.barrier('replace:written')
  logging.info('Replacement: active %s, revoked %s', [k.name for k in active], [k.name for k in revoked])

  module = models.build(source_config.model, full.num_classes)
  source_variables = checkpointing.restore_variables(
      source.checkpoints_dir, inference.abstract_variables(module, full.image_shape))
  clean_teacher = None
  if config.objective.clean_distill_weight > 0:
    clean_teacher = checkpointing.restore_variables(
        source.baseline.checkpoints_dir, inference.abstract_variables(module, full.image_shape))
  state = train.train(config, wd, dataset, active, revoked, mesh=mesh, init_variables=source_variables,
                      teacher_variables=source_variables if rcfg.distill_weight else None,
                      successors=licensing.successors(active, revoked), phase='replacement',
                      clean_teacher=clean_teacher)
  seconds = train.train_seconds(wd)
  source_steps = source_config.train.num_epochs * train.steps_per_epoch(source_config,
                                                                         len(full.train_images))
  steps = config.train.num_epochs * train.steps_per_epoch(config, len(dataset.train_images))
  extra = {'replace_steps': steps, 'source_steps': source_steps,
           'replace_cost_ratio': steps / source_steps, 'replace_train_s': seconds}
  model = train.licensed_model(config, full, train.host_variables(state), active, revoked)
  return evaluate.evaluate_and_report(config, wd, full, model, write=primary, extra=extra, timed='eval_s')
