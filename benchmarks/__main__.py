"""Every benchmark in one command, its tables in one folder.

  python -m benchmarks [--out DIR] [--only unlock_cost,inference,train_throughput,job] [--no_torch]
      [--inference_models lenet5,resnet18] [--train_models lenet5,resnet18]
      [--train_batch_sizes 128,256,1024] [--quick]

Runs ``unlock_cost``, ``inference``, ``train_throughput`` and ``job`` in that order (the cheapest
first), each with its own defaults unless told otherwise, into ``DIR`` (default
``benchmarks/results/<backend>-<date>``, with ``-2``, ``-3``... if that exists). One that fails is reported and the others still run; the
command then exits with status 1. PyTorch's columns need the ``bench`` extra; without it they are
left out. On a 2-core CPU the whole run takes hours (ResNet-18's training rows alone, at batch 128
and up); ``--train_models lenet5`` leaves them out. ``--quick`` runs each at a tiny size (LeNet-5,
small batches, few steps, no job): a check that everything runs, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import tempfile
import time
import traceback

import jax

from benchmarks import common

BENCHMARKS = ('unlock_cost', 'inference', 'train_throughput', 'job')


def _new_folder(path: str) -> str:
  """``path``, or ``path-2``, ``path-3``... if it exists: an earlier run's tables are kept."""
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f'{path}-{n}'
  return candidate


def _job(job, out: str):
  workdir = tempfile.mkdtemp(prefix='securenet-job-')
  try:
    return job.run(out, workdir, [])
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='')
  parser.add_argument('--only', default=','.join(BENCHMARKS))
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--inference_models', default='lenet5,resnet18')
  parser.add_argument('--train_models', default='lenet5,resnet18')
  parser.add_argument('--train_batch_sizes', default='128,256,1024')
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args(argv)
  asked = {b for b in args.only.split(',') if b}
  unknown = sorted(asked - set(BENCHMARKS))
  if unknown:
    parser.error(f'unknown benchmarks {unknown}; expected some of {list(BENCHMARKS)}')
  chosen = [b for b in BENCHMARKS if b in asked]  # always the cheapest first
  out = args.out or _new_folder(os.path.join(
      'benchmarks', 'results', f'{jax.default_backend()}-{datetime.date.today().isoformat()}'))
  with_torch = not args.no_torch and importlib.util.find_spec('torch') is not None
  if not args.no_torch and not with_torch:
    print('PyTorch is not installed (the bench extra): its columns are left out.')
  print(common.device_line())
  # Imported here: each pulls in the package and, for some, PyTorch.
  from benchmarks import inference, job, train_throughput, unlock_cost  # pylint: disable=g-import-not-at-top
  quick = args.quick
  runs = {
      'unlock_cost': lambda: unlock_cost.run(['lenet5'] if quick else ['lenet5', 'resnet18', 'resnet101'],
                                             out, batch=1),
      'inference': lambda: inference.run(['lenet5'] if quick else args.inference_models.split(','),
                                         [1, 8] if quick else [1, 64, 1024, 4096], out, with_torch),
      'train_throughput': lambda: train_throughput.run(
          ['lenet5'] if quick else args.train_models.split(','),
          [16] if quick else [int(b) for b in args.train_batch_sizes.split(',')],
          12 if quick else 50, out, with_torch, rounds=1 if quick else 5),
      'job': lambda: _job(job, out),
  }
  failed = []
  for name in chosen:
    if quick and name == 'job':
      print('job: left out by --quick (it trains the default job to the end).')
      continue
    t0 = time.perf_counter()
    print(f'--- {name}', flush=True)
    try:
      runs[name]()
    except (Exception, SystemExit):  # pylint: disable=broad-except  (report it, run the others)
      traceback.print_exc()
      failed.append(name)
    outcome = 'failed' if name in failed else 'done'
    print(f'--- {name}: {outcome} in {time.perf_counter() - t0:.0f} s', flush=True)
  print(f'Tables in {out}.' + (f' Failed: {", ".join(failed)}.' if failed else ''))
  return 1 if failed else 0


if __name__ == '__main__':
  raise SystemExit(main())
