"""End to end on real Fashion-MNIST: a short licensed run must already show the licensing effect.

The thresholds are scaled to the run's length (2 epochs on a third of the training set, ~1 minute on
2 CPU cores); the full default job's figures are in README.md.
"""

import pytest

from securenet_jax import inference
from securenet_jax import train


@pytest.mark.slow
def test_short_real_run_is_licensed(tmp_path, fashion_mnist_dir):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.dataset.data_dir = fashion_mnist_dir
  config.key.secret = 'end-to-end-test'  # a fixed key: the same run on every machine
  config.dataset.train_limit = 20000
  config.dataset.test_limit = 4000
  config.train.num_epochs = 2
  config.train.log_every = 50
  config.eval.num_forged = 20
  config.eval.clean_baseline = False
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics['authorized_acc'] >= 0.70, metrics
  assert metrics['no_key_acc'] <= 0.2, metrics
  assert metrics['forged_acc_max'] <= 0.3, metrics
  assert metrics['leak_argmin_acc'] <= 0.25, metrics
  assert metrics['leak_probe_acc'] <= 0.35, metrics
  # The public API reproduces the report's figure.
  model = inference.load(str(tmp_path))
  from securenet_jax import data  # pylint: disable=g-import-not-at-top
  ds = data.load(config.dataset)
  acc = (model.predict(ds.test_images, key='default') == ds.test_labels).mean()
  assert acc == pytest.approx(metrics["authorized_acc"], abs=1e-4)
