"""The default job, timed by phase: licensed training, baseline training, evaluation, and the wall
time of the whole command (start-up and data loading included).

  python -m benchmarks.job [--out benchmarks/results] [--workdir DIR] [-- --config.x=y ...]

Runs ``python -m securenet_jax.main --config configs/default.py`` in a fresh workdir (a new process,
exactly as a user would, with an empty compilation cache, as on a first run) and reads the phase
timings from its report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(out_dir: str, workdir: str, overrides: list[str]) -> list[dict]:
  t0 = time.perf_counter()
  # An empty compilation cache: the job as a first run compiles it (a rerun compiles less).
  cache = tempfile.mkdtemp(prefix='securenet-jax-cache-')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  try:
    proc = subprocess.run([sys.executable, '-m', 'securenet_jax.main', '--config', 'configs/default.py',
                           '--workdir', workdir, f'--compilation_cache={cache}', *overrides], cwd=REPO,
                          capture_output=True, text=True, env=env)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f'the job failed:\n{proc.stderr[-3000:]}')
  with open(os.path.join(workdir, 'report', 'metrics.json')) as f:
    m = json.load(f)
  rows = [{'phase': 'licensed training', 'seconds': m['licensed_train_s']},
          {'phase': 'baseline training', 'seconds': m['baseline_train_s']},
          {'phase': 'evaluation', 'seconds': m['eval_s']},
          {'phase': 'whole command (wall)', 'seconds': wall}]
  for row in rows:
    row['minutes'] = f'{row["seconds"] / 60:.2f}'
  rows.append({'phase': 'figures', 'seconds': '', 'minutes': f'authorized {m["authorized_acc"]}, clean '
               f'{m["clean_acc"]}, no key {m["no_key_acc"]}, forged max {m["forged_acc_max"]}'})
  common.write(out_dir, 'job', rows, ['phase', 'seconds', 'minutes'], 'The default job by phase',
               f'`python -m securenet_jax.main --config configs/default.py {" ".join(overrides)}` in a '
               f'fresh workdir, with an empty compilation cache.')
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='benchmarks/results')
  parser.add_argument('--workdir', default='')
  args, overrides = parser.parse_known_args()
  print(common.device_line())
  run(args.out, args.workdir or tempfile.mkdtemp(), [o for o in overrides if o != '--'])


if __name__ == '__main__':
  main()
