"""Train state, the jitted data-parallel train step, the training loop and the whole job.

Workdir layout::

  WORKDIR/config.json        the config of the run (a rerun must match it; see _check_config)
  WORKDIR/keys/              key registry: registry.json + one .npz per key (kept apart from checkpoints)
  WORKDIR/checkpoints/       orbax checkpoints of the licensed model
  WORKDIR/baseline/          the unlicensed baseline (same recipe) that defines clean_acc
  WORKDIR/tensorboard/       training curves (TensorBoard event files)
  WORKDIR/report/            metrics.json, summary.md, report.png
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from securenet_jax import checkpointing
from securenet_jax import data as data_lib
from securenet_jax import keys as keys_lib
from securenet_jax import models
from securenet_jax import objective
from securenet_jax import parallel
from securenet_jax.data import augment as augment_lib
from securenet_jax.data import prefetch as prefetch_lib

# Fields that may change between a run and its resumption without changing what is trained.
_RESUMABLE_FIELDS = ('eval', 'distributed', 'key.secret', 'train.log_every', 'train.checkpoint_every',
                     'train.prefetch', 'dataset.cache', 'dataset.cache_dir',
                     'train.keep_checkpoints')


# Fields added after the first release, with the value that reproduces what runs without them did:
# a rerun on an older workdir may leave them at that value.
_ADDED_FIELDS = {
    'dataset.augment': '', 'dataset.augment_pad': 4, 'dataset.image_size': 64,
    'dataset.celeba_task': 'identity', 'dataset.num_identities': 1000, 'dataset.attribute': 'Smiling',
    'dataset.celeba_crop': 140, 'dataset.test_fraction': 0.1, 'dataset.split_seed': 0,
    'dataset.label_mode': 'fine',
    'train.optimizer': 'adamw', 'train.momentum': 0.9, 'train.nesterov': False, 'train.agc_clip': 0.0,
    'train.grad_clip_norm': 0.0,
    'objective.soft_key_fraction': 0.0, 'objective.soft_key_max_opacity': 0.9,
    'objective.adv_eps': 0.0, 'objective.adv_fraction': 0.5, 'objective.positive_patch_fraction': 0.0,
    'objective.positive_patch_size': 4, 'dataset.noise_std': 0.0,
}


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, params, opt_state) plus the BatchNorm running statistics
  (``batch_stats``; an empty dict for models without BatchNorm)."""
  batch_stats: Any = None

  @property
  def variables(self) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` as ``model.apply`` takes them."""
    return models.variables_dict(self.params, self.batch_stats)


class Preempted(Exception):
  """Raised after a SIGTERM: the state was checkpointed and the job can be rerun to resume."""


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The config's model; ``config.model.kwargs.dtype`` may name a computation dtype ('bfloat16')."""
  kwargs = dict(config.model.get('kwargs', {}))
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return models.create(config.model.name, num_classes, **kwargs)


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay, from ``config.train``."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)


def _is_head(path) -> bool:
  """The classifier layer, which adaptive gradient clipping leaves alone (Brock et al., 2021)."""
  return any(getattr(p, 'key', None) in HEAD_NAMES for p in path)


HEAD_NAMES = ('head', 'fc3')


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of ``config.train`` on the schedule of :func:`make_schedule`.

  ``optimizer``: 'adamw' (decoupled weight decay) or 'sgd' (momentum ``momentum``, Nesterov if
  ``nesterov``, L2 weight decay added to the gradient as in the ResNet/VGG recipes).
  ``agc_clip`` > 0 adds adaptive gradient clipping (NFNets) to every layer but the classifier;
  ``grad_clip_norm`` > 0 clips the global gradient norm.
  """
  schedule = make_schedule(cfg, total_steps)
  name = cfg.get('optimizer', 'adamw')
  if name == 'adamw':
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                      optax.sgd(schedule, momentum=cfg.get('momentum', 0.9),
                                nesterov=cfg.get('nesterov', False)))
  else:
    raise ValueError(f'train.optimizer must be "adamw" or "sgd", got {name!r}.')
  pre = []
  if cfg.get('grad_clip_norm', 0.0) > 0:
    pre.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.get('agc_clip', 0.0) > 0:
    agc = optax.adaptive_grad_clip(cfg.agc_clip)
    pre.append(optax.masked(agc, lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not _is_head(path), params)))
  return optax.chain(*pre, opt) if pre else opt


def steps_per_epoch(config, num_train: int) -> int:
  return num_train // config.train.batch_size


def create_train_state(model, config, image_shape, num_train: int, rng: jax.Array) -> TrainState:
  """Initializes parameters and optimizer state (pure: fine inside jit / eval_shape)."""
  total_steps = config.train.num_epochs * steps_per_epoch(config, num_train)
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}),
                           tx=make_optimizer(config.train, total_steps))


def make_train_step(config, geometry: keys_lib.Geometry | None, licensed: bool) -> Callable:
  """Returns ``train_step(state, batch, table, base_rng) -> (state, metrics)``.

  The step is pure: its randomness is ``fold_in(base_rng, state.step)``, so a resumed run repeats
  the uninterrupted one exactly. The keys (``table``, an :class:`objective.LicenseTable`) are an
  argument, not a constant, so one compiled step serves any keys of the same geometry and number.
  """
  obj_cfg = config.objective

  augment = config.dataset.get('augment', '')
  if augment not in ('', 'crop_flip'):
    raise ValueError(f'dataset.augment must be "" or "crop_flip", got {augment!r}.')
  noise_std = float(config.dataset.get('noise_std', 0.0))
  if noise_std < 0:
    raise ValueError(f'dataset.noise_std must be >= 0, got {noise_std}.')

  def train_step(state: TrainState, batch: dict, table: objective.LicenseTable, base_rng: jax.Array,
                 teacher_params: Any = None):
    rng = jax.random.fold_in(base_rng, state.step)
    rng, aug_rng, dropout_rng = jax.random.split(rng, 3)
    images = keys_lib.to_float_images(batch['image'])
    # fold_in(aug_rng, i): one independent stream per augmentation.
    if augment == 'crop_flip':  # on the clean image, before any key is stamped
      images = augment_lib.crop_flip(images, jax.random.fold_in(aug_rng, 0),
                                     pad=config.dataset.get('augment_pad', 4))
    if noise_std > 0:  # likewise: the same noisy image on both sides of the licensed loss
      images = augment_lib.gaussian_noise(images, jax.random.fold_in(aug_rng, 1), noise_std)
    common = dict(apply_fn=state.apply_fn, images=images, labels=batch['label'],
                  batch_stats=state.batch_stats, dropout_rng=dropout_rng)
    if licensed:
      loss_fn = functools.partial(objective.licensed_loss, table=table, geometry=geometry, rng=rng,
                                  cfg=obj_cfg, teacher_params=teacher_params, **common)
    else:
      loss_fn = functools.partial(objective.plain_loss, **common)
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics

  return train_step


def jit_train_step(train_step: Callable, mesh) -> Callable:
  """Jits the step once for ``mesh``: batch sharded on ``data``, everything else replicated, the
  old state donated."""
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jax.jit(train_step, in_shardings=(repl, sharded, repl, repl, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


class _SigtermFlag:
  """Turns SIGTERM into a flag that the loop checks after each step (only in the main thread)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: checkpointing after the current step, then exiting.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _summary_writer(logdir: str):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(logdir=logdir, flush_secs=10)


def abstract_train_state(model, config, image_shape, num_train: int, mesh) -> Any:
  """Shapes, dtypes and (replicated) shardings of the train state, without allocating it."""
  abstract = jax.eval_shape(lambda: create_train_state(model, config, image_shape, num_train,
                                                       jax.random.key(0)))
  repl = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)


def train(config, workdir: str, dataset: data_lib.Dataset,
          keys: Sequence[keys_lib.LicenseKey] | keys_lib.LicenseKey | None,
          revoked: Sequence[keys_lib.LicenseKey] = (), mesh=None, stop_after_steps: int | None = None,
          init_params: Any = None, teacher_params: Any = None,
          successors: dict[str, str] | None = None) -> TrainState:
  """Trains a model (licensed when ``keys`` are given, plain otherwise), resuming from ``workdir``.

  Args:
    config: the run config.
    workdir: where checkpoints and TensorBoard summaries of this model go.
    dataset: training data.
    keys: the active license key(s), or None for the unlicensed baseline.
    revoked: revoked keys, trained as negatives.
    mesh: device mesh (default: all devices).
    stop_after_steps: stop (with a checkpoint) once the state reaches this step; for tests and
      staged runs. None trains to the end.
    init_params: start from these variables (``{'params', 'batch_stats'}``, or bare params) instead
      of a fresh initialization (fine-tuning), when the workdir has no checkpoint yet.
    teacher_params: a teacher's variables for the licensed loss (see ``objective.licensed_loss``).
    successors: new key name -> the key it replaces, for the teacher.

  Returns:
    The final train state.

  Raises:
    FloatingPointError: the loss became NaN or infinite.
    Preempted: SIGTERM arrived; the state was checkpointed first.
    checkpointing.CheckpointError: the workdir has a checkpoint this config cannot restore.
  """
  mesh = parallel.create_mesh() if mesh is None else mesh
  tcfg = config.train
  parallel.check_batch_size(tcfg.batch_size, mesh)
  if isinstance(keys, keys_lib.LicenseKey):
    keys = [keys]
  licensed = keys is not None
  model = build_model(config, dataset.num_classes)
  num_train = len(dataset.train_images)
  per_epoch = steps_per_epoch(config, num_train)
  total_steps = tcfg.num_epochs * per_epoch
  if per_epoch == 0:
    raise ValueError(f'train.batch_size={tcfg.batch_size} exceeds the {num_train} training examples.')

  if jax.process_index() == 0:
    write_model_info(workdir, dataset)
  mngr = checkpointing.manager(os.path.join(workdir, 'checkpoints'), tcfg.checkpoint_every,
                               tcfg.keep_checkpoints)
  abstract = abstract_train_state(model, config, dataset.image_shape, num_train, mesh)
  if mngr.latest_step() is not None:
    state = checkpointing.restore(mngr, abstract)
    logging.info('Resumed %s from step %d in %s', 'licensed model' if licensed else 'baseline',
                 int(state.step), workdir)
  else:
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    state = jax.jit(functools.partial(create_train_state, model, config, dataset.image_shape,
                                      num_train), out_shardings=parallel.replicated(mesh))(init_rng)
    if init_params is not None:
      init = models.as_variables(init_params)
      state = state.replace(params=jax.device_put(init['params'], parallel.replicated(mesh)),
                            batch_stats=jax.device_put(init.get('batch_stats', state.batch_stats),
                                                       parallel.replicated(mesh)),
                            opt_state=jax.jit(state.tx.init, out_shardings=parallel.replicated(mesh))(
                                init['params']))
  start = int(state.step)
  end = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)

  geometry = keys[0].geometry if licensed else None
  table = jax.device_put(
      objective.license_table(keys, revoked, dataset.num_classes, successors,
                              refuse_denied=config.license.get('denied_output', 'silence') == 'refuse')
      if licensed else objective.LicenseTable(*(np.zeros((1,), np.float32),) * 6), parallel.replicated(mesh))
  if teacher_params is not None:
    teacher_params = jax.device_put(models.as_variables(teacher_params), parallel.replicated(mesh))
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  schedule = make_schedule(tcfg, total_steps)
  step_fn = jit_train_step(make_train_step(config, geometry, licensed), mesh)
  host_batches = data_lib.train_batches(dataset.train_images, dataset.train_labels, tcfg.batch_size,
                                        config.seed, start, jax.process_index(), jax.process_count())
  # The next batches travel to the devices on a background thread while the current step runs.
  batches = prefetch_lib.prefetch(
      ({'image': image, 'label': label} for image, label in host_batches), tcfg.get('prefetch', 2),
      lambda b: parallel.host_to_global(b, mesh))
  writer = _summary_writer(os.path.join(workdir, 'tensorboard'))
  if start < end:
    logging.info('Training %s: steps %d..%d of %d (%d per epoch), global batch %d on %d device(s)',
                 'licensed model' if licensed else 'baseline', start, end, total_steps, per_epoch,
                 tcfg.batch_size, mesh.devices.size)

  def finite_or_raise(metrics, step):
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(f'Loss is {loss} at step {step} in {workdir}. Lower train.learning_rate '
                               f'or check the data; the last good checkpoint is step '
                               f'{mngr.latest_step()}.')

  prev = None
  t0, images_seen = time.perf_counter(), 0
  with _SigtermFlag() as sigterm:
    try:
      for step in range(start, end):
        batch = next(batches)
        state, metrics = step_fn(state, batch, table, base_rng, teacher_params)
        if prev is not None:  # one step behind, so the host never stalls the device pipeline
          finite_or_raise(*prev)
        prev = (metrics, step + 1)
        images_seen += tcfg.batch_size
        if (step + 1) % tcfg.log_every == 0 or step + 1 == end:
          metrics = jax.device_get(metrics)
          finite_or_raise(metrics, step + 1)
          elapsed = time.perf_counter() - t0
          metrics['images_per_sec'] = images_seen / elapsed
          metrics['learning_rate'] = schedule(step)
          logging.info('step %d/%d  %s', step + 1, total_steps,
                       '  '.join(f'{k} {float(v):.4g}' for k, v in sorted(metrics.items())
                                 if np.isfinite(float(v))))
          if writer is not None:
            for k, v in metrics.items():
              if np.isfinite(float(v)):
                writer.add_scalar(k, float(v), step + 1)
          t0, images_seen = time.perf_counter(), 0
        mngr.save(step + 1, args=checkpointing.ocp.args.StandardSave(state))
        if sigterm.requested:
          checkpointing.save_now(mngr, step + 1, state)
          mngr.wait_until_finished()
          raise Preempted(f'Stopped by SIGTERM at step {step + 1}; checkpoint saved in {workdir}. '
                          f'Rerun the same command to resume.')
      if prev is not None:
        finite_or_raise(*prev)
      if end > start:
        checkpointing.save_now(mngr, end, state)
    finally:
      batches.close()
      mngr.wait_until_finished()
      mngr.close()
      if writer is not None:
        writer.close()
  return state


def write_model_info(workdir: str, dataset: data_lib.Dataset) -> None:
  """WORKDIR/model.json: what ``inference.load`` needs besides the config (the number of classes
  and the image shape depend on dataset options such as CelebA's number of identities)."""
  os.makedirs(workdir, exist_ok=True)
  info = {'num_classes': int(dataset.num_classes), 'image_shape': [int(d) for d in dataset.image_shape]}
  keys_lib._atomic_write(os.path.join(workdir, 'model.json'),  # pylint: disable=protected-access
                         lambda f: f.write(json.dumps(info)))


def host_params(state: TrainState) -> dict:
  """This host's copy of the (replicated) variables (``{'params', 'batch_stats'}``), as numpy:
  evaluation runs per host."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.variables)


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _check_config(config, workdir: str) -> None:
  """Writes WORKDIR/config.json on the first run; on a rerun, refuses a config that would train a
  different model into the same checkpoints."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    def relevant(d):
      return {k: v for k, v in _flatten(d).items()
              if not any(k == f or k.startswith(f + '.') for f in _RESUMABLE_FIELDS)}
    a, b = relevant(saved), relevant(current)
    for k, neutral in _ADDED_FIELDS.items():  # a workdir from before a field existed trained as if
      if k not in a and k in b:               # the field had its neutral value
        a[k] = neutral
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
      raise ValueError(f'{workdir} was created with a different config (fields {diff}: '
                       f'{[(a.get(k), b.get(k)) for k in diff][:5]}). Use a new --workdir, or rerun with '
                       f'the config in {path}.')
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    keys_lib._atomic_write(path, lambda f: f.write(config.to_json_best_effort(indent=1)))


def license_grants(config, num_classes: int) -> list[dict]:
  """The keys a config asks for: name and grant (scheme, classes, tier, groups) of each user.

  ``config.license.matrix`` is the users x classes authorization matrix (0/1); empty means every user
  is granted every class. ``config.license.tiers`` gives each user's tier ('full' or 'basic').
  """
  lcfg = config.license
  if lcfg.get('denied_output', 'silence') not in ('silence', 'refuse'):
    raise ValueError(f'license.denied_output must be "silence" or "refuse", got {lcfg.denied_output!r}.')
  users = list(lcfg.users)
  if not users or len(set(users)) != len(users):
    raise ValueError(f'license.users must be distinct names, got {users}.')
  matrix = np.asarray(lcfg.matrix, np.int64) if len(lcfg.matrix) else np.ones((len(users), num_classes),
                                                                               np.int64)
  if matrix.shape != (len(users), num_classes) or not np.isin(matrix, (0, 1)).all():
    raise ValueError(f'license.matrix must be a {len(users)} x {num_classes} matrix of 0/1 '
                     f'(users x classes), got shape {matrix.shape}.')
  tiers = list(lcfg.tiers) if len(lcfg.tiers) else ['full'] * len(users)
  if len(tiers) != len(users):
    raise ValueError(f'license.tiers needs one tier per user ({len(users)}), got {tiers}.')
  groups = [list(g) for g in lcfg.groups] if len(lcfg.groups) else None
  if groups is not None and sorted(c for g in groups for c in g) != list(range(num_classes)):
    raise ValueError(f'license.groups must partition the {num_classes} classes, got {groups}.')
  grants = []
  for user, row, tier in zip(users, matrix, tiers):
    if not row.any():
      raise ValueError(f'User {user!r} is granted no class.')
    grants.append(dict(name=user, scheme=lcfg.scheme, classes=tuple(np.flatnonzero(row).tolist()),
                       tier=tier, groups=groups if tier == 'basic' else None))
  return grants


def setup_keys(config, workdir: str, image_shape, num_classes: int
               ) -> tuple[list[keys_lib.LicenseKey], list[keys_lib.LicenseKey]]:
  """Returns the run's (active, revoked) keys: from the workdir's registry when resuming, otherwise
  derived from ``config.key.secret`` (or a fresh random secret) for each user and registered."""
  kcfg = config.key
  key_dir = os.path.join(workdir, 'keys')
  geometry = keys_lib.Geometry.from_config(kcfg, image_shape)
  grants = license_grants(config, num_classes)
  if keys_lib.KeyRegistry.exists(key_dir):
    registry = keys_lib.KeyRegistry.load(key_dir)
    for grant in grants:
      if grant['name'] not in registry.active and grant['name'] not in registry.revoked:
        raise ValueError(f'The key registry in {key_dir} has no key {grant["name"]!r} '
                         f'(active: {sorted(registry.active)}).')
      key = {**registry.active, **registry.revoked}[grant['name']]
      if kcfg.secret and keys_lib.derive(kcfg.secret, geometry, **grant).fingerprint != key.fingerprint:
        raise ValueError(f'config.key.secret does not derive the key {key.name!r} registered in '
                         f'{key_dir}; this workdir was trained with another secret or grant.')
    return list(registry.active.values()), list(registry.revoked.values())
  secret = kcfg.secret
  if not secret:
    if jax.process_count() > 1:
      raise ValueError('Multi-process runs need an explicit --config.key.secret (every process must '
                       'derive the same keys).')
    secret = secrets.token_hex(32)
    logging.info('No key.secret given: generated a random one. The keys are saved in %s.', key_dir)
  keys = [keys_lib.derive(secret, geometry, **grant) for grant in grants]
  if jax.process_index() == 0:
    registry = keys_lib.KeyRegistry(key_dir)
    for key in keys:
      registry.add(key)
  return keys, []


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole job: data, key, licensed training, baseline, evaluation report.

  Returns:
    The metrics written to WORKDIR/report/metrics.json.
  """
  from securenet_jax import evaluate  # pylint: disable=g-import-not-at-top  (evaluate imports train)
  parallel.log_devices()
  dataset = data_lib.load(config.dataset)
  _check_config(config, workdir)
  active, revoked = setup_keys(config, workdir, dataset.image_shape, dataset.num_classes)
  logging.info('License keys: %s; revoked: %s', active, revoked)
  t0 = time.perf_counter()
  state = train(config, workdir, dataset, active, revoked)
  timings = {'licensed_train_s': time.perf_counter() - t0}
  baseline_state = None
  if config.eval.clean_baseline:
    t0 = time.perf_counter()
    baseline_state = train(config, os.path.join(workdir, 'baseline'), dataset, None)
    timings['baseline_train_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  metrics = evaluate.evaluate_and_report(
      config, workdir, dataset, host_params(state), active, revoked,
      None if baseline_state is None else host_params(baseline_state),
      write=jax.process_index() == 0, extra=timings)
  logging.info('Timings: %s, evaluation %.1fs', timings, time.perf_counter() - t0)
  return metrics
