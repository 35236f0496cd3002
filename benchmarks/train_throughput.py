"""Training throughput: the main loop against the same jitted step fed from device-resident batches,
licensed against baseline, against a plain PyTorch training step of the same architecture and
against a PyTorch licensing peer.

  python -m benchmarks.train_throughput [--out benchmarks/results] [--models lenet5,resnet18]
      [--batch_sizes 128,256,1024] [--steps 50] [--rounds 5] [--no_torch]

Input images per second (a licensed step forwards each image twice: keyed and as a negative):

* ``main loop``: ``train.train`` (data pipeline, progress reports, its checkpoints) on
  Fashion-MNIST-shaped random data, timed in its steady state (:func:`main_loop`);
* ``device step``: the same jitted step called in a loop on batches already on the devices (on a
  CPU, LeNet-5's default banded convolutions and XLA's convolution side by side, taking turns);
* ``torch baseline``: a plain PyTorch training step of the same architecture, device-resident;
* ``peer``: the licensing peer in PyTorch, Authority Backdoor's default training step
  (:func:`benchmarks.torch_models.training_stepper`), device-resident, counted in the same input
  images (each of its steps covers ``batch`` images, keyed and not, in ``2 * batch`` samples).

The device steps and the PyTorch steps take turns in the same rounds.

The main loop should reach >= 0.9 of the device step (``loop / step``: the two taking turns in
segments of 10 steps within the loop's run, :func:`main_loop`); the licensed/baseline ratio is the
price of licensing per input image.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shutil
import tempfile
import time
from typing import Callable

import jax
import numpy as np

from benchmarks import common
from configs import default
from securenet_jax import data as data_lib
from securenet_jax import keys
from securenet_jax import models
from securenet_jax import objective
from securenet_jax import parallel
from securenet_jax import train
from securenet_jax import workdir as workdir_lib

KWARGS = {'lenet5': {}, 'resnet18': {'small_inputs': True}}


def _config(name: str, batch: int, steps: int):
  """The default job's config for LeNet-5; for the other models the objective their zoo configs
  train with (``default.patch_key_recipe``: the default's extra gated layers are LeNet-5's, and its
  distillation from the baseline a LeNet-5 measurement)."""
  config = default.get_config()
  if name != 'lenet5':
    default.patch_key_recipe(config)
  config.model.name = name
  config.model.kwargs = KWARGS[name]
  config.train.batch_size = batch
  config.train.num_epochs = 1
  config.train.log_every = 10**6
  config.train.progress_every_s = 10**6
  config.train.warmup_steps = 1
  return config


def _dataset(batch: int, steps: int) -> data_lib.Dataset:
  rng = np.random.default_rng(0)
  n = batch * steps
  images = rng.integers(0, 256, (n, 28, 28, 1), np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  return data_lib.Dataset('random', 10, images, labels, images[:batch], labels[:batch])


def _clean_teacher(config, dataset):
  """Host variables standing in for the baseline a licensed step distils, where its objective
  distils one (LeNet-5's default, as in the job); None otherwise."""
  if not config.objective.clean_distill_weight:
    return None
  model = models.build(config.model, 10)
  state = train.create_train_state(model, config, dataset.image_shape, 1, jax.random.key(0))
  return {'params': jax.tree.map(np.asarray, state.params)}


def main_loop(config, dataset, key, licensed: bool, log_every: int = 10,
              device: Callable[[int], None] | None = None) -> tuple[float, float | None]:
  """Images/s of ``train.train`` in its steady state, and of ``device`` (a :func:`device_stepper`)
  run in turns with it.

  The loop's metrics reads (every ``log_every`` steps, each one a host sync as the job's every 100
  are; its ``on_metrics`` hook marks them) cut it into segments. It is timed from its first read on:
  start-up, compiling and the first ``log_every`` steps come before it, the final checkpoint after
  the last. With ``device``, the hook runs it at each read after the first for as many steps as the
  loop ran since the read before, and the loop's clock stops meanwhile: loop and step take turns in
  segments of ``log_every`` steps, so a drift of the machine's speed hits both alike. A licensed run
  gets a clean teacher where its objective distils one (LeNet-5's default, as in the job).

  Returns:
    (loop images/s, images/s of ``device`` in its turns, or None without ``device``).
  """
  config = copy.deepcopy(config)
  config.train.log_every = log_every
  root = tempfile.mkdtemp(prefix='securenet-loop-')
  teacher = _clean_teacher(config, dataset) if licensed else None
  reads, last_step, resumed = 0, 0, 0.0
  loop_steps, loop_s, step_s = 0, 0.0, 0.0

  def on_metrics(step, metrics):
    nonlocal reads, last_step, resumed, loop_steps, loop_s, step_s
    del metrics
    now = time.perf_counter()
    if reads:  # before the first read: compiling and the first steps
      n = step - last_step
      loop_s += now - resumed
      loop_steps += n
      if device is not None and n:
        device(n)
        step_s += time.perf_counter() - now
    reads, last_step = reads + 1, step
    resumed = time.perf_counter()

  try:
    train.train(config, workdir_lib.Workdir(root), dataset, [key] if licensed else None,
                clean_teacher=teacher, on_metrics=on_metrics)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if reads < 3:
    raise ValueError(f'Too few steps to time the main loop: the metrics were read {reads} times, '
                     f'every {log_every} steps; it needs 3.')
  images = loop_steps * config.train.batch_size
  return images / loop_s, (images / step_s if device is not None else None)


def device_stepper(config, dataset, key, licensed: bool) -> Callable[[int], None]:
  """A function running ``n`` steps of the jitted step on batches already on the devices (compiled
  and warmed up here); a licensed step gets a clean teacher where its objective distils one
  (LeNet-5's default, as in the job)."""
  mesh = parallel.create_mesh()
  repl = parallel.replicated(mesh)
  model = models.build(config.model, 10)
  state = jax.device_put(train.create_train_state(model, config, dataset.image_shape, 1000, jax.random.key(0)),
                         repl)
  table = jax.device_put(objective.license_table([key], [], 10), repl)
  clean = _clean_teacher(config, dataset) if licensed else None
  teacher = None if clean is None else objective.Teachers(clean=jax.device_put(clean, repl))
  step = train.jit_train_step(train.make_train_step(config, key.geometry, licensed), mesh)
  b = config.train.batch_size
  batches = [parallel.host_to_global({'image': dataset.train_images[i * b:(i + 1) * b],
                                      'label': dataset.train_labels[i * b:(i + 1) * b]}, mesh)
             for i in range(min(len(dataset.train_images) // b, 8))]
  rng = jax.random.key(1)
  box = [state]

  def run_steps(n: int) -> None:
    state = box[0]
    for i in range(n):
      state, metrics = step(state, batches[i % len(batches)], table, rng, teacher)
    jax.block_until_ready(metrics)
    box[0] = state
  run_steps(3)
  return run_steps


def conv_impls(name: str) -> list:
  """LeNet-5's forms to compare on a CPU: the default (banded matrix products) and XLA's convolution."""
  return [None, 'xla'] if name == 'lenet5' and jax.default_backend() == 'cpu' else [None]


def run(names, batch_sizes, steps: int, out_dir: str, with_torch: bool, rounds: int = 5) -> list[dict]:
  rows = []
  for name in names:
    for batch in batch_sizes:
      dataset = _dataset(batch, steps + 10)
      steppers, row_of = {}, {}
      for impl in conv_impls(name):
        config = _config(name, batch, steps)
        if impl:
          config.model.kwargs.conv_impl = impl
        key = keys.derive('bench', keys.Geometry.from_config(config.key, dataset.image_shape))
        row = {'model': name, 'conv': impl or 'default', 'batch': batch, 'devices': jax.device_count()}
        for licensed in (True, False):
          which = 'licensed' if licensed else 'baseline'
          steppers[(impl, which)] = device_stepper(config, dataset, key, licensed)
          if impl is None:  # the main loop as the job runs it (the default form only: it is long)
            loop, in_turns = main_loop(config, dataset, key, licensed, device=steppers[(impl, which)])
            row[f'{which} main loop img/s'] = loop
            row[f'{which} step in turns with the loop img/s'] = in_turns
            row[f'{which} loop / step'] = loop / in_turns
        row_of[impl] = row
        rows.append(row)
      if with_torch:
        from benchmarks import torch_models  # pylint: disable=g-import-not-at-top  (the bench extra)
        torch_models.torch.set_num_threads(os.cpu_count() or 1)
        steppers[('torch', 'baseline')] = torch_models.training_stepper(name, batch)
        steppers[('torch', 'peer')] = torch_models.training_stepper(name, batch, peer=True)
      # Each stepper is compiled and warm; one turn is `steps` steps. After a PyTorch turn its
      # OpenMP threads spin on the cores for a while: a pause before each turn when it runs.
      seconds = common.timeit_interleaved({k: functools.partial(run_steps, steps) for k, run_steps
                                           in steppers.items()}, rounds=rounds, min_s=0, warmup=0,
                                          gap_s=0.05 if with_torch else 0.0)
      torch_rates = {which: steps * batch / seconds.pop(('torch', which))
                     for which in ('baseline', 'peer') if ('torch', which) in seconds}
      for (impl, which), secs in seconds.items():
        row = row_of[impl]
        row[f'{which} device step img/s'] = steps * batch / secs
      for impl, row in row_of.items():
        row['licensed / baseline (device step)'] = (row['licensed device step img/s'] /
                                                    row['baseline device step img/s'])
        if impl is not None:  # the default form against this one, in the same rounds
          first = row_of[None]
          for which in ('licensed', 'baseline'):
            first[f'{which} step vs {impl}'] = (first[f'{which} device step img/s'] /
                                                row[f'{which} device step img/s'])
      if torch_rates:
        first = row_of[None]
        first['torch baseline img/s'] = torch_rates['baseline']
        first['baseline device step / torch'] = first['baseline device step img/s'] / torch_rates['baseline']
        first['peer licensed step img/s'] = torch_rates['peer']
        first['licensed device step / peer'] = first['licensed device step img/s'] / torch_rates['peer']
  columns = list(dict.fromkeys(c for row in rows for c in row))
  teachers = [n for n in names if _config(n, 1, 1).objective.clean_distill_weight > 0]
  teacher_note = (f'A licensed step of {", ".join(teachers)} gets a clean teacher (the default job distils '
                  f'the baseline); ' if teachers else '')
  others = [n for n in names if n not in teachers]
  if others:
    teacher_note += (f'{", ".join(others)} trains with its zoo objective (default.patch_key_recipe: '
                     f'no teacher, block flip or near misses). ')
  common.write(out_dir, 'train_throughput', rows, columns, 'Training throughput',
               f'Input images per second. Device steps: the median of {rounds} rounds of {steps} steps, '
               f'the variants taking turns within each round, in one process; main loop: one run of '
               f'train.train over {steps + 10} steps, timed from its 1st metrics read (every 10 '
               f'steps) to its last; step in turns with the loop: the same device step run at each '
               f'of those reads after the first for as many steps (the two taking turns in '
               f'segments of 10 steps), the step of loop / step. {teacher_note}' +
               ('PyTorch (torch baseline, and the peer: Authority Backdoor\'s training step, 2 x '
                'batch samples covering batch images keyed and not) takes turns in the same rounds; '
                'every turn follows a 50 ms pause.' if with_torch else 'PyTorch was not run.'))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='benchmarks/results')
  parser.add_argument('--models', default='lenet5,resnet18')
  parser.add_argument('--batch_sizes', default='128,256,1024')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds of the device (and PyTorch) steps')
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  print(common.device_line())
  run(args.models.split(','), [int(b) for b in args.batch_sizes.split(',')], args.steps, args.out,
      not args.no_torch, args.rounds)


if __name__ == '__main__':
  main()
