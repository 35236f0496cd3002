"""Shared fixtures. Four forced host devices for the whole test process: the flag can be set only
once, before JAX initializes its backend."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiled steps are cached on disk and shared by the test processes (pytest-xdist workers and the
# subprocesses of CLI tests): many tests train the same small model. Every compilation is cached, the
# quick ones too (each subprocess would compile them again).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.environ.get('TMPDIR', '/tmp'), f'securenet-jax-test-cache-{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import fcntl  # pylint: disable=g-import-not-at-top,wrong-import-position
import gzip  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from securenet_jax.data import DEFAULT_IDX_DIR  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
  parser.addoption('--zoo', action='store_true',
                   help='also run the end-to-end smoke runs of the large zoo models (minutes each)')


def pytest_collection_modifyitems(config, items):
  if config.getoption('--zoo'):
    return
  skip = pytest.mark.skip(reason='large zoo model end to end: run with --zoo')
  for item in items:
    if 'zoo' in item.keywords:
      item.add_marker(skip)


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> None:
  """Writes an unsigned-byte IDX file, the MNIST on-disk format."""
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
  if compress:
    with gzip.open(path + '.gz', 'wb') as f:
      f.write(payload)
  else:
    with open(path, 'wb') as f:
      f.write(payload)


def make_images(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Learnable 28x28 images: class c is a bright horizontal bar at row 2 + 2c, plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, num).astype(np.uint8)
  images = rng.integers(0, 60, (num, 28, 28)).astype(np.uint8)
  for i, c in enumerate(labels):
    images[i, 2 + 2 * c:4 + 2 * c, 3:20] = 230
  return images, labels


@pytest.fixture(scope='session')
def idx_dir(tmp_path_factory) -> str:
  """A small generated dataset in MNIST IDX format (2048 train / 512 test)."""
  d = tmp_path_factory.mktemp('idx')
  for split, n, seed in (('train', 2048, 0), ('t10k', 512, 1)):
    images, labels = make_images(n, seed)
    write_idx(str(d / f'{split}-images-idx3-ubyte'), images)
    write_idx(str(d / f'{split}-labels-idx1-ubyte'), labels, compress=False)
  return str(d)


@pytest.fixture
def smoke_config(idx_dir):
  """The smoke variant of the default config, on the generated IDX data."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke')
  config.dataset.data_dir = idx_dir
  config.key.secret = 'test-secret'
  return config


@pytest.fixture(scope='session')
def fashion_mnist_dir() -> str:
  """The real Fashion-MNIST IDX files; CI installs them, so they are required there."""
  if not os.path.isdir(DEFAULT_IDX_DIR):
    if os.environ.get('CI'):
      pytest.fail(f'{DEFAULT_IDX_DIR} missing in CI: `apt-get install dataset-fashion-mnist`.')
    pytest.skip(f'{DEFAULT_IDX_DIR} not installed (apt-get install dataset-fashion-mnist)')
  return DEFAULT_IDX_DIR


def shared_dir(tmp_path_factory, name: str, build) -> str:
  """A directory built once per test run, shared by all pytest-xdist workers: ``build(path)`` runs in
  the first worker that asks (under a file lock), the others wait for it and reuse the result."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base  # the run's own folder
  path, done = root / name, root / f'{name}.done'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        build(str(path))
        done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return str(path)


def effects_config(idx_dir: str, name: str = 'default', secret: str = 'effects'):
  """A config that actually learns its license on the generated data in seconds: 8 epochs of 2048
  images (256 steps; the default's block-flip domain and deeper gate silence every keyless input
  only after about 200) at learning rate 4e-3, the rest as in ``configs/<name>.py:smoke``."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.dataset.data_dir = idx_dir
  config.dataset.train_limit = 2048
  config.dataset.test_limit = 512
  config.train.num_epochs = 8
  config.train.learning_rate = 4e-3
  config.train.log_every = 32
  config.train.checkpoint_every = 64
  config.eval.num_forged = 5
  config.key.secret = secret
  # Matching the baseline's hidden features slows the silencing on this miniature (0.87 of the no-key
  # inputs silenced after its 256 steps, against 1.000 on Fashion-MNIST at 10 epochs): outputs only.
  config.objective.clean_distill_features_weight = 0.0
  # The default's silencing margin of 2 silences none of this miniature's no-key inputs within its 256
  # steps (every one on Fashion-MNIST at 10 epochs): the margin of 1 it was built with.
  config.objective.silence_margin = 1.0
  return config


def train_workdir(config, path: str) -> str:
  from securenet_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, path)
  return path


def multi_key_config(idx_dir: str):
  """Three licensees with different privileges in one model, for the effect tests of scopes, tiers,
  replacement and revocation: ``full`` (every class), ``clothing`` (classes 0-4, the others refused)
  and ``basic`` (coarse groups only)."""
  from configs import scheme_tiered  # pylint: disable=g-import-not-at-top
  config = effects_config(idx_dir, 'scheme_multi_user', 'multi-effects')
  config.license.users = ('full', 'clothing', 'basic')
  config.license.matrix = ((1,) * 10, (1,) * 5 + (0,) * 5, (1,) * 10)
  config.license.tiers = ('full', 'full', 'basic')
  config.license.groups = scheme_tiered.FASHION_GROUPS
  config.train.num_epochs = 12  # three keys share the positives of each batch
  config.eval.clean_baseline = False
  config.objective.clean_distill_weight = 0.0  # its teacher would be the baseline
  return config


@pytest.fixture(scope='session')
def multi_key_workdir(tmp_path_factory, idx_dir) -> str:
  """``multi_key_config``, trained once per run."""
  return shared_dir(tmp_path_factory, 'trained_multi_key',
                    lambda path: train_workdir(multi_key_config(idx_dir), path))


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, idx_dir) -> str:
  """The default config, licensed + baseline + report, trained once per run (``effects_config``)."""
  return shared_dir(tmp_path_factory, 'trained_default',
                    lambda path: train_workdir(effects_config(idx_dir), path))
