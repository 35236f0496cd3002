"""Tests of securenet_jax.workdir: layout, atomic writes, config checks, model info."""

import json
import os

import pytest

from securenet_jax import errors
from securenet_jax import workdir as workdir_lib
from securenet_jax.workdir import Workdir


def test_rerun_with_different_config_refused(smoke_config, tmp_path):
  Workdir(tmp_path).save_or_check_config(smoke_config)
  assert (tmp_path / 'config.json').exists()
  same = smoke_config.copy_and_resolve_references()
  same.eval.num_forged = 50  # evaluation settings may change between runs
  Workdir(tmp_path).save_or_check_config(same)
  other = smoke_config.copy_and_resolve_references()
  other.objective.silence_weight = 0.0
  with pytest.raises(errors.WorkdirError, match='objective.silence_weight') as info:
    Workdir(tmp_path).save_or_check_config(other)


  assert 'new --workdir' in info.value.hint


def test_layout_and_remote_paths_are_not_mangled(tmp_path):
  wd = Workdir(tmp_path / 'w')
  assert str(wd.baseline.checkpoints_dir) == os.path.join(str(tmp_path), 'w', 'baseline', 'checkpoints')
  remote = Workdir('gs://bucket/run')
  assert str(remote) == 'gs://bucket/run' and str(remote.keys_dir) == 'gs://bucket/run/keys'
  assert Workdir('relative').root.is_absolute()


def test_atomic_write_leaves_no_temporary_files(tmp_path):
  path = tmp_path / 'sub' / 'x.json'
  workdir_lib.write_json(path, {'a': 0.1})
  workdir_lib.atomic_write(path, 'replaced')
  assert path.read_text() == 'replaced' and os.listdir(tmp_path / 'sub') == ['x.json']

  class Boom(Exception):
    pass

  def failing(f):
    f.write(b'partial')
    raise Boom()
  with pytest.raises(Boom):
    workdir_lib.atomic_write_with(path, failing)
  assert path.read_text() == 'replaced' and os.listdir(tmp_path / 'sub') == ['x.json']


def test_model_info_roundtrip_and_foreign_formats(tmp_path):
  wd = Workdir(tmp_path)
  with pytest.raises(errors.WorkdirError, match='no model.json'):
    wd.model_info()
  wd.write_model_info(10, (28, 28, 1))
  assert wd.model_info() == (10, (28, 28, 1))
  wd.model_path.write_text(json.dumps({'num_classes': 10, 'image_shape': [28, 28, 1]}))  # no version
  with pytest.raises(errors.WorkdirError, match='another version'):
    wd.model_info()
  wd.model_path.write_text('{garbage')
  with pytest.raises(errors.WorkdirError, match='not valid JSON'):
    wd.model_info()
  with pytest.raises(errors.WorkdirError, match='not a SecureNet-JAX workdir'):
    Workdir(tmp_path / 'empty').load_config()
