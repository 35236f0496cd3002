"""End-to-end tests of the command line: ``python -m securenet_jax.main``."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def run_main(workdir, *overrides, env=None, **popen_kw):
  cmd = [sys.executable, '-m', 'securenet_jax.main', '--config', 'configs/default.py:smoke',
         '--workdir', str(workdir), '--alsologtostderr', *overrides]
  env = dict(os.environ if env is None else env, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen_kw)


@pytest.mark.slow
def test_cli_smoke_run_with_overrides(tmp_path, idx_dir):
  proc = run_main(tmp_path, f'--config.dataset.data_dir={idx_dir}', '--config.key.secret=cli',
                  '--config.eval.num_forged=2')
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
  assert metrics['num_forged'] == 2
  assert os.listdir(tmp_path / 'tensorboard') and os.listdir(tmp_path / 'baseline' / 'tensorboard')
  assert (tmp_path / 'keys' / 'registry.json').exists()


@pytest.mark.slow
def test_compilation_cache_keeps_the_compiled_steps_without_the_data(tmp_path, idx_dir):
  """--compilation_cache keeps the compiled steps between runs; the device-resident training set is
  an argument of the step, not a constant compiled into it (which made the step's entry 1.6 MB here,
  the default job's 26 MB, and its compiling twice as slow)."""
  cache = tmp_path / 'cache'
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  proc = run_main(tmp_path / 'wd', f'--config.dataset.data_dir={idx_dir}', '--config.key.secret=cache',
                  '--config.dataset.train_limit=0',
                  '--config.eval.clean_baseline=False', '--config.objective.clean_distill_weight=0',
                  f'--compilation_cache={cache}', env=env)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  steps = [f for f in os.listdir(cache) if 'resident_step' in f]
  assert steps, os.listdir(cache)
  assert all(os.path.getsize(cache / f) < 2**20 for f in steps), [os.path.getsize(cache / f) for f in steps]


def _stop_during_training(tmp_path, idx_dir, signals):
  """Starts a 12-epoch smoke run, sends ``signals`` (in order, 1 s apart) once step 8 is logged."""
  args = (f'--config.dataset.data_dir={idx_dir}', '--config.key.secret=sig', '--config.train.num_epochs=12',
          '--config.eval.clean_baseline=False', '--config.objective.clean_distill_weight=0',
          '--config.train.progress_every_s=0')
  proc = run_main(tmp_path, *args)
  lines = []
  deadline = time.time() + 240
  for line in proc.stdout:  # wait until training is under way
    lines.append(line)
    if 'step 8/' in line or time.time() > deadline:
      break
  for i, sig in enumerate(signals):
    if i:
      time.sleep(1.0)
    proc.send_signal(sig)
  out, _ = proc.communicate(timeout=120)
  return proc.returncode, ''.join(lines) + out, args


@pytest.mark.slow
@pytest.mark.parametrize('sig, code', [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_stops(tmp_path, idx_dir, sig, code):
  """Either signal checkpoints the step it stopped at and stops with the shell's exit code."""
  returncode, out, _ = _stop_during_training(tmp_path, idx_dir, [sig])
  assert returncode == code, out[-3000:]
  assert f'Stopped by {signal.Signals(sig).name} at step' in out and 'Rerun the same command to resume' in out
  assert 'Traceback' not in out
  saved = [int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]
  stopped_at = int(out.split('at step ')[1].split(';')[0])
  assert max(saved) == stopped_at >= 8  # nothing lost past the step it stopped at
  assert not (tmp_path / 'report').exists()
  # The rerun resumes from that checkpoint: tests/test_parallel.py (bit-exact) and test_train.py.


@pytest.mark.slow
def test_second_signal_stops_at_once(tmp_path, idx_dir):
  returncode, out, _ = _stop_during_training(tmp_path, idx_dir, [signal.SIGINT, signal.SIGINT])
  assert returncode != 0 and 'received' in out


def _cli(*args, timeout=120):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'securenet_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_configs_and_exits_0():
  proc = _cli('--help')
  assert proc.returncode == 0
  assert 'default.py' in proc.stdout and 'variants: smoke' in proc.stdout and '--config.a.b=' in proc.stdout


@pytest.mark.parametrize('args, message, fix', [
    (('--config', 'configs/nothere.py', '--workdir', 'W'), 'cannot read the config file', 'configs/'),
    (('--config', 'configs/default.py:weird', '--workdir', 'W'), "Unknown config variant ['weird']", '--help'),
    (('--config', 'configs/default.py:smoke', '--workdir', 'W', '--config.train.num_epoch=3'),
     'unknown config field: \'num_epoch\' Did you mean "num_epochs"', 'field name'),
    (('--config', 'configs/default.py:smoke', '--workdir', 'W', '--config.train.num_epochs=abc'),
     'bad flag', '--config.a.b=VALUE'),
    ((), '--config and --workdir are required', 'usage'),
])
def test_cli_errors_are_one_line_with_the_fix(args, message, fix):
  proc = _cli(*args)
  assert proc.returncode == 2
  err = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(err) <= 3 and err[0].startswith('error: ') and message in err[0], proc.stderr
  assert err[1].startswith('  fix: ') and fix in err[1], proc.stderr


def test_workdir_of_another_config_is_refused_with_the_fix(tmp_path, idx_dir):
  args = ('--config', 'configs/default.py:smoke', '--workdir', str(tmp_path),
          f'--config.dataset.data_dir={idx_dir}')
  (tmp_path / 'config.json').write_text('{"seed": 7}')
  proc = _cli(*args)
  err = [line for line in proc.stderr.splitlines() if line.startswith(('error', '  fix'))]
  assert proc.returncode == 2 and 'holds a run of another config' in err[0] and 'new --workdir' in err[1]


def test_missing_data_fails_clearly(tmp_path):
  proc = _cli('--config', 'configs/default.py:smoke', '--workdir', str(tmp_path),
              '--config.dataset.data_dir=/nonexistent')
  err = [line for line in proc.stderr.splitlines() if line.startswith(('error', '  fix'))]
  assert proc.returncode == 2 and "Dataset 'fashion_mnist' not found" in err[0]
  assert 'apt-get install dataset-fashion-mnist' in err[1]
