"""The security suite end to end (smoke sizes) and its building blocks."""

import json
import os

import numpy as np
import pytest

from securenet_jax import keys
from securenet_jax import security
from tests.conftest import train_smoke_workdir

FLAT = ('authorized_acc', 'forged_acc_max', 'leak_probe_acc', 'recovered_acc', 'finetune_acc@0.01',
        'scratch_acc@0.01', 'pgd_unprotected_robust_acc', 'pgd_keyless_robust_acc',
        'pgd_adaptive_robust_acc', 'backdoor_finetune_asr_licensed', 'backdoor_finetune_asr_unprotected')


def test_near_and_shifted_keys():
  geometry = keys.Geometry(kind='patch', image_shape=(28, 28, 1), size=6, position=(21, 21))
  key = keys.derive('s', geometry)
  same = security.near_key(key, 0.0, 0)
  np.testing.assert_array_equal(same.content, key.content)
  changed = [np.mean(security.near_key(key, 1.0, seed).content != key.content) for seed in range(20)]
  assert 0.3 < np.mean(changed) < 0.7  # binary content: a redrawn pixel changes half the time
  # 25% of the 36 pixels redrawn: at most 9 differ
  assert np.sum(security.near_key(key, 0.25, 3).content != key.content) <= 9
  shifted = security.shifted_keys(key, 2)
  # the key sits 1 px from the bottom-right corner: only up and left fit for a 2 px shift
  assert sorted(k.geometry.position for k in shifted) == [(19, 21), (21, 19)]
  assert all(np.array_equal(k.content, key.content) for k in shifted)


def test_default_budgets_follow_the_image_type():
  assert security.default_eps((28, 28, 1)) == (0.1, 0.2)
  assert security.default_eps((32, 32, 3)) == (8 / 255,)
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  assert tuple(security_config.get_config().adversarial.eps) == ()  # () = by image type


@pytest.fixture(scope='module')
def trained(tmp_path_factory, idx_dir):
  return train_smoke_workdir(tmp_path_factory, idx_dir, 'security-test')


def test_smoke_suite_writes_every_figure(trained, tmp_path):
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  config = security_config.get_config('smoke')
  config.target_workdir = trained
  flat = security.run(config, str(tmp_path))
  with open(tmp_path / 'report' / 'security.json') as f:
    report = json.load(f)
  for k in FLAT:
    assert isinstance(report[k], float) and 0.0 <= report[k] <= 1.0, (k, report.get(k))
  assert set(report['sections']) == set(security.SECTIONS)
  # the automatic budgets of gray images: 0.1 gives the flat figures, 0.2 the @0.2 ones
  assert set(report['sections']['adversarial']) >= {'eps=0.1', 'eps=0.2'}
  assert 0.0 <= report['pgd_keyless_robust_acc@0.2'] <= 1.0
  assert 'backdoor_finetune_asr_licensed_before' in report
  assert flat == {k: v for k, v in report.items() if k in flat}
  assert os.path.getsize(tmp_path / 'report' / 'security.png') > 0
  assert '# Security report' in (tmp_path / 'report' / 'security.md').read_text()


def test_bad_requests(trained, tmp_path):
  from configs import security as security_config  # pylint: disable=g-import-not-at-top
  config = security_config.get_config('smoke')
  with pytest.raises(ValueError, match='target_workdir'):
    security.run(config, str(tmp_path))
  config.target_workdir = trained
  config.sections = ('forgery,telepathy',)  # as --config.sections=forgery,telepathy arrives
  with pytest.raises(ValueError, match=r"Unknown sections \['telepathy'\]"):
    security.run(config, str(tmp_path))
  config.sections = ('forgery',)
  with pytest.raises(ValueError, match='must differ'):
    security.run(config, trained)
  config.key_name = 'nobody'
  with pytest.raises(ValueError, match='No active key'):
    security.run(config, str(tmp_path))
