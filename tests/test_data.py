"""Tests of securenet_jax.data: the IDX reader, CIFAR pickles, CelebA and FaceScrub layouts (built in
tmp_path), the decoded-image cache, validation, missing data, batch iteration, augmentation and
prefetching. The tfds routes run against stand-ins for tfds.data_source (no TensorFlow needed)."""

import functools
import pickle
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image

from securenet_jax import data
from securenet_jax.data import augment
from securenet_jax.data import idx
from securenet_jax.data import images as images_lib
from securenet_jax.data import prefetch
from tests.conftest import write_idx


def cfg(data_dir, **kw):
  c = ml_collections.ConfigDict(dict(name='fashion_mnist', source='idx', data_dir=data_dir,
                                     train_limit=0, test_limit=0))
  c.update(kw)
  return c


def test_load_generated_idx(idx_dir):
  ds = data.load(cfg(idx_dir))
  assert ds.train_images.shape == (2048, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_labels.shape == (512,) and ds.test_labels.dtype == np.int32
  assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
  ds = data.load(cfg(idx_dir, train_limit=100, test_limit=10))
  assert len(ds.train_images) == 100 and len(ds.test_labels) == 10


def test_read_idx_errors(tmp_path):
  bad = tmp_path / 'bad'
  bad.write_bytes(b'\x01\x02\x08\x01' + (3).to_bytes(4, 'big') + b'abc')
  with pytest.raises(ValueError, match='magic'):
    idx.read_idx(str(bad))
  write_idx(str(tmp_path / 'trunc'), np.zeros((4, 5), np.uint8), compress=False)
  (tmp_path / 'trunc').write_bytes((tmp_path / 'trunc').read_bytes()[:-3])
  with pytest.raises(ValueError, match='header'):
    idx.read_idx(str(tmp_path / 'trunc'))
  with pytest.raises(FileNotFoundError):
    idx.read_idx(str(tmp_path / 'nothing'))


def test_label_range_and_count_validated(tmp_path):
  images = np.zeros((8, 28, 28), np.uint8)
  for split in ('train', 't10k'):
    write_idx(str(tmp_path / f'{split}-images-idx3-ubyte'), images)
    write_idx(str(tmp_path / f'{split}-labels-idx1-ubyte'), np.full(8, 12, np.uint8))
  with pytest.raises(ValueError, match=r'labels must be in \[0, 10\)'):
    data.load(cfg(str(tmp_path)))
  write_idx(str(tmp_path / 'train-labels-idx1-ubyte'), np.zeros(7, np.uint8))
  with pytest.raises(ValueError, match='8 images but labels'):
    data.load(cfg(str(tmp_path)))


def test_wrong_image_shape_rejected(tmp_path):
  for split in ('train', 't10k'):
    write_idx(str(tmp_path / f'{split}-images-idx3-ubyte'), np.zeros((4, 32, 32), np.uint8))
    write_idx(str(tmp_path / f'{split}-labels-idx1-ubyte'), np.zeros(4, np.uint8))
  with pytest.raises(ValueError, match=r'expected images of shape \(28, 28, 1\)'):
    data.load(cfg(str(tmp_path)))


def test_missing_data_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DataMissingError) as e:
    data.load(cfg(str(tmp_path / 'nowhere')))
  assert 'apt-get install dataset-fashion-mnist' in str(e.value) and 'tfds' in str(e.value)
  with pytest.raises(data.DataMissingError, match='no IDX file'):
    data.load(cfg(str(tmp_path)))
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.load(cfg(str(tmp_path), name='imagenet'))


def test_train_batches_deterministic_and_resumable():
  images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
  labels = np.arange(100, dtype=np.int32)
  it = data.train_batches(images, labels, 16, seed=3, start_step=0)
  first = [next(it)[1] for _ in range(14)]  # 6 steps per epoch: crosses two epoch boundaries
  resumed = data.train_batches(images, labels, 16, seed=3, start_step=8)
  for k in range(8, 14):
    np.testing.assert_array_equal(next(resumed)[1], first[k])
  epoch0 = np.concatenate(first[:6])
  assert len(set(epoch0)) == 96  # no example twice within an epoch
  assert not np.array_equal(first[0], first[6])  # reshuffled each epoch


