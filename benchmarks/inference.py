"""Inference throughput: the public API against its own jitted forward and plain PyTorch.

  python -m benchmarks.inference [--out benchmarks/results] [--models lenet5,resnet18]
      [--batch_sizes 1,64,1024,4096] [--no_torch]

For each model and batch size, input images per second of:

* ``api``: ``LicensedModel.logits(numpy uint8, key)`` -> numpy (validation, transfer, stamp, forward,
  result back): what a user calls;
* ``exported``: the same through the ``inference.export`` artifact;
* ``jitted forward``: the API's own compiled forward on device-resident float input, result left on
  the device: the upper bound;
* ``jitted forward, numpy in/out``: the very function the API calls, on the same numpy uint8 arrays,
  its result fetched with ``np.asarray``: the API without its own Python (checks, chunking, the copy
  of the rows), so ``api / jitted numpy`` is the API's own overhead; ``api / jitted numpy,
  alternating calls`` is the same ratio with the two timed call by call in turn
  (``common.timeit_alternating``), which leaves less noise at small batches;
* ``jitted forward, XLA conv``: the same with LeNet-5's first convolution by XLA, where the API computes
  it in the direct form (on a CPU: ``models.for_inference``);
* ``torch numpy``: a plain PyTorch eval of the same architecture, numpy in and out (no key);
* ``torch device``: the same on a device-resident tensor.

Also the key's cost at the API (with key vs without) and the latency of one image. Random weights
(speed does not depend on them); one process, every device it sees.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from securenet_jax import inference
from securenet_jax import keys
from securenet_jax import models
from securenet_jax import workdir as workdir_lib

SHAPES = {'lenet5': (28, 28, 1), 'resnet18': (28, 28, 1)}
KWARGS = {'lenet5': {}, 'resnet18': {'small_inputs': True}}


def _model(name: str, batch_size: int, **kwargs) -> inference.LicensedModel:
  shape = SHAPES[name]
  module = models.create(name, 10, **KWARGS[name], **kwargs)
  variables = module.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
  key = keys.derive('bench', keys.Geometry('patch', shape, size=6, position=(shape[0] - 7, shape[1] - 7)))
  return inference.LicensedModel(module, variables, shape, 10, keys={'default': key}, batch_size=batch_size)


def _exported(model: inference.LicensedModel, name: str) -> inference.ExportedModel:
  """Writes a throwaway workdir for ``model`` and exports it."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from securenet_jax import checkpointing, licensing  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp()
  wd = workdir_lib.Workdir(root)
  config = default.get_config()
  config.model = ml_collections.ConfigDict({'name': name, 'kwargs': KWARGS[name]})
  config.eval.batch_size = model.batch_size
  wd.save_or_check_config(config)
  wd.write_model_info(10, model.image_shape)
  licensing.register(wd, list(model.keys.values()), [])
  from securenet_jax import train  # pylint: disable=g-import-not-at-top
  state = train.create_train_state(model.module, config, model.image_shape, 1, jax.random.key(0))
  state = state.replace(params=model.variables['params'],
                        batch_stats=model.variables.get('batch_stats', {}))
  mngr = checkpointing.manager(wd.checkpoints_dir)
  checkpointing.save_now(mngr, 1, state)
  mngr.wait_until_finished()
  mngr.close()
  return inference.load_exported(inference.export(root, os.path.join(root, 'model.npz')))


