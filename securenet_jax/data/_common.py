"""What the dataset modules share: the option defaults, the missing-data error and its how-to text."""

from __future__ import annotations

import math
import hashlib
from typing import Sequence

import numpy as np

from securenet_jax import errors

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'

# name -> the sources it can be read from (the first is the one an empty `source` picks).
SOURCES = {
    'fashion_mnist': ('idx', 'tfds'),
    'mnist': ('idx', 'tfds'),
    'cifar10': ('cifar_python', 'tfds'),
    'cifar100': ('cifar_python', 'tfds'),
    'celeba': ('celeba', 'tfds'),
    'facescrub': ('folder',),
}
TFDS_NAMES = {'fashion_mnist': 'fashion_mnist', 'mnist': 'mnist', 'cifar10': 'cifar10',
              'cifar100': 'cifar100', 'celeba': 'celeb_a'}

# Optional `config.dataset` fields and their defaults (older configs lack them).
DEFAULTS = {
    'train_limit': 0,  # keep only the first N training examples (0: all)
    'test_limit': 0,  # keep only the first N test examples (0: all)
    'cache': True,  # cache decoded face images (celeba, facescrub) as an .npz
    'cache_dir': '',  # where the cache goes ('' : next to the data, in data_dir)
    'label_mode': 'fine',  # cifar100: 'fine' (100 classes) or 'coarse' (20 superclasses)
    'image_size': 64,  # celeba, facescrub: side of the square images
    'celeba_task': 'identity',  # celeba: 'identity' or 'attribute'
    'num_identities': 1000,  # celeba identity task: the N most frequent identities
    'attribute': 'Smiling',  # celeba attribute task: which of the 40 attributes
    'celeba_crop': 140,  # celeba: side of the centered square cropped from the 178x218 aligned image
    'test_fraction': 0.1,  # celeba identity task, facescrub: share of each identity's images held out
    'split_seed': 0,  # celeba identity task, facescrub: seed of the per-identity split
}


def option(cfg, field: str):
  """``cfg.field``, or its default when the config lacks it (or sets it to None)."""
  value = cfg.get(field, None)
  return DEFAULTS[field] if value is None else value


class DataMissingError(errors.SecureNetError, FileNotFoundError):
  """The dataset is not where the config says (the message lists the ways to get it; ``hint`` is the
  first, in one line)."""


def _how_to(name: str) -> list[str]:
  if name in ('fashion_mnist', 'mnist'):
    return [
        f'Fashion-MNIST offline: `apt-get install dataset-fashion-mnist` (installs the IDX files in '
        f'{DEFAULT_IDX_DIR}), or put MNIST-format IDX files in a folder and set '
        f'--config.dataset.source=idx --config.dataset.data_dir=DIR.',
        _tfds_how_to(name)]
  if name in ('cifar10', 'cifar100'):
    folder = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
    tarball = 'cifar-10-python.tar.gz' if name == 'cifar10' else 'cifar-100-python.tar.gz'
    return [
        f'The official python release: download https://www.cs.toronto.edu/~kriz/{tarball}, '
        f'`tar xzf {tarball} -C DIR` (this creates DIR/{folder}), then set '
        f'--config.dataset.source=cifar_python --config.dataset.data_dir=DIR (DIR/{folder} works too).',
        _tfds_how_to(name)]
  if name == 'celeba':
    return [
        'The official release (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, Google Drive / Baidu): '
        'unzip Img/img_align_celeba.zip into DIR (DIR/img_align_celeba/000001.jpg ...) and copy '
        'Anno/identity_CelebA.txt, Anno/list_attr_celeba.txt and Eval/list_eval_partition.txt into DIR, '
        'then set --config.dataset.source=celeba --config.dataset.data_dir=DIR.',
        _tfds_how_to(name) + ' (the attribute task; tfds celeb_a before 2.1.0 has no identity labels).']
  if name == 'facescrub':
    return [
        'FaceScrub (http://vintage.winklerbros.net/facescrub.html) is distributed as lists of image URLs '
        '(facescrub_actors.txt, facescrub_actresses.txt): download the faces with a script of your '
        'choice and arrange them one folder per identity, DIR/<identity>/<image>.jpg|.png (usually 530 '
        'identities), then set --config.dataset.source=folder --config.dataset.data_dir=DIR.']
  return []


def _tfds_how_to(name: str) -> str:
  return (f'tensorflow-datasets: on a machine with network, `pip install "securenet-jax[tfds]"` and '
          f'`tfds build {TFDS_NAMES.get(name, name)} --data_dir=DIR` (or tfds.load), then set '
          f'--config.dataset.source=tfds --config.dataset.data_dir=DIR')


def missing(cfg, detail: str) -> DataMissingError:
  """A DataMissingError saying what is missing (``detail``) and how to get the dataset."""
  ways = _how_to(cfg.name)
  text = f'Dataset {cfg.name!r} not found ({detail}).'
  if ways:
    text += (' Two ways to get it:' if len(ways) == 2 else ' To get it:') + ''.join(
        f'\n  {i}. {w}' for i, w in enumerate(ways, 1))
  return DataMissingError(text, hint=ways[0].split(':', 1)[-1].strip() if ways else '')


def per_group_test_mask(names: Sequence[str], groups: np.ndarray, fraction: float, seed: int
                        ) -> np.ndarray:
  """Boolean mask of the held-out (test) members of a deterministic per-group split.

  Within each group of ``n`` members, the ``k = round(fraction * n)`` members (at least 1 when
  ``n >= 2``, at most ``n - 1``; 0 for a single member) whose names come first in the order of
  ``blake2b(f'{seed}/{name}')`` are held out. The split depends only on the names, the seed and
  the group sizes, not on the order the files are listed in; every group keeps a training example.
  """
  if not 0 < fraction < 1:
    raise ValueError(f'test_fraction must be in (0, 1), got {fraction}.')
  groups = np.asarray(groups)
  order = np.argsort(groups, kind='stable')
  boundaries = np.flatnonzero(np.diff(groups[order])) + 1
  test = np.zeros(len(names), bool)
  for members in np.split(order, boundaries):
    n = len(members)
    if n < 2:
      continue
    k = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
    ranked = sorted(members, key=lambda i: hashlib.blake2b(f'{seed}/{names[i]}'.encode(),
                                                           digest_size=8).digest())
    test[ranked[:k]] = True
  return test
