"""What every benchmark shares: the machine it ran on, a timer, and the JSON + markdown it writes."""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import time
from typing import Callable

import jax


def machine() -> dict:
  """The device, host and versions a figure was measured with."""
  info = {'date': datetime.date.today().isoformat(), 'jax': jax.__version__,
          'backend': jax.default_backend(), 'devices': [str(d) for d in jax.devices()],
          'device_kind': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
          'python': platform.python_version(), 'processor': platform.processor() or platform.machine()}
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    info['cpu'] = names[0] if names else ''
  except OSError:
    info['cpu'] = ''
  try:
    import torch  # pylint: disable=g-import-not-at-top  (the bench extra)
    info['torch'] = torch.__version__
  except ImportError:
    pass
  return info


def timeit(fn: Callable[[], object], *, repeats: int = 5, number: int = 1, warmup: int = 2) -> float:
  """Median seconds of one call of ``fn`` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(number):
      fn()
    times.append((time.perf_counter() - t0) / number)
  return statistics.median(times)


def timeit_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 7, min_s: float = 0.02,
                       warmup: int = 2, gap_s: float = 0.0) -> dict[str, float]:
  """Median seconds of one call of each function, the functions taking turns within each of
  ``rounds`` rounds (each round in a shuffled order), so a drift of the machine's speed (large on
  shared CPUs) hits them alike. Each
  turn repeats a call until about ``min_s`` has passed (the count fixed per function from calls
  timed for ``min_s / 4`` after the warm-up; ``min_s=0``: one call per turn). ``gap_s``: an idle
  pause before each turn, so that no turn runs while the threads of the one before still spin (GNU
  OpenMP's, PyTorch's on a CPU, spin for milliseconds after a call, on the cores the next turn
  needs)."""
  number = {}
  for name, fn in fns.items():
    for _ in range(warmup):
      fn()
    number[name] = 1
    if min_s > 0:  # calls per turn, from a run of calls (one call can be slow: a thread pool waking)
      calls, t0 = 0, time.perf_counter()
      while (elapsed := time.perf_counter() - t0) < min_s / 4:
        fn()
        calls += 1
      number[name] = max(1, int(min_s * calls / max(elapsed, 1e-9)))
  times = {name: [] for name in fns}
  for r in range(rounds):
    # Each round in its own (seeded) random order: no function always follows the same one (PyTorch's
    # OpenMP threads, for one, keep spinning on the cores for a while after its calls).
    order = list(fns)
    random.Random(r).shuffle(order)
    for name in order:
      fn = fns[name]
      if gap_s:
        time.sleep(gap_s)
      t0 = time.perf_counter()
      for _ in range(number[name]):
        fn()
      times[name].append((time.perf_counter() - t0) / number[name])
  return {name: statistics.median(t) for name, t in times.items()}


def timeit_alternating(fns: dict[str, Callable[[], object]], *, rounds: int = 7,
                       min_s: float = 0.2) -> dict[str, float]:
  """Median seconds of one call of each function, the functions alternating call by call: each round
  times ``calls`` single calls of each, one call of every function after another, the order rotating
  by one each time (two functions: A B, B A, A B, ...), so that what a call leaves behind (XLA's
  worker threads still spinning, caches) and the machine's drift within a round hit all of them
  alike. For ratios of functions doing nearly
  the same work, where turns of many calls each (:func:`timeit_interleaved`) leave a noise as large
  as the difference. ``calls`` is set so that a round takes about ``min_s``."""
  for fn in fns.values():
    fn()
  t0 = time.perf_counter()
  for fn in fns.values():
    fn()
  calls = max(3, int(min_s / max(time.perf_counter() - t0, 1e-9)))
  names = list(fns)
  times = {name: [] for name in fns}
  for _ in range(rounds):
    total = dict.fromkeys(fns, 0.0)
    for i in range(calls):
      for name in names[i % len(names):] + names[:i % len(names)]:
        t0 = time.perf_counter()
        fns[name]()
        total[name] += time.perf_counter() - t0
    for name in fns:
      times[name].append(total[name] / calls)
  return {name: statistics.median(t) for name, t in times.items()}


def write(out_dir: str, name: str, rows: list[dict], columns: list[str], title: str, notes: str = '') -> None:
  """Writes OUT/NAME.json (machine + rows) and OUT/NAME.md (a table), and prints the table."""
  os.makedirs(out_dir, exist_ok=True)
  info = machine()
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump({'machine': info, 'rows': rows}, f, indent=1, default=str)
  lines = [f'# {title}', '', f'{info["date"]}; jax {info["jax"]} on {info["backend"]} '
           f'({info["device_kind"]}; {info["cpu"]}, {info["cpu_count"]} cores)'
           + (f'; torch {info["torch"]}' if 'torch' in info else '') + '.', '']
  if notes:
    lines += [notes, '']
  lines += ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(row.get(c, '')) for c in columns) + ' |')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
    f.write(text)
  print(text)


def _cell(value) -> str:
  if isinstance(value, float):
    return f'{value:,.0f}' if abs(value) >= 100 else f'{value:.3g}'
  return str(value)


def device_line() -> str:
  return f'running on {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}'