def run(names, batch_sizes, out_dir: str, with_torch: bool) -> list[dict]:
  rows = []
  torch = None
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_models  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
  for name in names:
    shape = SHAPES[name]
    for batch in batch_sizes:
      model = _model(name, max(batch, 1000))
      exported = _exported(model, name) if batch == batch_sizes[0] or batch >= 1024 else None
      key = model.keys['default']
      images = (np.random.default_rng(0).random((batch, *shape)) * 255).astype(np.uint8)
      arrays = jax.device_put(key.arrays())
      on_device = jax.device_put(images.astype(np.float32) / 255.0)
      forward = jax.jit(model._logits_impl)  # pylint: disable=protected-access
      fns = {
          'api': lambda: model.logits(images, key),
          'api, no key': lambda: model.logits(images),
          'jitted forward': lambda: forward(on_device, model.variables, arrays).block_until_ready(),
          # pylint: disable-next=protected-access
          'jitted forward, numpy in/out': lambda: np.asarray(model._logits(images, model._device_variables, arrays)),
      }
      if model.module is not model.training_module:  # LeNet-5 on a CPU: XLA's convolutions beside its own
        xla = _model(name, max(batch, 1000), conv_impl='xla')
        xla_forward = jax.jit(xla._logits_impl)  # pylint: disable=protected-access
        fns['jitted forward, XLA conv'] = (
            lambda: xla_forward(on_device, xla.variables, arrays).block_until_ready())
      if exported is not None:
        fns['exported'] = lambda: exported.logits(images, key)
      if torch is not None:
        net = torch_models.create(name, shape[-1]).eval()
        dev = torch_models.device()
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).to(dev)

        def torch_numpy():
          with torch.inference_mode():
            return net(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
                       .to(dev)).cpu().numpy()

        def torch_device():
          with torch.inference_mode():
            net(x)
            torch_models.sync()
        fns['torch numpy'], fns['torch device'] = torch_numpy, torch_device
      # Longer turns (min_s) amortize the first call after each idle gap.
      timings = common.timeit_interleaved(fns, min_s=0.05, gap_s=0.05 if torch is not None else 0.0)
      row = {'model': name, 'batch': batch}
      row.update({f'{k} img/s': batch / v for k, v in timings.items()})
      row['api / jitted forward'] = timings['jitted forward'] / timings['api']
      row['api / jitted numpy'] = timings['jitted forward, numpy in/out'] / timings['api']
      # The same ratio with the two alternating call by call: at small batches a turn's noise is as
      # large as the API's own Python.
      if torch is not None:
        time.sleep(0.05)  # PyTorch's threads may still spin after its last turn
      alternating = common.timeit_alternating({'api': fns['api'],
                                               'jitted numpy': fns['jitted forward, numpy in/out']})
      row['api / jitted numpy, alternating calls'] = alternating['jitted numpy'] / alternating['api']
      if 'torch numpy' in timings:
        row['api / torch numpy'] = timings['torch numpy'] / timings['api']
      row['key cost at the API'] = f'{100 * (timings["api"] / timings["api, no key"] - 1):+.1f}%'
      if batch == 1:
        row['api latency ms'] = 1000 * timings['api']
      rows.append(row)
  columns = sorted({c for r in rows for c in r}, key=lambda c: list(rows[0]).index(c) if c in rows[0] else 99)
  common.write(out_dir, 'inference', rows, columns, 'Inference: the public API, its jitted forward, PyTorch',
               'Input images per second (median of 7 rounds, the variants taking turns in each, in a shuffled '
               'order, each turn after a 50 ms pause when PyTorch runs beside JAX); numpy '
               'uint8 in and numpy out for the API, the '
               'exported artifact, "jitted forward, numpy in/out" and "torch numpy"; device-resident input '
               'for "jitted forward" and '
               '"torch device". "api / jitted numpy, alternating calls": the API and "jitted forward, '
               'numpy in/out" timed again, one call of each after the other (7 rounds of about 0.2 s).')
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='benchmarks/results')
  parser.add_argument('--models', default='lenet5,resnet18')
  parser.add_argument('--batch_sizes', default='1,64,1024,4096')
  parser.add_argument('--no_torch', action='store_true')
  args = parser.parse_args()
  print(common.device_line())
  run(args.models.split(','), [int(b) for b in args.batch_sizes.split(',')], args.out, not args.no_torch)


if __name__ == '__main__':
  main()
