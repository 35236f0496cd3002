"""Tests of securenet_jax.parallel and of multi-process runs on loopback (CPU, gloo).

The multi-process tests start real processes: ``launch/local.sh`` or one ``securenet_jax.main`` per
process with ``--coordinator_address``. Each process has one CPU device; the one-process runs they are
compared with have two, so the global mesh (and the arithmetic) is the same.
"""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from securenet_jax import inference
from securenet_jax import parallel
from tests import conftest
from tests.conftest import REPO


def test_single_process_helpers():
  assert parallel.any_process(True) and not parallel.any_process(False)
  assert parallel.process_flags(True) == [True] and parallel.process_flags(0) == [False]
  assert parallel.same_on_every_process(True, 'x') and not parallel.same_on_every_process(False, 'x')
  rows = np.arange(10)[:, None] * np.ones((1, 3))
  np.testing.assert_array_equal(parallel.map_rows(lambda r: r * 2, rows), rows * 2)
  parallel.barrier('nothing to wait for')
  assert parallel.is_primary() and parallel.cluster_environment() == ''
  with pytest.raises(ValueError, match='num_processes'):
    parallel.initialize('127.0.0.1:1', num_processes=2, process_id=5)


def test_processes_that_disagree_about_the_workdir_are_told_so(monkeypatch):
  from securenet_jax import errors  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(parallel, 'process_flags', lambda flag: [True, False])
  with pytest.raises(errors.WorkdirError, match=r'disagree whether W holds a key registry .*\[True, False\]'):
    parallel.same_on_every_process(True, 'W holds a key registry')


def test_cluster_environment_detection(monkeypatch):
  monkeypatch.setenv('SLURM_NTASKS', '16')
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  assert parallel.cluster_environment() == 'slurm'
  monkeypatch.delenv('SLURM_NTASKS')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'a,b,c,d')
  assert parallel.cluster_environment() == 'tpu'


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _args(workdir, idx_dir, *extra):
  return ['--config', 'configs/default.py:smoke', '--workdir', str(workdir),
          f'--config.dataset.data_dir={idx_dir}', '--config.key.secret=multi', *extra]


