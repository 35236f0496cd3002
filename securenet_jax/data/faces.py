"""Face datasets: CelebA (official release or tfds ``celeb_a``) and FaceScrub (a folder per identity).

Both give square RGB images of ``image_size`` (default 64) pixels and single-label classes, because
the training objective is a softmax over classes.

CelebA (``name='celeba'``)
  ``source='celeba'`` reads the official release in ``data_dir``::

    img_align_celeba/000001.jpg ...   the aligned 178x218 faces
    identity_CelebA.txt               '000001.jpg 2880' per line        (identity task)
    list_attr_celeba.txt              count, 40 names, then '000001.jpg -1 1 ...' (attribute task)
    list_eval_partition.txt           '000001.jpg 0' per line, 0/1/2 = train/val/test (attribute task)

  ``source='tfds'`` reads a prepared tfds ``celeb_a`` (attributes; identities only from version 2.1.0
  on, which added them).

  Images: the centered ``celeba_crop`` x ``celeba_crop`` square (default 140 of the 178x218 aligned
  image: the face, little background) resized to ``image_size``.

  ``celeba_task='identity'`` (default): classify the ``num_identities`` (default 1000) most frequent
  identities. Labels are the frequency rank (0 = most images; ties broken by the smaller identity
  number); ``class_names`` holds the original identity numbers. The official partition puts each
  identity in one split only (it is made for attribute prediction), so it is not used: each
  identity's images are split deterministically instead, ``test_fraction`` (default 0.1) of them to
  test, chosen by a seeded hash of the file name (``split_seed``; see
  ``_common.per_group_test_mask``). An identity with a single image is train only.

  ``celeba_task='attribute'``: binary classification of one attribute (``attribute``, default
  'Smiling'; -1/1 -> 0/1) on the official partition: 0 = train, 2 = test (1 = validation is unused).
  The usual 40-way multi-label task is not supported: it needs 40 independent sigmoid outputs and a
  binary cross-entropy, while the licensing objective, its key/no-key targets and the evaluation
  are all defined for one softmax over mutually exclusive classes.

FaceScrub (``name='facescrub'``, ``source='folder'``)
  ``data_dir/<identity>/<image>.jpg|.jpeg|.png`` (the usual download has 530 identities; whatever is
  there is used). Labels follow the sorted folder names (``class_names``). Each identity's images
  are split deterministically as for CelebA identities (``test_fraction``, ``split_seed``). Images:
  the largest centered square, resized to ``image_size``. Hidden files and other extensions are
  ignored; an identity folder without images is an error.

Decoded arrays are cached (see ``cache.py``) as an .npz in ``cache_dir`` or, by default, ``data_dir``,
keyed by every option that changes them (``cache=False`` turns this off).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Sequence

import numpy as np
from absl import logging

from securenet_jax.data import _common
from securenet_jax.data import cache as cache_lib
from securenet_jax.data import images as images_lib

IDENTITY_FILE = 'identity_CelebA.txt'
ATTR_FILE = 'list_attr_celeba.txt'
PARTITION_FILE = 'list_eval_partition.txt'
IMAGE_DIR = 'img_align_celeba'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
CELEBA_TASKS = ('identity', 'attribute')

# Arrays = (train images, train labels, test images, test labels); plus class names.
Loaded = tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[str, ...]]


# ---------------------------------------------------------------------------------------- options


def celeba_num_classes(cfg) -> int:
  task = _celeba_task(cfg)
  return 2 if task == 'attribute' else _num_identities(cfg)


def _celeba_task(cfg) -> str:
  task = _common.option(cfg, 'celeba_task')
  if task not in CELEBA_TASKS:
    raise ValueError(f'dataset.celeba_task must be one of {CELEBA_TASKS}, got {task!r}.')
  return task


def _num_identities(cfg) -> int:
  n = int(_common.option(cfg, 'num_identities'))
  if n < 2:
    raise ValueError(f'dataset.num_identities must be >= 2, got {n}.')
  return n


def image_size(cfg) -> int:
  size = int(_common.option(cfg, 'image_size'))
  if size < 1:
    raise ValueError(f'dataset.image_size must be positive, got {size}.')
  return size


def _limits(cfg) -> tuple[int, int]:
  return int(_common.option(cfg, 'train_limit')), int(_common.option(cfg, 'test_limit'))


def _limit(items: Sequence, limit: int) -> Sequence:
  return items[:limit] if limit else items


def _cache_path(cfg, key: dict) -> str | None:
  if not _common.option(cfg, 'cache'):
    return None
  folder = _common.option(cfg, 'cache_dir') or cfg.data_dir
  return cache_lib.path_for(folder, cfg.name, key)


def _file_stamp(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


_REQUIRED = ('train_images', 'train_labels', 'test_images', 'test_labels', 'class_names')


def _unpack(arrays: dict) -> Loaded:
  return ((arrays['train_images'], arrays['train_labels'].astype(np.int32), arrays['test_images'],
           arrays['test_labels'].astype(np.int32)), tuple(str(n) for n in arrays['class_names']))


def _pack(train_images, train_labels, test_images, test_labels, class_names) -> dict:
  return dict(train_images=train_images, train_labels=np.asarray(train_labels, np.int32),
              test_images=test_images, test_labels=np.asarray(test_labels, np.int32),
              class_names=np.asarray(list(class_names), dtype=str))


# --------------------------------------------------------------------------- CelebA annotations


def _annotation_lines(cfg, file: str) -> tuple[str, list[str]]:
  path = os.path.join(cfg.data_dir, file)
  if not os.path.isfile(path):
    raise _common.missing(cfg, f'no annotation file {path!r}')
  with open(path, encoding='utf-8', errors='replace') as f:
    return path, f.read().splitlines()


def _malformed(path: str, lineno: int, line: str, expected: str) -> ValueError:
  return ValueError(f'{path}:{lineno}: malformed line {line.strip()[:80]!r}; expected {expected}.')


def _two_columns(cfg, file: str, expected: str, check: Callable[[int], bool]) -> dict[str, int]:
  """Parses '<file name> <int>' lines (the identity and partition files)."""
  path, lines = _annotation_lines(cfg, file)
  out = {}
  for lineno, line in enumerate(lines, 1):
    parts = line.split()
    if not parts:
      continue
    try:
      if len(parts) != 2:
        raise ValueError
      value = int(parts[1])
      if not check(value):
        raise ValueError
    except ValueError:
      raise _malformed(path, lineno, line, expected) from None
    if parts[0] in out:
      raise ValueError(f'{path}:{lineno}: {parts[0]!r} is listed twice.')
    out[parts[0]] = value
  if not out:
    raise ValueError(f'{path} lists no images; expected {expected} per line.')
  return out


def read_identities(cfg) -> dict[str, int]:
  return _two_columns(cfg, IDENTITY_FILE, '"<image>.jpg <identity number>"', lambda v: v >= 0)


def read_partition(cfg) -> dict[str, int]:
  return _two_columns(cfg, PARTITION_FILE, '"<image>.jpg <0, 1 or 2>"', lambda v: v in (0, 1, 2))


def read_attributes(cfg) -> tuple[list[str], dict[str, np.ndarray]]:
  """(the 40 attribute names, file name -> int8 values in {-1, 1})."""
  path, lines = _annotation_lines(cfg, ATTR_FILE)
  if len(lines) < 2:
    raise ValueError(f'{path}: expected a count line and a line of attribute names, then one line per '
                     f'image; the file has {len(lines)} line(s).')
  try:
    count = int(lines[0].strip())
  except ValueError:
    raise _malformed(path, 1, lines[0], 'the number of images') from None
  names = lines[1].split()
  if not names:
    raise _malformed(path, 2, lines[1], 'the attribute names')
  values = {}
  for lineno, line in enumerate(lines[2:], 3):
    parts = line.split()
    if not parts:
      continue
    expected = f'"<image>.jpg" and {len(names)} values of -1 or 1'
    if len(parts) != len(names) + 1:
      raise _malformed(path, lineno, line, expected)
    try:
      row = np.asarray([int(v) for v in parts[1:]], np.int8)
    except ValueError:
      raise _malformed(path, lineno, line, expected) from None
    if not np.isin(row, (-1, 1)).all():
      raise _malformed(path, lineno, line, expected)
    if parts[0] in values:
      raise ValueError(f'{path}:{lineno}: {parts[0]!r} is listed twice.')
    values[parts[0]] = row
  if len(values) != count:
    raise ValueError(f'{path}: the first line says {count} images, but {len(values)} are listed.')
  return names, values


def select_identities(keys: Sequence[str], identity: np.ndarray, num_identities: int,
                      test_fraction: float, seed: int, where: str):
  """The identity task on (example key, identity number) pairs.

  Returns:
    (train indices, train labels, test indices, test labels, identity numbers of the classes);
    indices into ``keys`` in their given order; labels are frequency ranks.
  """
  ids, counts = np.unique(identity, return_counts=True)
  if len(ids) < num_identities:
    raise ValueError(f'{where} has only {len(ids)} identities; dataset.num_identities={num_identities} '
                     f'were requested.')
  ranked = ids[np.lexsort((ids, -counts))][:num_identities]  # most images first, ties: smaller id
  rank = {int(i): r for r, i in enumerate(ranked)}
  chosen = np.flatnonzero(np.isin(identity, ranked))
  labels = np.asarray([rank[int(identity[i])] for i in chosen], np.int32)
  test = _common.per_group_test_mask([keys[i] for i in chosen], labels, test_fraction, seed)
  return chosen[~test], labels[~test], chosen[test], labels[test], [str(int(i)) for i in ranked]


# ------------------------------------------------------------------------------ CelebA official


def _celeba_options(cfg) -> dict:
  task = _celeba_task(cfg)
  key = dict(name=cfg.name, task=task, image_size=image_size(cfg),
             crop=int(_common.option(cfg, 'celeba_crop')), limits=_limits(cfg))
  if task == 'identity':
    key.update(num_identities=_num_identities(cfg),
               test_fraction=float(_common.option(cfg, 'test_fraction')),
               split_seed=int(_common.option(cfg, 'split_seed')))
  else:
    key.update(attribute=str(_common.option(cfg, 'attribute')))
  return key


def load_celeba(cfg) -> Loaded:
  """CelebA from the official release in ``cfg.data_dir`` (see the module docstring)."""
  if not os.path.isdir(cfg.data_dir):
    raise _common.missing(cfg, f'no directory {cfg.data_dir!r}')
  key = dict(_celeba_options(cfg), source='celeba')
  files = [IDENTITY_FILE] if key['task'] == 'identity' else [ATTR_FILE, PARTITION_FILE]
  for file in files:
    if not os.path.isfile(os.path.join(cfg.data_dir, file)):
      raise _common.missing(cfg, f'no annotation file {os.path.join(cfg.data_dir, file)!r}')
  key['annotations'] = {file: _file_stamp(os.path.join(cfg.data_dir, file)) for file in files}
  return _unpack(cache_lib.cached(_cache_path(cfg, key), key, lambda: _build_celeba(cfg, key),
                                  _REQUIRED))


def _build_celeba(cfg, key: dict) -> dict:
  train_limit, test_limit = key['limits']
  if key['task'] == 'identity':
    table = read_identities(cfg)
    files = sorted(table)
    tr, tr_labels, te, te_labels, class_names = select_identities(
        files, np.asarray([table[f] for f in files], np.int64), key['num_identities'],
        key['test_fraction'], key['split_seed'], os.path.join(cfg.data_dir, IDENTITY_FILE))
    train_files, test_files = [files[i] for i in tr], [files[i] for i in te]
  else:
    names, values = read_attributes(cfg)
    if key['attribute'] not in names:
      raise ValueError(f'Unknown CelebA attribute {key["attribute"]!r}; '
                       f'{os.path.join(cfg.data_dir, ATTR_FILE)} has: {", ".join(names)}.')
    column = names.index(key['attribute'])
    partition = read_partition(cfg)
    train_files = sorted(f for f, p in partition.items() if p == 0)
    test_files = sorted(f for f, p in partition.items() if p == 2)
    for f in train_files + test_files:
      if f not in values:
        raise ValueError(f'{os.path.join(cfg.data_dir, PARTITION_FILE)} lists {f!r}, which '
                         f'{os.path.join(cfg.data_dir, ATTR_FILE)} has no attributes for.')
    tr_labels = np.asarray([values[f][column] > 0 for f in train_files], np.int32)
    te_labels = np.asarray([values[f][column] > 0 for f in test_files], np.int32)
    class_names = [f'not_{key["attribute"]}', key['attribute']]
  train_files, tr_labels = _limit(train_files, train_limit), _limit(tr_labels, train_limit)
  test_files, te_labels = _limit(test_files, test_limit), _limit(te_labels, test_limit)

  image_dir = os.path.join(cfg.data_dir, IMAGE_DIR)
  if not os.path.isdir(image_dir):
    raise _common.missing(cfg, f'no image folder {image_dir!r} (unzip img_align_celeba.zip there)')
  paths = [os.path.join(image_dir, f) for f in list(train_files) + list(test_files)]
  for path in paths:
    if not os.path.isfile(path):
      raise _common.missing(cfg, f'no image {path!r}, which the annotation files list')
  logging.info('Decoding %d CelebA images from %s (cached afterwards)', len(paths), image_dir)
  decoded = images_lib.decode_files(paths, key['image_size'], key['crop'])
  n = len(train_files)
  return _pack(decoded[:n], tr_labels, decoded[n:], te_labels, class_names)


# --------------------------------------------------------------------------------- CelebA tfds


def load_celeba_tfds(cfg, open_split: Callable[[str], Sequence]) -> Loaded:
  """CelebA from a prepared tfds ``celeb_a``; ``open_split(split)`` returns its data source."""
  key = dict(_celeba_options(cfg), source='tfds')
  key['data_dir'] = os.path.abspath(cfg.data_dir) if cfg.data_dir else ''
  splits = ('train', 'validation', 'test') if key['task'] == 'identity' else ('train', 'test')
  sources = {split: open_split(split) for split in splits}
  key['sizes'] = {split: len(source) for split, source in sources.items()}
  folder = _common.option(cfg, 'cache_dir') or cfg.data_dir
  path = _cache_path(cfg, key) if folder else None
  return _unpack(cache_lib.cached(path, key, lambda: _build_celeba_tfds(cfg, key, sources), _REQUIRED))


def _build_celeba_tfds(cfg, key: dict, sources: dict) -> dict:
  size, crop = key['image_size'], key['crop']
  train_limit, test_limit = key['limits']
  where = f'tfds celeb_a in {cfg.data_dir!r}'
  if key['task'] == 'attribute':
    out = []
    for split, limit in (('train', train_limit), ('test', test_limit)):
      source = sources[split]
      n = min(limit, len(source)) if limit else len(source)
      images, labels = np.empty((n, size, size, 3), np.uint8), np.empty((n,), np.int32)
      for i in range(n):
        record = source[i]
        attributes = record['attributes']
        if key['attribute'] not in attributes:
          raise ValueError(f'Unknown CelebA attribute {key["attribute"]!r}; {where} has: '
                           f'{", ".join(sorted(attributes))}.')
        images[i] = images_lib.fit_array(record['image'], size, crop)
        labels[i] = bool(attributes[key['attribute']])
      out += [images, labels]
    return _pack(*out, [f'not_{key["attribute"]}', key['attribute']])

  first = sources['train'][0] if len(sources['train']) else {}
  if 'identity' not in first:
    raise ValueError(f'{where} has no identity labels (tfds added them in celeb_a 2.1.0). Use '
                     f'dataset.celeba_task="attribute", or the official release with '
                     f'dataset.source="celeba".')
  keys, identity, images = [], [], []
  for split, source in sources.items():
    for i in range(len(source)):
      record = source[i]
      ident = record['identity']
      keys.append(f'{split}/{i:06d}')
      identity.append(int(ident['Identity_No'] if isinstance(ident, dict) else ident))
      images.append(images_lib.fit_array(record['image'], size, crop))
  tr, tr_labels, te, te_labels, class_names = select_identities(
      keys, np.asarray(identity, np.int64), key['num_identities'], key['test_fraction'],
      key['split_seed'], where)
  tr, tr_labels = _limit(tr, train_limit), _limit(tr_labels, train_limit)
  te, te_labels = _limit(te, test_limit), _limit(te_labels, test_limit)
  images = np.stack(images)
  return _pack(images[tr], tr_labels, images[te], te_labels, class_names)


# ----------------------------------------------------------------------------------- FaceScrub


def list_identity_folders(cfg) -> list[str]:
  """The sorted identity folder names of a folder-per-identity tree."""
  if not os.path.isdir(cfg.data_dir):
    raise _common.missing(cfg, f'no directory {cfg.data_dir!r}')
  names = sorted(e.name for e in os.scandir(cfg.data_dir) if e.is_dir() and not e.name.startswith('.'))
  if not names:
    raise _common.missing(cfg, f'{cfg.data_dir!r} has no identity folders; expected '
                               f'{os.path.join(cfg.data_dir, "<identity>", "<image>.jpg")}')
  return names


def _list_images(cfg, identities: list[str]) -> list[list[str]]:
  out = []
  for identity in identities:
    folder = os.path.join(cfg.data_dir, identity)
    files = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith('.')
                   and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f'Identity folder {folder!r} has no images (expected files ending in '
                       f'{", ".join(IMAGE_EXTENSIONS)}); remove it or add its images.')
    out.append(files)
  return out


def load_folder(cfg) -> Loaded:
  """FaceScrub-style folder-per-identity tree (see the module docstring)."""
  identities = list_identity_folders(cfg)
  files = _list_images(cfg, identities)
  listing = hashlib.sha256('\n'.join(f'{i}/{f}' for i, fs in zip(identities, files)
                                     for f in fs).encode()).hexdigest()
  key = dict(name=cfg.name, source='folder', image_size=image_size(cfg), limits=_limits(cfg),
             test_fraction=float(_common.option(cfg, 'test_fraction')),
             split_seed=int(_common.option(cfg, 'split_seed')), listing=listing)
  return _unpack(cache_lib.cached(_cache_path(cfg, key), key,
                                  lambda: _build_folder(cfg, key, identities, files), _REQUIRED))


def _build_folder(cfg, key: dict, identities: list[str], files: list[list[str]]) -> dict:
  rel = [os.path.join(identity, f) for identity, fs in zip(identities, files) for f in fs]
  labels = np.asarray([c for c, fs in enumerate(files) for _ in fs], np.int32)
  test = _common.per_group_test_mask(rel, labels, key['test_fraction'], key['split_seed'])
  train_limit, test_limit = key['limits']
  tr = _limit(np.flatnonzero(~test), train_limit)
  te = _limit(np.flatnonzero(test), test_limit)
  paths = [os.path.join(cfg.data_dir, rel[i]) for i in np.concatenate([tr, te])]
  logging.info('Decoding %d images of %d identities from %s (cached afterwards)', len(paths),
               len(identities), cfg.data_dir)
  decoded = images_lib.decode_files(paths, key['image_size'], 0)
  return _pack(decoded[:len(tr)], labels[tr], decoded[len(tr):], labels[te], identities)