def test_train_batches_hosts_partition_the_global_batch():
  images = np.zeros((64, 1, 1, 1), np.uint8)
  labels = np.arange(64, dtype=np.int32)
  full = next(data.train_batches(images, labels, 16, 0, 0))[1]
  parts = [next(data.train_batches(images, labels, 16, 0, 0, p, 4))[1] for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(ValueError, match='divisible'):
    next(data.train_batches(images, labels, 10, 0, 0, 0, 4))


def test_real_fashion_mnist_files(fashion_mnist_dir):
  ds = data.load(cfg(fashion_mnist_dir))
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.test_labels).tolist() == [1000] * 10


def test_tfds_route_reads_prepared_data_source(monkeypatch, tmp_path):
  """The tfds route, against a stand-in for tfds.data_source (tests must not need TensorFlow)."""
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  calls = []

  def data_source(name, *, split, data_dir, download):
    calls.append((name, split, data_dir, download))
    if data_dir != str(tmp_path):
      raise FileNotFoundError(f'{name} not prepared in {data_dir}')
    n = 6 if split == 'train' else 4
    return [{'image': np.full((28, 28, 1), i, np.uint8), 'label': i % 10} for i in range(n)]

  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', types.SimpleNamespace(data_source=data_source))
  ds = data.load(cfg(str(tmp_path), name='mnist', source='tfds'))
  assert ds.train_images.shape == (6, 28, 28, 1) and ds.test_labels.tolist() == [0, 1, 2, 3]
  assert calls[0] == ('mnist', 'train', str(tmp_path), False)  # never downloads
  with pytest.raises(data.DataMissingError, match='tfds could not open mnist/train'):
    data.load(cfg(str(tmp_path / 'empty'), name='mnist', source='tfds'))


# ------------------------------------------------------------------------------------------------
# On-disk formats built in tmp_path: CIFAR python pickles, the official CelebA layout, a FaceScrub
# folder tree. Images are generated with numpy + Pillow.

ATTRIBUTES = (
    '5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose '
    'Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee '
    'Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard '
    'Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair '
    'Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young'
).split()
COLORS = np.asarray([(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220),
                     (220, 30, 220)], np.uint8)
# CelebA identity -> number of images: ranks 7, 3 (ties with 9: smaller id first), 9, 2, 1, 5.
CELEBA_COUNTS = {7: 6, 3: 5, 9: 5, 2: 4, 1: 3, 5: 1}
CELEBA_COLOR = {ident: COLORS[i] for i, ident in enumerate(CELEBA_COUNTS)}


