"""Tests of securenet_jax.parallel and of multi-process runs on loopback (CPU, gloo).

The multi-process tests start real processes: ``launch/local.sh`` or one ``securenet_jax.main`` per
process with ``--coordinator_address``. Each process has one CPU device; the one-process runs they are
compared with have two, so the global mesh (and the arithmetic) is the same.
"""

import json
import os
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
from tests.conftest import REPO


def test_single_process_helpers():
  assert parallel.any_process(True) and not parallel.any_process(False)
  rows = np.arange(10)[:, None] * np.ones((1, 3))
  np.testing.assert_array_equal(parallel.map_rows(lambda r: r * 2, rows), rows * 2)
  parallel.barrier('nothing to wait for')
  assert parallel.is_primary() and parallel.cluster_environment() == ''
  with pytest.raises(ValueError, match='num_processes'):
    parallel.initialize('127.0.0.1:1', num_processes=2, process_id=5)


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


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, idx_dir):
  one = _main(*_args(tmp_path / 'one', idx_dir), devices=2)
  out, _ = one.communicate(timeout=600)
  assert one.returncode == 0, out[-3000:]
  two = subprocess.run([os.path.join(REPO, 'launch', 'local.sh'), '2',
                        *_args(tmp_path / 'two', idx_dir)], cwd=REPO, env=dict(_env(1), PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=600)
  assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
  for a, b in zip(_params(tmp_path / 'one'), _params(tmp_path / 'two')):
    np.testing.assert_array_equal(a, b)
  # One report, written by process 0, with the figures of the one-process run.
  one_report = json.loads((tmp_path / 'one' / 'report' / 'metrics.json').read_text())
  two_report = json.loads((tmp_path / 'two' / 'report' / 'metrics.json').read_text())
  for name in ('authorized_acc', 'no_key_acc', 'forged_acc_max', 'clean_acc'):
    assert one_report[name] == two_report[name], name


def _start_pair(workdir, idx_dir, *extra):
  port = _free_port()
  return [_main(*_args(workdir, idx_dir, '--config.train.num_epochs=12', '--config.eval.clean_baseline=False',
                       '--config.train.progress_every_s=0', f'--coordinator_address=127.0.0.1:{port}',
                       '--num_processes=2', f'--process_id={i}', *extra)) for i in range(2)]


def _wait_for_step(proc, step: int, lines: list, timeout: float = 300):
  deadline = time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    if f'step {step}/' in line or time.time() > deadline:
      return


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpoint(tmp_path, idx_dir):
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
  # Resuming in one process continues the same run: the same parameters as an uninterrupted one.
  resumed = _main(*_args(tmp_path / 'run', idx_dir, '--config.train.num_epochs=12',
                         '--config.eval.clean_baseline=False'), devices=2)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0 and f'Resumed licensed model from step {stopped[0]}' in out, out[-3000:]
  straight = _main(*_args(tmp_path / 'straight', idx_dir, '--config.train.num_epochs=12',
                          '--config.eval.clean_baseline=False'), devices=2)
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out[-3000:]
  for a, b in zip(_params(tmp_path / 'run'), _params(tmp_path / 'straight')):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_second_sigterm_exits_nonzero_without_hanging(tmp_path, idx_dir):
  procs = _start_pair(tmp_path / 'run', idx_dir)
  lines = []
  _wait_for_step(procs[0], 8, lines)
  procs[1].send_signal(signal.SIGTERM)
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
def test_replace_and_security_on_two_processes_write_one_report(tmp_path, idx_dir):
  trained = subprocess.run([os.path.join(REPO, 'launch', 'local.sh'), '2', *_args(tmp_path / 'w', idx_dir)],
                           cwd=REPO, env=dict(_env(1), PYTHON=sys.executable), capture_output=True,
                           text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  for config, out_dir, extra in (
      ('configs/replace_key.py:smoke', 'rekeyed', (f'--config.source_workdir={tmp_path / "w"}',
                                                   '--config.new_secret=n2')),
      ('configs/security.py:smoke', 'sec', (f'--config.target_workdir={tmp_path / "w"}',
                                            '--config.sections=forgery,leakage'))):
    proc = subprocess.run([os.path.join(REPO, 'launch', 'local.sh'), '2', '--config', config, '--workdir',
                           str(tmp_path / out_dir), *extra], cwd=REPO,
                          env=dict(_env(1), PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [f for f in os.listdir(tmp_path / out_dir / 'report') if not f.startswith('.tmp')]
    assert 'metrics.json' in reports or 'security.json' in reports, reports
  assert json.loads((tmp_path / 'rekeyed' / 'report' / 'metrics.json').read_text())['revoked_acc'] >= 0