def _main(*args, devices=1, **kw):
  return subprocess.Popen([sys.executable, '-m', 'securenet_jax.main', *args], cwd=REPO, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _params(workdir):
  return jax.tree.leaves(inference.load(str(workdir)).params)


# Every multi-process test runs this recipe: long enough to signal a process mid-run.
# (Without the distillation from the baseline: the one-process reference skips the baseline.)
RECIPE = ('--config.train.num_epochs=6', '--config.objective.clean_distill_weight=0')  # 96 steps
NO_BASELINE = ('--config.eval.clean_baseline=False',)


def _local(num: int, *args, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run([os.path.join(REPO, 'launch', 'local.sh'), str(num), *args], cwd=REPO,
                        env=dict(_env(1), PYTHON=sys.executable), capture_output=True, text=True,
                        timeout=timeout)


def _one_process(workdir, idx_dir):
  out, _ = _main(*_args(workdir, idx_dir, *RECIPE, *NO_BASELINE), devices=2).communicate(timeout=600)
  assert os.path.exists(os.path.join(workdir, 'report', 'metrics.json')), out[-3000:]


def _two_processes(workdir, idx_dir):  # with the baseline the security suite attacks beside it
  proc = _local(2, *_args(workdir, idx_dir, *RECIPE))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.fixture(scope='session')
def one_process(tmp_path_factory, idx_dir):
  """The recipe trained by one process with two devices: what every multi-process run must equal."""
  return pathlib.Path(conftest.shared_dir(tmp_path_factory, 'parallel_one',
                                          lambda path: _one_process(path, idx_dir)))


@pytest.fixture(scope='session')
def two_processes(tmp_path_factory, idx_dir):
  """The recipe trained by two processes of one device each, started by launch/local.sh."""
  return pathlib.Path(conftest.shared_dir(tmp_path_factory, 'parallel_two',
                                          lambda path: _two_processes(path, idx_dir)))


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(one_process, two_processes):
  for a, b in zip(_params(one_process), _params(two_processes)):
    np.testing.assert_array_equal(a, b)
  # One report, written by process 0, with the figures of the one-process run.
  one_report = json.loads((one_process / 'report' / 'metrics.json').read_text())
  two_report = json.loads((two_processes / 'report' / 'metrics.json').read_text())
  for name in ('authorized_acc', 'no_key_acc', 'forged_acc_max', 'leak_probe_acc'):
    assert one_report[name] == two_report[name], name


def _start_pair(workdir, idx_dir, *extra):
  port = _free_port()
  return [_main(*_args(workdir, idx_dir, *RECIPE, *NO_BASELINE, '--config.train.progress_every_s=0',
                       '--heartbeat_timeout_s=15', f'--coordinator_address=127.0.0.1:{port}',
                       '--num_processes=2', f'--process_id={i}', *extra)) for i in range(2)]


def _wait_for_line(proc, text: str, lines: list, timeout: float = 300):
  deadline = time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    if text in line or time.time() > deadline:
      return


def _wait_for_step(proc, step: int, lines: list, timeout: float = 300):
  _wait_for_line(proc, f'step {step}/', lines, timeout)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpoint(tmp_path, idx_dir, one_process):
  procs = _start_pair(tmp_path / 'run', idx_dir)
  lines = []
  _wait_for_step(procs[0], 8, lines)
  time.sleep(random.uniform(0.0, 2.0))  # a random step
  victim = random.randrange(2)
  procs[victim].send_signal(signal.SIGTERM)
  t0 = time.time()
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert time.time() - t0 < 60, 'the processes took more than 60 s to stop'
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  stopped = [int(o.split('at step ')[1].split(';')[0]) for o in outs]
  assert stopped[0] == stopped[1], stopped  # one step for both
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'run' / 'checkpoints') if d.isdigit())
  assert saved[-1] == stopped[0] and stopped[0] % 10 == 0  # agreed at a stop check
  before = json.loads((tmp_path / 'run' / 'timings.json').read_text())['train_s']
  assert before > 0
  # Resuming in one process continues the same run: the same parameters as an uninterrupted one.
  resumed = _main(*_args(tmp_path / 'run', idx_dir, *RECIPE, *NO_BASELINE), devices=2)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0 and f'Resumed licensed model from step {stopped[0]}' in out, out[-3000:]
  # The report's training time adds both runs.
  assert json.loads((tmp_path / 'run' / 'report' / 'metrics.json').read_text())['licensed_train_s'] > before
  for a, b in zip(_params(tmp_path / 'run'), _params(one_process)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_second_sigterm_exits_nonzero_without_hanging(tmp_path, idx_dir):
  procs = _start_pair(tmp_path / 'run', idx_dir)
  lines = []
  _wait_for_step(procs[0], 8, lines)
  procs[1].send_signal(signal.SIGTERM)
  # Two signals sent back to back can reach Python as one: send the second once the first was seen.
  _wait_for_line(procs[1], 'SIGTERM received', lines)
  procs[1].send_signal(signal.SIGTERM)  # the second one ends it at once
  codes = []
  for p in procs:
    try:
      p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
      p.kill()
      pytest.fail('a process hung after its peer was killed')
    codes.append(p.returncode)
  assert codes[1] != 0 and codes[0] != 0, codes  # the survivor lost its peer: an error, not a hang


@pytest.mark.slow
def test_replace_and_security_on_two_processes_write_one_report(tmp_path, two_processes):
  for config, out_dir, extra in (
      ('configs/replace_key.py:smoke', 'rekeyed', (f'--config.source_workdir={two_processes}',
                                                   '--config.new_secret=n2')),
      ('configs/security.py:smoke', 'sec', (f'--config.target_workdir={two_processes}',
                                            '--config.sections=forgery,leakage'))):
    proc = _local(2, '--config', config, '--workdir', str(tmp_path / out_dir), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [f for f in os.listdir(tmp_path / out_dir / 'report') if not f.startswith('.tmp')]
    assert 'metrics.json' in reports or 'security.json' in reports, reports
  assert json.loads((tmp_path / 'rekeyed' / 'report' / 'metrics.json').read_text())['revoked_acc'] >= 0


_KEYS_RACE = r'''
import sys, time
from securenet_jax import licensing, parallel, registry, workdir
from configs import default
port, pid, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parallel.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
exists = registry.KeyRegistry.exists
appeared = None
def late_look(path):  # process 1 waits up to 8 s for the primary's registry before it looks
  global appeared
  if pid == 1:
    deadline = time.time() + 8
    while not exists(path) and time.time() < deadline:
      time.sleep(0.1)
    appeared = exists(path)
  return exists(path)
registry.KeyRegistry.exists = staticmethod(late_look)
config = default.get_config()
config.key.secret = 'race'
active, _ = licensing.training_keys(config, workdir.Workdir(root), (28, 28, 1), 10)
parallel.barrier('after the keys')
print('flags', parallel.process_flags(pid == 1), 'key', active[0].fingerprint[:12], flush=True)
if pid == 1:
  print('registry appeared before the look:', appeared, flush=True)
'''


def test_a_late_process_still_registers_the_keys_with_the_others(tmp_path):
  # A process that looked at the key registry only after the primary had written it took the
  # "registered" branch, skipped the barrier after the writing and broke the next collective.
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, '-c', _KEYS_RACE, str(port), str(i), str(tmp_path / 'wd')],
                            cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
  lines = [next(line for line in out.splitlines() if line.startswith('flags')) for out in outs]
  assert lines[0] == lines[1] and lines[0].startswith('flags [False, True] key ')
  # The primary could not register the keys while process 1 had not looked.
  assert 'registry appeared before the look: False' in outs[1]
