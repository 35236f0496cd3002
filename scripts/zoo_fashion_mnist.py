"""Trains several models of the zoo with the license on Fashion-MNIST and tabulates their reports.

  python scripts/zoo_fashion_mnist.py --out /tmp/zoo --models resnet18,vgg16,mobilenetv3_large \
      [--budget_s 600] [--data_dir DIR] [-- extra --config.* overrides]

Each model runs `python -m securenet_jax.main --config configs/fashion_mnist_cnn.py:M` in its own
process (a crash of one does not stop the others) into
OUT/<model>; a model is skipped once --budget_s seconds have passed. Writes OUT/zoo.json (every
model's metrics.json plus its wall time) and OUT/zoo.md (a table).
"""

import argparse
import json
import os
import subprocess
import sys
import time

COLUMNS = ('clean_acc', 'authorized_acc', 'no_key_acc', 'forged_acc_max', 'leak_argmin_acc',
           'leak_probe_acc', 'leak_probe_features_acc', 'licensed_train_s', 'baseline_train_s')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--models', default='resnet18,vgg16,mobilenetv3_large')
  parser.add_argument('--budget_s', type=float, default=float('inf'))
  parser.add_argument('--data_dir', default='')
  args, overrides = parser.parse_known_args()
  overrides = [o for o in overrides if o != '--']
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.makedirs(args.out, exist_ok=True)
  results, start = {}, time.perf_counter()
  for name in args.models.split(','):
    if time.perf_counter() - start > args.budget_s:
      print(f'[zoo] budget spent: skipping {name}', flush=True)
      results[name] = {'skipped': 'budget'}
      continue
    workdir = os.path.join(args.out, name)
    cmd = [sys.executable, '-m', 'securenet_jax.main', '--config', f'configs/fashion_mnist_cnn.py:{name}',
           f'--workdir={workdir}', f'--config.key.secret=zoo-{name}',
           *([f'--config.dataset.data_dir={args.data_dir}'] if args.data_dir else []), *overrides]
    print('[zoo]', ' '.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=repo)
    entry = {'returncode': rc, 'wall_s': time.perf_counter() - t0}
    report = os.path.join(workdir, 'report', 'metrics.json')
    if os.path.exists(report):
      with open(report) as f:
        entry.update(json.load(f))
    results[name] = entry
    with open(os.path.join(args.out, 'zoo.json'), 'w') as f:
      json.dump(results, f, indent=1)
  lines = ['| model | ' + ' | '.join(COLUMNS) + ' | wall_s |', '|' + ' --- |' * (len(COLUMNS) + 2)]
  for name, entry in results.items():
    cells = [f'{entry[c]:.4f}' if isinstance(entry.get(c), float) else str(entry.get(c, '-'))
             for c in COLUMNS]
    lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {entry.get("wall_s", 0):.0f} |')
  with open(os.path.join(args.out, 'zoo.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
