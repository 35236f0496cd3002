"""Train state, the jitted data-parallel train step, the training loop, and the training job.

``train_and_evaluate(config, workdir)`` is the job behind ``configs/default.py``: load the data, set up
the keys, train the licensed model, train the unlicensed baseline beside it, write the report.
``train(...)`` is the loop itself, also used by key replacement.
"""

from __future__ import annotations

import functools
import signal
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
from securenet_jax import evaluate
from securenet_jax import images as images_lib
from securenet_jax import inference
from securenet_jax import keys as keys_lib
from securenet_jax import licensing
from securenet_jax import loop_support
from securenet_jax import models
from securenet_jax import objective
from securenet_jax import parallel
from securenet_jax import workdir as workdir_lib
from securenet_jax.data import augment as augment_lib
from securenet_jax.data import prefetch as prefetch_lib


class TrainState(train_state.TrainState):
  """Flax's TrainState (step, params, opt_state) plus the BatchNorm running statistics
  (``batch_stats``; an empty dict for models without BatchNorm)."""
  batch_stats: Any = None

  @property
  def variables(self) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` as ``model.apply`` takes them."""
    return models.variables_dict(self.params, self.batch_stats)


class Preempted(Exception):
  """Raised after SIGTERM or SIGINT: the state was checkpointed and the job can be rerun to resume.

  Attributes:
    signum: the signal that stopped training.
    step: the step of the checkpoint.
  """

  def __init__(self, message: str, signum: int, step: int):
    super().__init__(message)
    self.signum = signum
    self.step = step


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay, from ``config.train``."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, head: str = 'head'
                   ) -> optax.GradientTransformation:
  """The optimizer of ``config.train`` on the schedule of :func:`make_schedule`.

  ``optimizer``: 'adamw' (decoupled weight decay) or 'sgd' (momentum ``momentum``, Nesterov if
  ``nesterov``, L2 weight decay added to the gradient as in the ResNet/VGG recipes).
  ``agc_clip`` > 0 adds adaptive gradient clipping (NFNets) to every layer but the classifier
  (parameters under ``head``: Brock et al., 2021); ``grad_clip_norm`` > 0 clips the global norm.
  """
  schedule = make_schedule(cfg, total_steps)
  if cfg.optimizer == 'adamw':
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                      optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
  else:
    raise ValueError(f'train.optimizer must be "adamw" or "sgd", got {cfg.optimizer!r}.')
  pre = []
  if cfg.grad_clip_norm > 0:
    pre.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.agc_clip > 0:
    not_head = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: all(getattr(p, 'key', None) != head for p in path), params)
    pre.append(optax.masked(optax.adaptive_grad_clip(cfg.agc_clip), not_head))
  return optax.chain(*pre, opt) if pre else opt


def steps_per_epoch(config, num_train: int) -> int:
  return num_train // config.train.batch_size


def create_train_state(model, config, image_shape, total_steps: int, rng: jax.Array) -> TrainState:
  """Initializes parameters and optimizer state (pure: fine inside jit / eval_shape)."""
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}),
                           tx=make_optimizer(config.train, total_steps, models.head_name(model)))


def make_train_step(config, geometry: keys_lib.Geometry | None, licensed: bool) -> Callable:
  """Returns ``train_step(state, batch, table, base_rng, teachers) -> (state, metrics)``.

  ``teachers`` is an :class:`objective.Teachers` (or None: no teacher).

  The step is pure: its randomness is ``fold_in(base_rng, state.step)``, so a resumed run repeats
  the uninterrupted one exactly. The keys (``table``, an :class:`objective.LicenseTable`) are an
  argument, not a constant, so one compiled step serves any keys of the same geometry and number.
  """
  augment = augment_lib.from_config(config.augment)

  def train_step(state: TrainState, batch: dict, table: objective.LicenseTable, base_rng: jax.Array,
                 teachers: objective.Teachers | None = None):
    teachers = teachers if teachers is not None else objective.Teachers()
    rng = jax.random.fold_in(base_rng, state.step)
    rng, aug_rng, dropout_rng = jax.random.split(rng, 3)
    # On the clean image, before any key is stamped: both sides of the licensed loss see the same
    # augmented image, so only the key separates them.
    images = augment(images_lib.to_float(batch['image']), aug_rng)
    common = dict(apply_fn=state.apply_fn, images=images, labels=batch['label'],
                  batch_stats=state.batch_stats, dropout_rng=dropout_rng)
    if licensed:
      loss_fn = functools.partial(objective.licensed_loss, table=table, geometry=geometry, rng=rng,
                                  cfg=config.objective, teacher_params=teachers.source,
                                  clean_teacher=teachers.clean, **common)
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


def _step_and_batches(train_step: Callable, config, dataset: data_lib.Dataset, start: int, mesh):
  """The jitted step and what it is fed, from ``start`` on.

  A dataset of at most ``train.resident_max_mb`` in a one-process run lives on the devices: each step
  receives only its example indices and gathers the batch there, so the host does almost nothing
  per step. Otherwise each host slices its part of the batch and a background thread moves it to
  the devices while the current step runs. Both feed the same batches in the same order.
  """
  tcfg = config.train
  size_mb = (dataset.train_images.nbytes + dataset.train_labels.nbytes) / 2**20
  if jax.process_count() == 1 and size_mb <= tcfg.resident_max_mb:
    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    data = jax.device_put((dataset.train_images, dataset.train_labels), repl)

    def resident_step(data, state, rows, table, base_rng, teacher):
      images, labels = data
      return train_step(state, {'image': images[rows], 'label': labels[rows]}, table, base_rng, teacher)

    # The data is an argument, not a closed-over array: jit would embed a closed-over array in the
    # compiled step as a constant (the 47 MB of Fashion-MNIST made compiling slow, and every cached
    # executable as large).
    jitted = jax.jit(resident_step, in_shardings=(repl, repl, sharded, repl, repl, repl),
                     out_shardings=(repl, repl), donate_argnums=(1,))
    step = functools.partial(jitted, data)
    rows = data_lib.train_rows(len(dataset.train_images), tcfg.batch_size, config.seed, start)
    batches = prefetch_lib.prefetch(rows, tcfg.prefetch,
                                    lambda r: jax.device_put(r.astype(np.int32), sharded))
    return step, batches
  host_batches = data_lib.train_batches(dataset.train_images, dataset.train_labels, tcfg.batch_size,
                                        config.seed, start, jax.process_index(), jax.process_count())
  batches = prefetch_lib.prefetch(
      ({'image': image, 'label': label} for image, label in host_batches), tcfg.prefetch,
      lambda b: parallel.host_to_global(b, mesh))
  return jit_train_step(train_step, mesh), batches


def _license_table(config, keys, revoked, num_classes, successors) -> objective.LicenseTable:
  if keys is None:  # the baseline: the step ignores the table
    return objective.LicenseTable(*(np.zeros((1,), np.float32),) * 6)
  return objective.license_table(keys, revoked, num_classes, successors,
                                 refuse_denied=config.license.denied_output == 'refuse')


def train(config, workdir: workdir_lib.Workdir, dataset: data_lib.Dataset,
          keys: Sequence[keys_lib.LicenseKey] | None, revoked: Sequence[keys_lib.LicenseKey] = (),
          mesh=None, stop_after_steps: int | None = None, init_variables: Any = None,
          teacher_variables: Any = None, successors: dict[str, str] | None = None,
          phase: str = '', clean_teacher: Any = None,
          on_metrics: Callable[[int, dict], None] | None = None) -> TrainState:
  """Trains a model (licensed when ``keys`` are given, plain otherwise), resuming from ``workdir``.

  Args:
    config: the run config.
    workdir: where this model's checkpoints and TensorBoard summaries go.
    dataset: training data.
    keys: the active license keys, or None for the unlicensed baseline.
    revoked: revoked keys, trained as negatives.
    mesh: device mesh (default: all devices).
    stop_after_steps: stop (with a checkpoint) once the state reaches this step; for tests and
      staged runs. None trains to the end.
    init_variables: start from these variables (``{'params', 'batch_stats'}``) instead of a fresh
      initialization (fine-tuning), when the workdir has no checkpoint yet.
    teacher_variables: a teacher's variables for the licensed loss (``objective.licensed_loss``).
    successors: new key name -> the key it replaces, for the teacher.
    phase: the name progress lines give this training ('licensed' or 'baseline' by default).
    clean_teacher: the unlicensed baseline's variables, distilled into the licensed model when
      ``config.objective.clean_distill_weight`` > 0.
    on_metrics: called as ``on_metrics(step, metrics)`` whenever the host reads the step's metrics
      (every ``train.log_every`` steps and at each checkpoint; a dict of numpy scalars, the learning
      rate included), after the progress line and the TensorBoard point: a hook for other loggers
      or for timing the loop. It runs on every process.

  Returns:
    The final train state.

  Raises:
    FloatingPointError: the loss became NaN or infinite.
    Preempted: SIGTERM or SIGINT arrived; the state was checkpointed first.
    errors.CheckpointError: the workdir has checkpoints, but none this config can restore.
  """
  mesh = parallel.create_mesh() if mesh is None else mesh
  tcfg = config.train
  parallel.check_batch_size(tcfg.batch_size, mesh)
  licensed = keys is not None
  model = models.build(config.model, dataset.num_classes)
  num_train = len(dataset.train_images)
  per_epoch = steps_per_epoch(config, num_train)
  if per_epoch == 0:
    raise ValueError(f'train.batch_size={tcfg.batch_size} exceeds the {num_train} training examples.')
  total_steps = tcfg.num_epochs * per_epoch
  repl = parallel.replicated(mesh)

  mngr = checkpointing.manager(workdir.checkpoints_dir, tcfg.checkpoint_every, tcfg.keep_checkpoints)
  init = functools.partial(create_train_state, model, config, dataset.image_shape, total_steps)
  if mngr.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            jax.eval_shape(init, jax.random.key(0)))
    state = checkpointing.restore(mngr, abstract)
    logging.info('Resumed %s from step %d in %s', 'licensed model' if licensed else 'baseline',
                 int(state.step), workdir)
  else:
    state = jax.jit(init, out_shardings=repl)(jax.random.fold_in(jax.random.key(config.seed), 0))
    if init_variables is not None:
      start_vars = jax.device_put(models.as_variables(init_variables), repl)
      state = state.replace(params=start_vars['params'],
                            batch_stats=start_vars.get('batch_stats', state.batch_stats),
                            opt_state=jax.jit(state.tx.init, out_shardings=repl)(start_vars['params']))
  start = int(state.step)
  end = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)

  table = jax.device_put(_license_table(config, keys, revoked, dataset.num_classes, successors), repl)
  on_devices = lambda v: None if v is None else jax.device_put(models.as_variables(v), repl)
  teacher = objective.Teachers(source=on_devices(teacher_variables), clean=on_devices(clean_teacher))
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  schedule = make_schedule(tcfg, total_steps)
  step_fn, batches = _step_and_batches(
      make_train_step(config, keys[0].geometry if licensed else None, licensed), config, dataset,
      start, mesh)
  writer = loop_support.summary_writer(workdir.tensorboard_dir)
  phase = phase or ('licensed' if licensed else 'baseline')
  if start < end:
    logging.info('%s: steps %d..%d of %d (%d per epoch), global batch %d on %d device(s)',
                 phase, start, end, total_steps, per_epoch, tcfg.batch_size, mesh.devices.size)

  def finite_or_raise(loss, step):
    if not np.isfinite(loss):
      raise FloatingPointError(f'Loss is {loss} at step {step} in {workdir}. Lower train.learning_rate '
                               f'or check the data; the last good checkpoint is step '
                               f'{mngr.latest_step()}.')

  progress = loop_support.Progress(phase, start, end, total_steps, per_epoch, tcfg.batch_size, tcfg.progress_every_s)
  clock = loop_support.Clock(workdir, primary=parallel.is_primary())
  single = jax.process_count() == 1
  with loop_support.StopSignals() as stop:
    try:
      for step in range(start, end):
        state, metrics = step_fn(state, next(batches), table, base_rng, teacher)  # asynchronous
        done = step + 1
        # Every process stops at the same step: one process alone checks its own signals; several
        # agree every stop_check_every steps (a small all-gather), so one signalled process stops all.
        if single:
          stopping = stop.requested
        else:
          stopping = ((done % tcfg.stop_check_every == 0 or done == end) and
                      parallel.any_process(stop.requested))
        saving = mngr.should_save(done) or done == end or stopping
        # The host reads the metrics only now and then: no per-step synchronization with the device.
        if done % tcfg.log_every == 0 or saving:
          metrics = jax.device_get(metrics)
          finite_or_raise(float(metrics['loss']), done)  # before a checkpoint could keep a NaN
          metrics['learning_rate'] = schedule(step)
          progress.report(done, metrics)
          if writer is not None:
            for k, v in metrics.items():
              if np.isfinite(float(v)):
                writer.add_scalar(k, float(v), done)
          if on_metrics is not None:
            on_metrics(done, metrics)
        if saving:
          checkpointing.save_now(mngr, done, state)
          clock.save()
        if stopping:
          mngr.wait_until_finished()
          cause = (signal.Signals(stop.signum).name if stop.signum else
                   'a signal to another process of this job')
          raise Preempted(f'Stopped by {cause} at step {done}; checkpoint saved in '
                          f'{workdir.checkpoints_dir}.', stop.signum or signal.SIGTERM, done)
    finally:
      batches.close()
      mngr.wait_until_finished()
      mngr.close()
      clock.save()
      if writer is not None:
        writer.close()
  return state


def host_variables(state: TrainState) -> dict:
  """This host's copy of the (replicated) variables (``{'params', 'batch_stats'}``), as numpy:
  evaluation runs per host."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.variables)


def train_variables(config, workdir: workdir_lib.Workdir, dataset: data_lib.Dataset, keys) -> dict:
  """Trains (or resumes) to the end and returns the host variables: the owner's training procedure
  as the security suite's retraining sections take it."""
  return host_variables(train(config, workdir, dataset, keys))


def licensed_model(config, dataset: data_lib.Dataset, variables, active=(), revoked=()
                   ) -> inference.LicensedModel:
  """A trained model (and its keys) behind the public inference API."""
  return inference.LicensedModel(models.build(config.model, dataset.num_classes), variables,
                                 dataset.image_shape, dataset.num_classes,
                                 keys={k.name: k for k in active}, revoked_keys={k.name: k for k in revoked},
                                 batch_size=config.eval.batch_size, config=config)


def train_seconds(workdir: workdir_lib.Workdir) -> float:
  """Seconds spent training the model of ``workdir``, over every run that resumed it."""
  return loop_support.Clock.read(workdir)


def _finished(config, workdir: workdir_lib.Workdir, num_train: int) -> bool:
  """Whether the workdir's newest checkpoint is its last step (without restoring it)."""
  if not workdir.checkpoints_dir.is_dir():
    return False
  steps = [int(p.name) for p in workdir.checkpoints_dir.iterdir() if p.name.isdigit()]
  return bool(steps) and max(steps) == config.train.num_epochs * steps_per_epoch(config, num_train)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """The whole job: data, keys, licensed training, baseline, evaluation report.

  A rerun resumes from the checkpoints; on a finished workdir it prints the existing report instead
  of evaluating again, unless ``config.eval.force``. ``mesh``: the devices both models train on
  (default: every device of every process, :func:`parallel.create_mesh`).

  Returns:
    The metrics of WORKDIR/report/metrics.json.
  """
  parallel.log_devices()
  wd = workdir_lib.Workdir(workdir)
  primary = parallel.is_primary()
  dataset = data_lib.load(config.dataset)
  wd.save_or_check_config(config, write=primary)
  if primary:
    wd.write_model_info(dataset.num_classes, dataset.image_shape)
  parallel.barrier('workdir:written')
  active, revoked = licensing.training_keys(config, wd, dataset.image_shape, dataset.num_classes)
  logging.info('License keys: %s; revoked: %s', active, revoked)
  report = wd.report_dir / 'metrics.json'
  models_done = _finished(config, wd, len(dataset.train_images)) and (
      not config.eval.clean_baseline or _finished(config, wd.baseline, len(dataset.train_images)))
  if models_done and report.exists() and not config.eval.force:
    metrics = workdir_lib.read_json(report, 'report')
    logging.info('%s is finished; its report: %s (authorized_acc %.4f, no_key_acc %.4f). '
                 'Add --config.eval.force=True to evaluate again.', wd, wd.report_dir,
                 metrics['authorized_acc'], metrics['no_key_acc'])
    return metrics
  distill = config.objective.get('clean_distill_weight', 0.0) > 0
  if distill and not config.eval.clean_baseline:
    raise ValueError('objective.clean_distill_weight > 0 distills the unlicensed baseline into the '
                     'licensed model: it needs eval.clean_baseline=True (or set the weight to 0).')
  baseline, timings = None, {}
  if config.eval.clean_baseline:  # first: it is the licensed model's teacher when distilling
    baseline = host_variables(train(config, wd.baseline, dataset, None, mesh=mesh))
    timings['baseline_train_s'] = train_seconds(wd.baseline)
  state = train(config, wd, dataset, active, revoked, mesh=mesh,
                clean_teacher=baseline if distill else None)
  timings['licensed_train_s'] = train_seconds(wd)
  if baseline is not None:
    baseline = licensed_model(config, dataset, baseline)
  t0 = time.perf_counter()
  logging.info('evaluation: %d test images, %d forged keys', len(dataset.test_labels),
               config.eval.num_forged)
  model = licensed_model(config, dataset, host_variables(state), active, revoked)
  timings['eval_s'] = 0.0
  metrics = evaluate.evaluate_and_report(config, wd, dataset, model, baseline, write=primary,
                                         extra=timings, timed='eval_s')
  logging.info('evaluation done in %s; report: %s', loop_support.duration(time.perf_counter() - t0), wd.report_dir)
  return metrics
