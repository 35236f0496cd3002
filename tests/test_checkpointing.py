"""Tests of securenet_jax.checkpointing: restore, fallback past a corrupt checkpoint, variables only."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from securenet_jax import checkpointing
from securenet_jax import data as data_lib
from securenet_jax import inference
from securenet_jax import models
from securenet_jax import parallel
from securenet_jax import train
from securenet_jax.workdir import Workdir
from tests.conftest import REPO


def _corrupt(directory: str) -> None:
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')


def _checkpoint_errors_scenario(workdir: str, idx_dir: str) -> None:
  """Trains to step 4 with checkpoints at 2 and 4, then restores with another architecture, past a
  corrupt newest checkpoint, and from nothing but corrupt files."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke')
  config.dataset.data_dir, config.dataset.train_limit = idx_dir, 384
  config.train.checkpoint_every = 2
  dataset = data_lib.load(config.dataset)
  mesh = parallel.create_mesh(jax.devices()[:1])
  wd = Workdir(workdir)
  at4 = train.train(config, wd, dataset, None, mesh=mesh, stop_after_steps=4)
  assert sorted(int(p) for p in os.listdir(wd.checkpoints_dir) if p.isdigit()) == [2, 4]
  other = config.copy_and_resolve_references()
  other.model.kwargs = {'input_size': 36}  # another architecture: fc1 has another shape
  with pytest.raises(checkpointing.CheckpointError, match='other shapes'):
    train.train(other, wd, dataset, None, mesh=mesh)
  # Only the variables, no optimizer state: what inference loads.
  module = models.build(config.model, 10)
  variables = checkpointing.restore_variables(wd.checkpoints_dir,
                                              inference.abstract_variables(module, (28, 28, 1)))
  assert set(variables) == {'params'}
  for a, b in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(train.host_variables(at4)['params'])):
    np.testing.assert_array_equal(a, b)
  # A corrupt newest checkpoint: the restore falls back to step 2 and training goes on from there.
  _corrupt(os.path.join(wd.checkpoints_dir, '4'))
  resumed = train.train(config, wd, dataset, None, mesh=mesh, stop_after_steps=3)
  assert int(resumed.step) == 3
  # Nothing restorable at all: one error that says so.
  for step in os.listdir(wd.checkpoints_dir):
    _corrupt(os.path.join(wd.checkpoints_dir, step))
  with pytest.raises(checkpointing.CheckpointError, match='No checkpoint .* can be restored') as info:
    train.train(config, wd, dataset, None, mesh=mesh)
  assert 'new --workdir' in info.value.hint


@pytest.mark.slow
def test_mismatched_or_corrupt_checkpoints(tmp_path, idx_dir):
  # In a subprocess: a failed orbax restore leaves async reads behind that would surface as
  # unraisable-exception warnings in whichever test runs next.
  code = ('import sys; from tests.test_checkpointing import _checkpoint_errors_scenario as f; '
          'f(sys.argv[1], sys.argv[2]); print("SCENARIO OK")')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-W', 'ignore', '-c', code, str(tmp_path), idx_dir], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and 'SCENARIO OK' in proc.stdout, proc.stderr[-3000:]
  assert 'Skipped checkpoint(s) [4]' in proc.stderr


def test_no_checkpoint_directory(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='No checkpoint directory'):
    checkpointing.restore_variables(tmp_path / 'missing', {})


def test_a_remote_workdir_reaches_orbax_unmangled(monkeypatch):
  """gs:// and other remote workdirs go to Orbax as the same URI (no ``./gs:/...``)."""
  seen = []

  class Recorder:
    def __init__(self, directory, options=None):
      seen.append((directory, options))

  monkeypatch.setattr(checkpointing.ocp, 'CheckpointManager', Recorder)
  wd = Workdir('gs://bucket/run')
  checkpointing.manager(wd.checkpoints_dir, save_every=5)
  checkpointing.manager(wd.baseline.checkpoints_dir, read_only=True)
  assert [str(d) for d, _ in seen] == ['gs://bucket/run/checkpoints', 'gs://bucket/run/baseline/checkpoints']
  assert all(hasattr(d, 'joinpath') for d, _ in seen)  # epath.Path objects, as Orbax wants them
