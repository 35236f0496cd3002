"""Shared fixtures. Four forced host devices for the whole test process: the flag can be set only
once, before JAX initializes its backend."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import gzip  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from securenet_jax.data import DEFAULT_IDX_DIR  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def train_smoke_workdir(tmp_path_factory, idx_dir: str, secret: str) -> str:
  """Trains the default smoke config (licensed + baseline + report) on the generated data."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from securenet_jax import train  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke')
  config.dataset.data_dir = idx_dir
  config.key.secret = secret
  workdir = str(tmp_path_factory.mktemp('workdir'))
  train.train_and_evaluate(config, workdir)
  return workdir