def face_image(width: int, height: int, color, unique: int) -> Image.Image:
  """A face stand-in: a solid ``color`` with a unique gray top-left quarter (no two images equal)."""
  a = np.empty((height, width, 3), np.uint8)
  a[:] = color
  a[:height // 2, :width // 2] = 40 + 7 * unique
  return Image.fromarray(a)


def closest_color(image: np.ndarray) -> int:
  """Index into COLORS of an output image's color (bottom-right corner: away from the gray patch)."""
  corner = image[-3:, -3:].reshape(-1, 3).mean(0)
  return int(np.argmin(np.abs(COLORS.astype(float) - corner).sum(1)))


def make_celeba(root) -> dict:
  """The official CelebA layout with 24 aligned 178x218 images; returns the ground truth."""
  (root / 'img_align_celeba').mkdir(parents=True)
  idents = np.random.default_rng(0).permutation([i for i, n in CELEBA_COUNTS.items() for _ in range(n)])
  files = [f'{i:06d}.jpg' for i in range(1, len(idents) + 1)]
  smiling = {f: 1 if i % 2 == 0 else -1 for i, f in enumerate(files)}
  partition = {f: 0 if i < 16 else (1 if i < 20 else 2) for i, f in enumerate(files)}
  rng = np.random.default_rng(1)
  for i, (f, ident) in enumerate(zip(files, idents)):
    face_image(178, 218, CELEBA_COLOR[ident], i).save(root / 'img_align_celeba' / f, quality=95)
  (root / 'identity_CelebA.txt').write_text(''.join(f'{f} {d}\n' for f, d in zip(files, idents)))
  rows = []
  for f in files:
    values = rng.choice([-1, 1], len(ATTRIBUTES))
    values[ATTRIBUTES.index('Smiling')] = smiling[f]
    rows.append(f + ' ' + ' '.join(f'{v:2d}' for v in values))  # the release pads with spaces
  (root / 'list_attr_celeba.txt').write_text(f'{len(files)}\n' + ' '.join(ATTRIBUTES) + '\n' +
                                             '\n'.join(rows) + '\n')
  (root / 'list_eval_partition.txt').write_text(''.join(f'{f} {p}\n' for f, p in partition.items()))
  return dict(files=files, identity=dict(zip(files, idents)), smiling=smiling, partition=partition)


FACESCRUB = {'Alice_Adams': 7, 'Bob_Brown': 5, 'Carol_Clark': 4}


def make_facescrub(root) -> None:
  """A folder per identity, mixed formats and sizes, plus files that must be ignored."""
  unique = 0
  for c, (name, n) in enumerate(FACESCRUB.items()):
    (root / name).mkdir(parents=True)
    for j in range(n):
      ext = ('.jpg', '.png', '.JPG')[c]
      face_image(40 + 6 * j, 48 - 3 * j, COLORS[c], unique).save(root / name / f'{name}_{j}{ext}')
      unique += 1
  (root / 'Alice_Adams' / 'notes.txt').write_text('not an image')
  (root / 'Alice_Adams' / '.DS_Store').write_bytes(b'\0\1')
  (root / '.hidden').mkdir()


def write_cifar(root, name: str, sizes=(4, 4, 4, 4, 4, 6)) -> None:
  """The python release: pickled dicts with bytes keys; R = 10 + label, G = 100, B = index."""
  folder = root / ('cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python')
  folder.mkdir(parents=True)
  files = ([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'] if name == 'cifar10'
           else ['train', 'test'])
  if name == 'cifar100':
    sizes = (sum(sizes[:-1]), sizes[-1])
  for file, n in zip(files, sizes):
    labels = np.arange(n) % (10 if name == 'cifar10' else 100)
    planes = np.zeros((n, 3, 32, 32), np.uint8)
    planes[:, 0] = (10 + labels % 100)[:, None, None]
    planes[:, 1] = 100
    planes[:, 2] = np.arange(n)[:, None, None]
    batch = {b'data': planes.reshape(n, 3072), b'batch_label': file.encode()}
    if name == 'cifar10':
      batch[b'labels'] = labels.tolist()
    else:
      batch[b'fine_labels'] = labels.tolist()
      batch[b'coarse_labels'] = (labels // 5).tolist()
    with open(folder / file, 'wb') as f:
      pickle.dump(batch, f, protocol=2)
  meta = ({b'label_names': [f'class{i}'.encode() for i in range(10)]} if name == 'cifar10' else
          {b'fine_label_names': [f'f{i}'.encode() for i in range(100)],
           b'coarse_label_names': [f'c{i}'.encode() for i in range(20)]})
  with open(folder / ('batches.meta' if name == 'cifar10' else 'meta'), 'wb') as f:
    pickle.dump(meta, f, protocol=2)


def face_cfg(name, data_dir, **kw):
  kw = dict(dict(image_size=16, cache=False), **kw)
  return cfg(str(data_dir), name=name, source={'celeba': 'celeba', 'facescrub': 'folder'}[name], **kw)


@pytest.fixture(scope='module')
def celeba_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('celeba')
  return root, make_celeba(root)


@pytest.fixture(scope='module')
def facescrub_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('facescrub')
  make_facescrub(root)
  return root


def assert_disjoint(ds):
  train = {im.tobytes() for im in ds.train_images}
  assert not any(im.tobytes() in train for im in ds.test_images)


# ---------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_python_release(tmp_path, name):
  write_cifar(tmp_path, name)
  ds = data.load(cfg(str(tmp_path), name=name, source='cifar_python'))
  assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (6, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.num_classes == (10 if name == 'cifar10' else 100) and ds.image_shape == (32, 32, 3)
  # channel planes -> HWC: R = 10 + label, G = 100, B = index within the file
  np.testing.assert_array_equal(ds.train_images[:, 5, 7, 0], 10 + ds.train_labels)
  assert (ds.train_images[..., 1] == 100).all()
  assert (ds.test_images[..., 2] == np.arange(6)[:, None, None]).all()
  assert ds.class_names[1] == ('class1' if name == 'cifar10' else 'f1')
  folder = tmp_path / ('cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python')
  again = data.load(cfg(str(folder), name=name, source='cifar_python'))  # the release folder itself
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  assert data.spec(cfg(str(tmp_path), name=name, source='cifar_python')) == data.Spec(
      ds.num_classes, (32, 32, 3))


def test_cifar100_coarse_labels(tmp_path):
  write_cifar(tmp_path, 'cifar100')
  c = cfg(str(tmp_path), name='cifar100', source='cifar_python', label_mode='coarse')
  ds = data.load(c)
  assert ds.num_classes == 20 and data.spec(c).num_classes == 20
  np.testing.assert_array_equal(ds.train_labels, np.arange(20) // 5)
  assert ds.class_names[3] == 'c3'
  with pytest.raises(ValueError, match='label_mode'):
    data.load(cfg(str(tmp_path), name='cifar100', source='cifar_python', label_mode='medium'))


def test_cifar_errors(tmp_path):
  with pytest.raises(data.DataMissingError, match='cifar-10-python.tar.gz') as e:
    data.load(cfg(str(tmp_path / 'nowhere'), name='cifar10', source='cifar_python'))
  assert 'nowhere' in str(e.value) and 'tfds build cifar10' in str(e.value)
  write_cifar(tmp_path, 'cifar10')
  (tmp_path / 'cifar-10-batches-py' / 'data_batch_3').unlink()
  with pytest.raises(data.DataMissingError, match='data_batch_3'):
    data.load(cfg(str(tmp_path), name='cifar10', source='cifar_python'))

  class Evil:
    def __reduce__(self):
      return (print, ('pwned',))

  with open(tmp_path / 'cifar-10-batches-py' / 'data_batch_3', 'wb') as f:
    pickle.dump({b'data': Evil()}, f, protocol=2)
  with pytest.raises(ValueError, match=r'data_batch_3.*not a CIFAR python pickle.*refusing to load .*print'):
    data.load(cfg(str(tmp_path), name='cifar10', source='cifar_python'))
  with pytest.raises(ValueError, match="Unknown dataset source 'idx' for 'cifar10'"):
    data.load(cfg(str(tmp_path), name='cifar10', source='idx'))


# --------------------------------------------------------------------------------------- CelebA


def test_celeba_identity_task(celeba_dir):
  root, truth = celeba_dir
  c = face_cfg('celeba', root, num_identities=3)
  ds = data.load(c)
  assert ds.num_classes == 3 and ds.image_shape == (16, 16, 3)
  assert data.spec(c) == data.Spec(3, (16, 16, 3))
  assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
  assert ds.class_names == ('7', '3', '9')  # most frequent first; 3 and 9 tie: smaller id first
  # Each identity keeps round(10%) (at least 1) of its images for test: 6 -> 5 + 1, 5 -> 4 + 1.
  assert np.bincount(ds.train_labels).tolist() == [5, 4, 4]
  assert np.bincount(ds.test_labels).tolist() == [1, 1, 1]
  color_of_label = [list(CELEBA_COUNTS).index(i) for i in (7, 3, 9)]
  for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
    assert [closest_color(im) for im in images] == [color_of_label[l] for l in labels]
  assert_disjoint(ds)
  again = data.load(c)  # deterministic
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    np.testing.assert_array_equal(getattr(again, field), getattr(ds, field))
  other_seed = data.load(face_cfg('celeba', root, num_identities=3, split_seed=1))
  assert not np.array_equal(other_seed.test_images, ds.test_images)
  with pytest.raises(ValueError, match=r'has only 6 identities; dataset.num_identities=7'):
    data.load(face_cfg('celeba', root, num_identities=7))


def test_celeba_attribute_task(celeba_dir):
  root, truth = celeba_dir
  ds = data.load(face_cfg('celeba', root, celeba_task='attribute'))
  train_files = [f for f in truth['files'] if truth['partition'][f] == 0]
  test_files = [f for f in truth['files'] if truth['partition'][f] == 2]
  assert ds.num_classes == 2 and ds.class_names == ('not_Smiling', 'Smiling')
  assert ds.train_images.shape == (16, 16, 16, 3) and ds.test_images.shape == (4, 16, 16, 3)
  assert ds.train_labels.tolist() == [int(truth['smiling'][f] > 0) for f in train_files]
  assert ds.test_labels.tolist() == [int(truth['smiling'][f] > 0) for f in test_files]
  assert [closest_color(im) for im in ds.train_images] == [
      list(CELEBA_COUNTS).index(truth['identity'][f]) for f in train_files]
  assert_disjoint(ds)
  male = data.load(face_cfg('celeba', root, celeba_task='attribute', attribute='Male'))
  assert male.class_names == ('not_Male', 'Male')
  with pytest.raises(ValueError, match="Unknown CelebA attribute 'Smiles'.*Smiling"):
    data.load(face_cfg('celeba', root, celeba_task='attribute', attribute='Smiles'))
  with pytest.raises(ValueError, match='celeba_task'):
    data.load(face_cfg('celeba', root, celeba_task='landmarks'))


def test_celeba_limits_decode_only_what_is_kept(celeba_dir, monkeypatch):
  root, _ = celeba_dir
  decoded = []
  real = images_lib.decode_files
  monkeypatch.setattr(images_lib, 'decode_files', lambda paths, *a: decoded.append(len(paths)) or
                      real(paths, *a))
  ds = data.load(face_cfg('celeba', root, celeba_task='attribute', train_limit=5, test_limit=2))
  assert len(ds.train_images) == 5 and len(ds.test_images) == 2 and decoded == [7]


def test_celeba_missing_and_malformed_files(tmp_path):
  with pytest.raises(data.DataMissingError, match='nowhere') as e:
    data.load(face_cfg('celeba', tmp_path / 'nowhere'))
  assert 'img_align_celeba' in str(e.value) and 'identity_CelebA.txt' in str(e.value)
  make_celeba(tmp_path)
  ident = (tmp_path / 'identity_CelebA.txt').read_text()
  (tmp_path / 'identity_CelebA.txt').unlink()
  with pytest.raises(data.DataMissingError, match=r'no annotation file .*identity_CelebA\.txt'):
    data.load(face_cfg('celeba', tmp_path, num_identities=3))
  lines = ident.splitlines()
  lines[2] = '000003.jpg seven'
  (tmp_path / 'identity_CelebA.txt').write_text('\n'.join(lines))
  with pytest.raises(ValueError, match=r'identity_CelebA\.txt:3: malformed line .*000003\.jpg seven'):
    data.load(face_cfg('celeba', tmp_path, num_identities=3))
  (tmp_path / 'identity_CelebA.txt').write_text(ident)

  attr = (tmp_path / 'list_attr_celeba.txt').read_text().splitlines()
  bad = attr.copy()
  bad[4] = bad[4].replace('-1', ' 2', 1) if '-1' in bad[4] else bad[4].replace(' 1', ' 2', 1)
  (tmp_path / 'list_attr_celeba.txt').write_text('\n'.join(bad))
  with pytest.raises(ValueError, match=r'list_attr_celeba\.txt:5: malformed line.*-1 or 1'):
    data.load(face_cfg('celeba', tmp_path, celeba_task='attribute'))
  (tmp_path / 'list_attr_celeba.txt').write_text('\n'.join(attr[:-1]))
  with pytest.raises(ValueError, match='says 24 images, but 23'):
    data.load(face_cfg('celeba', tmp_path, celeba_task='attribute'))
  (tmp_path / 'list_attr_celeba.txt').write_text('\n'.join(attr))
  (tmp_path / 'list_eval_partition.txt').write_text('000001.jpg 0\n000002.jpg 4\n')
  with pytest.raises(ValueError, match=r'list_eval_partition\.txt:2: malformed.*0, 1 or 2'):
    data.load(face_cfg('celeba', tmp_path, celeba_task='attribute'))
  (tmp_path / 'list_eval_partition.txt').unlink()
  with pytest.raises(data.DataMissingError, match=r'list_eval_partition\.txt'):
    data.load(face_cfg('celeba', tmp_path, celeba_task='attribute'))

  (tmp_path / 'img_align_celeba' / '000004.jpg').unlink()
  with pytest.raises(data.DataMissingError, match=r'no image .*000004\.jpg'):
    data.load(face_cfg('celeba', tmp_path, num_identities=6))
  (tmp_path / 'img_align_celeba' / '000004.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  with pytest.raises(ValueError, match=r'Could not decode image .*000004\.jpg'):
    data.load(face_cfg('celeba', tmp_path, num_identities=6))


def fake_celeb_a(truth, root, with_identity: bool):
  """Stand-in for tfds.data_source('celeb_a', ...): records as the builder defines them."""
  splits = {'train': 0, 'validation': 1, 'test': 2}

  def data_source(name, *, split, data_dir, download):
    assert name == 'celeb_a' and not download
    out = []
    for f in truth['files']:
      if truth['partition'][f] != splits[split]:
        continue
      record = {'image': np.asarray(Image.open(root / 'img_align_celeba' / f).convert('RGB')),
                'attributes': {a: a == 'Smiling' and truth['smiling'][f] > 0 for a in ATTRIBUTES},
                'landmarks': {}}
      if with_identity:
        record['identity'] = {'Identity_No': int(truth['identity'][f])}
      out.append(record)
    return out

  import types  # pylint: disable=g-import-not-at-top
  return types.SimpleNamespace(data_source=data_source)


def test_celeba_tfds_route(celeba_dir, monkeypatch, tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  root, truth = celeba_dir
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake_celeb_a(truth, root, False))
  tf_cfg = cfg(str(tmp_path), name='celeba', source='tfds', image_size=16, celeba_task='attribute',
               cache_dir=str(tmp_path / 'cache'))
  ds = data.load(tf_cfg)
  official = data.load(face_cfg('celeba', root, celeba_task='attribute'))
  np.testing.assert_array_equal(ds.train_labels, official.train_labels)
  np.testing.assert_array_equal(ds.test_labels, official.test_labels)
  # same crop and resize as the official files (from the decoded JPEG, without the draft shortcut)
  assert np.abs(ds.train_images.astype(int) - official.train_images).mean() < 3
  with pytest.raises(ValueError, match='no identity labels'):
    data.load(cfg(str(tmp_path), name='celeba', source='tfds', image_size=16, cache=False,
                  num_identities=3))
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake_celeb_a(truth, root, True))
  ds = data.load(cfg(str(tmp_path), name='celeba', source='tfds', image_size=16, cache=False,
                     num_identities=3))
  assert ds.class_names == ('7', '3', '9') and np.bincount(ds.train_labels).tolist() == [5, 4, 4]


# ------------------------------------------------------------------------------------ FaceScrub


def test_facescrub_folder_tree(facescrub_dir):
  c = face_cfg('facescrub', facescrub_dir)
  ds = data.load(c)
  assert ds.class_names == tuple(FACESCRUB) and ds.num_classes == 3
  assert data.spec(c) == data.Spec(3, (16, 16, 3))
  assert ds.train_images.shape == (13, 16, 16, 3) and ds.test_images.shape == (3, 16, 16, 3)
  assert np.bincount(ds.train_labels).tolist() == [6, 4, 3]  # 7, 5, 4 images, one of each to test
  assert np.bincount(ds.test_labels).tolist() == [1, 1, 1]
  assert [closest_color(im) for im in ds.train_images] == ds.train_labels.tolist()
  assert [closest_color(im) for im in ds.test_images] == ds.test_labels.tolist()
  assert_disjoint(ds)
  again = data.load(c)
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  np.testing.assert_array_equal(again.test_labels, ds.test_labels)
  half = data.load(face_cfg('facescrub', facescrub_dir, test_fraction=0.5, image_size=8))
  assert np.bincount(half.test_labels).tolist() == [4, 3, 2] and half.image_shape == (8, 8, 3)
  with pytest.raises(ValueError, match=r'test_fraction must be in \(0, 1\)'):
    data.load(face_cfg('facescrub', facescrub_dir, test_fraction=1.0))


def test_facescrub_errors(tmp_path):
  with pytest.raises(data.DataMissingError, match='nowhere') as e:
    data.load(face_cfg('facescrub', tmp_path / 'nowhere'))
  assert '<identity>' in str(e.value)
  with pytest.raises(data.DataMissingError, match='no identity folders'):
    data.load(face_cfg('facescrub', tmp_path))
  make_facescrub(tmp_path)
  (tmp_path / 'Dan_Empty').mkdir()
  (tmp_path / 'Dan_Empty' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match=r"Identity folder .*Dan_Empty' has no images"):
    data.load(face_cfg('facescrub', tmp_path))
  (tmp_path / 'Dan_Empty' / 'broken.png').write_bytes(b'\x89PNG not really')
  with pytest.raises(ValueError, match=r'Could not decode image .*Dan_Empty/broken\.png'):
    data.load(face_cfg('facescrub', tmp_path))


def test_decoded_cache_hit_miss_and_corruption(facescrub_dir, tmp_path, monkeypatch):
  c = face_cfg('facescrub', facescrub_dir, cache=True, cache_dir=str(tmp_path))
  first = data.load(c)
  files = sorted(tmp_path.glob('*.npz'))
  assert len(files) == 1 and not list(tmp_path.glob('*.tmp'))

  def no_decoding(*args):
    raise AssertionError('decoded although cached')

  monkeypatch.setattr(images_lib, 'decode_files', no_decoding)
  hit = data.load(c)
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels', 'class_names'):
    np.testing.assert_array_equal(getattr(hit, field), getattr(first, field))
  with pytest.raises(AssertionError, match='decoded although cached'):  # other options: other cache
    data.load(face_cfg('facescrub', facescrub_dir, cache=True, cache_dir=str(tmp_path), image_size=8))
  monkeypatch.undo()

  files[0].write_bytes(files[0].read_bytes()[:300])  # truncated: a crash while writing, say
  rebuilt = data.load(c)
  np.testing.assert_array_equal(rebuilt.train_images, first.train_images)
  with np.load(files[0]) as z:  # rewritten whole
    np.testing.assert_array_equal(z['test_images'], first.test_images)
  files[0].write_bytes(b'garbage')
  np.testing.assert_array_equal(data.load(c).test_images, first.test_images)


def test_cache_defaults_to_data_dir(facescrub_dir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'faces'
  shutil.copytree(facescrub_dir, root)
  data.load(face_cfg('facescrub', root, cache=True))
  assert len(list(root.glob('facescrub-*.securenet-cache.npz'))) == 1
  assert data.spec(face_cfg('facescrub', root)).num_classes == 3  # the cache is not an identity


def test_unwritable_cache_folder_only_costs_the_cache(facescrub_dir, tmp_path):
  (tmp_path / 'a_file').write_text('x')
  c = face_cfg('facescrub', facescrub_dir, cache=True, cache_dir=str(tmp_path / 'a_file' / 'cache'))
  assert data.load(c).train_images.shape == (13, 16, 16, 3)


def test_tfds_cifar_routes(monkeypatch, tmp_path):
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  def data_source(name, *, split, data_dir, download):
    n = 6 if split == 'train' else 4
    return [{'image': np.full((32, 32, 3), i, np.uint8), 'label': i, 'coarse_label': i // 5, 'id': ''}
            for i in range(n)]

  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', types.SimpleNamespace(data_source=data_source))
  ds = data.load(cfg(str(tmp_path), name='cifar100', source='tfds', label_mode='coarse', test_limit=3))
  assert ds.num_classes == 20 and ds.train_labels.tolist() == [0, 0, 0, 0, 0, 1]
  assert ds.test_images.shape == (3, 32, 32, 3)


def test_real_tfds_mock_data(tmp_path):
  """With tensorflow-datasets installed: its own mock of a prepared cifar10 (no network)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=8):
    ds = data.load(cfg(str(tmp_path), name='cifar10', source='tfds'))
  assert ds.train_images.shape == (8, 32, 32, 3) and ds.num_classes == 10


def test_unknown_names_and_sources(tmp_path):
  with pytest.raises(ValueError, match="Unknown dataset source 'folder' for 'celeba'"):
    data.load(cfg(str(tmp_path), name='celeba', source='folder'))
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.spec(cfg(str(tmp_path), name='imagenet'))
  assert data.spec(cfg(str(tmp_path), name='celeba', source='', celeba_task='attribute',
                       image_size=32)) == data.Spec(2, (32, 32, 3))


# ------------------------------------------------------------------------------- augmentation


def test_crop_flip_shape_dtype_and_flips():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.random.uniform(jax.random.key(0), (32, 8, 8, 3))
  out = jax.jit(functools.partial(augment.crop_flip, pad=0))(x, jax.random.key(1))
  assert out.shape == x.shape and out.dtype == x.dtype
  same = jnp.all(out == x, axis=(1, 2, 3))
  mirrored = jnp.all(out == x[:, :, ::-1], axis=(1, 2, 3))
  assert bool(jnp.all(same | mirrored)) and bool(jnp.any(same)) and bool(jnp.any(mirrored))
  assert augment.crop_flip(x.astype(jnp.bfloat16), jax.random.key(1)).dtype == jnp.bfloat16


def test_crop_flip_crops_are_shifted_windows():
  import jax  # pylint: disable=g-import-not-at-top
  pad = 2
  x = np.arange(1, 16 * 6 * 6 + 1, dtype=np.float32).reshape(16, 6, 6, 1)  # no zeros: padding shows
  out = np.asarray(jax.jit(functools.partial(augment.crop_flip, pad=pad, flip=False))(
      x, jax.random.key(3)))
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  shifts = []
  for i in range(len(x)):
    found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
             if np.array_equal(out[i], padded[i, dy:dy + 6, dx:dx + 6])]
    assert found, f'example {i} is not a window of its padded image'
    shifts.append(found[0])
  assert len(set(shifts)) > 1 and any(s != (pad, pad) for s in shifts)
  again = np.asarray(augment.crop_flip(x, jax.random.key(3), pad=pad, flip=False))
  np.testing.assert_array_equal(again, out)  # a pure function of the key
  with pytest.raises(ValueError, match='pad'):
    augment.crop_flip(x, jax.random.key(3), pad=-1)


def test_gaussian_noise_varies_in_strength_and_stays_in_range():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  images = jnp.full((256, 28, 28, 1), 0.5)
  out = np.asarray(jax.jit(functools.partial(augment.gaussian_noise, max_std=0.2))(images, jax.random.key(0)))
  assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
  std = (out - 0.5).reshape(256, -1).std(axis=1)
  # per-image std ~ U[0, 0.2]: spread over the range, never much above it (784-pixel sample std)
  assert std.max() < 0.22 and std.min() < 0.02 and np.mean(std) == pytest.approx(0.1, abs=0.02)
  np.testing.assert_array_equal(np.asarray(augment.gaussian_noise(images, jax.random.key(0), 0.0)), images)
  assert augment.gaussian_noise(images.astype(jnp.bfloat16), jax.random.key(0), 0.1).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='std'):
    augment.gaussian_noise(images, jax.random.key(0), -0.1)


# ------------------------------------------------------------------------------------ prefetch


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == 'prefetch' and t.is_alive()]


def test_prefetch_order_and_put():
  assert list(prefetch.prefetch(range(50), 3, lambda x: x * 2)) == [2 * i for i in range(50)]
  assert list(prefetch.prefetch(iter([]), 1, None)) == []
  import jax  # pylint: disable=g-import-not-at-top
  batches = [{'image': np.full((4, 2), i)} for i in range(5)]
  out = list(prefetch.prefetch(iter(batches), 2, jax.device_put))
  assert [int(b['image'][0, 0]) for b in out] == list(range(5)) and isinstance(out[0]['image'], jax.Array)
  with pytest.raises(ValueError, match='size'):
    prefetch.prefetch(range(3), 0, None)
  assert not _prefetch_threads()


def test_prefetch_propagates_exceptions():
  def source():
    yield from range(3)
    raise RuntimeError('disk on fire')

  got = []
  with pytest.raises(RuntimeError, match='disk on fire'):
    for item in prefetch.prefetch(source(), 2, None):
      got.append(item)
  assert got == [0, 1, 2]

  def bad_put(x):
    if x == 4:
      raise ValueError('cannot place batch 4')
    return x

  it = prefetch.prefetch(range(10), 2, bad_put)
  assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
  with pytest.raises(ValueError, match='batch 4'):
    next(it)
  assert not _prefetch_threads()


def test_prefetch_early_stop_leaves_no_thread():
  closed = threading.Event()

  def endless():
    try:
      i = 0
      while True:
        yield i
        i += 1
    finally:
      closed.set()

  it = prefetch.prefetch(endless(), 2, None)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  it.close()
  assert closed.is_set() and not _prefetch_threads()

  for i in prefetch.prefetch(endless(), 4, None):  # break out of a loop; the generator is collected
    if i == 5:
      break
  del i
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  assert not _prefetch_threads()
