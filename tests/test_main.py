"""End-to-end tests of the command line: ``python -m securenet_jax.main``."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def run_main(workdir, *overrides, **popen_kw):
  cmd = [sys.executable, '-m', 'securenet_jax.main', '--config', 'configs/default.py:smoke',
         '--workdir', str(workdir), '--alsologtostderr', *overrides]
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
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
def test_sigterm_checkpoints_and_rerun_resumes(tmp_path, idx_dir):
  args = (f'--config.dataset.data_dir={idx_dir}', '--config.key.secret=sig', '--config.train.num_epochs=12',
          '--config.eval.clean_baseline=False')
  proc = run_main(tmp_path, *args)
  lines = []
  deadline = time.time() + 240
  for line in proc.stdout:  # wait until training is under way
    lines.append(line)
    if 'step 8/' in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  out = ''.join(lines) + out
  assert proc.returncode == 0, out[-3000:]
  assert 'Stopped by SIGTERM at step' in out
  saved = [int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]
  assert saved and max(saved) >= 8 and max(saved) < 12 * 16
  assert not (tmp_path / 'report').exists()

  proc = run_main(tmp_path, *args)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert f'Resumed licensed model from step {max(saved)}' in out
  assert (tmp_path / 'report' / 'metrics.json').exists()


def test_missing_data_fails_clearly(tmp_path):
  proc = run_main(tmp_path, '--config.dataset.data_dir=/nonexistent')
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and 'apt-get install dataset-fashion-mnist' in out
