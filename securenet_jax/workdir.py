"""The workdir: its layout on disk, atomic writes, and the config a workdir was created with.

Every module that reads or writes a workdir goes through this one::

  WORKDIR/config.json     the run's config; a rerun must match it (``Workdir.save_or_check_config``)
  WORKDIR/model.json      format version, number of classes and image shape (what inference needs)
  WORKDIR/keys/           the key registry: registry.json + one .npz per key (never in a checkpoint)
  WORKDIR/checkpoints/    Orbax checkpoints of the licensed model
  WORKDIR/baseline/       the unlicensed baseline (same recipe, same layout) that defines clean_acc
  WORKDIR/tensorboard/    training curves
  WORKDIR/report/         metrics.json, summary.md, report.png (security: security.json, ...)

Paths go through ``etils.epath`` (what Orbax and tfds use), so a workdir may live on a local disk or
on a remote store such as ``gs://bucket/run``; local paths are made absolute, remote ones are kept as
they are.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import uuid
from typing import Any, Callable

import ml_collections
from etils import epath

from securenet_jax import errors

FORMAT = 'securenet-jax-workdir'
VERSION = 2

# Config fields that may change between a run and its resumption without changing what is trained.
RESUMABLE_FIELDS = ('eval', 'key.secret', 'train.log_every', 'train.progress_every_s',
                    'train.checkpoint_every', 'train.prefetch', 'train.resident_max_mb',
                    'train.keep_checkpoints', 'train.stop_check_every', 'dataset.cache',
                    'dataset.cache_dir')


def is_remote(path) -> bool:
  """True for paths with a URI scheme (``gs://``, ``s3://``, ...)."""
  return '://' in os.fspath(path)


def as_path(path) -> epath.Path:
  """An ``epath.Path``: local paths absolute, remote ones unchanged (no ``./gs:/...`` mangling)."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


def atomic_write(path, data: bytes | str) -> None:
  """Writes ``data`` to ``path`` so that a reader sees the old file or the new one, never a part.

  Local files are written to a temporary file in the same directory, flushed to disk and renamed over
  the target. Remote objects are written under a temporary name and renamed (object stores publish
  an object only once it is complete).
  """
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  binary = isinstance(data, bytes)
  if not is_remote(path):
    fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix='.tmp-', suffix=path.name)
    try:
      with os.fdopen(fd, 'wb' if binary else 'w') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, os.fspath(path))
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    return
  tmp = path.parent / f'.tmp-{uuid.uuid4().hex}-{path.name}'
  if binary:
    tmp.write_bytes(data)
  else:
    tmp.write_text(data)
  tmp.rename(path)


def atomic_write_with(path, write_fn: Callable[[io.BytesIO], Any]) -> None:
  """``atomic_write`` of whatever ``write_fn`` writes into a binary buffer (e.g. ``np.savez``)."""
  buffer = io.BytesIO()
  write_fn(buffer)
  atomic_write(path, buffer.getvalue())


def write_json(path, obj: Any, indent: int | None = 1) -> None:
  atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True, default=float) + '\n')


def read_json(path, what: str) -> Any:
  """Reads a JSON file; a missing or malformed file is a :class:`errors.WorkdirError` naming ``what``."""
  path = as_path(path)
  if not path.exists():
    raise errors.WorkdirError(f'No {what} at {path}.')
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.WorkdirError(f'{what.capitalize()} {path} is not valid JSON ({e}).',
                              hint=f'Restore {path.name} from a backup, or start over in a new --workdir.'
                              ) from e


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _relevant(config_dict: dict) -> dict:
  return {k: v for k, v in _flatten(config_dict).items()
          if not any(k == f or k.startswith(f + '.') for f in RESUMABLE_FIELDS)}


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The files of one workdir (see the module docstring). ``Workdir(path)`` touches nothing on disk."""
  root: epath.Path

  def __init__(self, root):
    object.__setattr__(self, 'root', as_path(root))

  def __str__(self) -> str:
    return os.fspath(self.root)

  # --- layout ----------------------------------------------------------------------------------
  @property
  def config_path(self) -> epath.Path:
    return self.root / 'config.json'

  @property
  def model_path(self) -> epath.Path:
    return self.root / 'model.json'

  @property
  def keys_dir(self) -> epath.Path:
    return self.root / 'keys'

  @property
  def checkpoints_dir(self) -> epath.Path:
    return self.root / 'checkpoints'

  @property
  def tensorboard_dir(self) -> epath.Path:
    return self.root / 'tensorboard'

  @property
  def report_dir(self) -> epath.Path:
    return self.root / 'report'

  @property
  def baseline(self) -> 'Workdir':
    """The unlicensed baseline's own (sub-)workdir."""
    return Workdir(self.root / 'baseline')

  def sub(self, name: str) -> 'Workdir':
    """A workdir inside this one (e.g. a security report's side trainings)."""
    return Workdir(self.root / name)

  def same_as(self, other) -> bool:
    return os.fspath(self.root) == os.fspath(as_path(other))

  # --- config ----------------------------------------------------------------------------------
  def load_config(self) -> ml_collections.ConfigDict:
    """The config the workdir was created with."""
    if not self.config_path.exists():
      raise errors.WorkdirError(f'{self} is not a SecureNet-JAX workdir (no config.json).',
                                hint='Point at a directory written by a training run.')
    return ml_collections.ConfigDict(read_json(self.config_path, 'config file'))

  def save_or_check_config(self, config: ml_collections.ConfigDict, write: bool = True) -> None:
    """Writes config.json on the first run (when ``write``); on a rerun, refuses a config that would
    train something else into the same checkpoints (fields of ``RESUMABLE_FIELDS`` may differ)."""
    current = json.loads(config.to_json_best_effort())
    if self.config_path.exists():
      saved = read_json(self.config_path, 'config file')
      a, b = _relevant(saved), _relevant(current)
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      if diff:
        shown = ', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in diff[:4])
        more = f' (and {len(diff) - 4} more)' if len(diff) > 4 else ''
        raise errors.WorkdirError(
            f'{self} holds a run of another config ({shown}{more}).',
            hint=f'Use a new --workdir, or rerun with the settings saved in {self.config_path}.')
    elif write:
      write_json(self.config_path, current)

  # --- model info ------------------------------------------------------------------------------
  def write_model_info(self, num_classes: int, image_shape) -> None:
    """model.json: the format version, and what inference needs besides the config (the number of
    classes and the image shape can depend on the data, e.g. CelebA's number of identities)."""
    write_json(self.model_path, {'format': FORMAT, 'version': VERSION, 'num_classes': int(num_classes),
                                 'image_shape': [int(d) for d in image_shape]})

  def model_info(self) -> tuple[int, tuple[int, int, int]]:
    """(num_classes, image_shape) from model.json; other formats are refused."""
    if not self.model_path.exists():
      raise errors.WorkdirError(f'{self} has no model.json: no training has started here.',
                                hint='Train first, or point at a trained workdir.')
    info = read_json(self.model_path, 'model info')
    if not isinstance(info, dict) or info.get('format') != FORMAT or info.get('version') != VERSION:
      found = (info.get('format'), info.get('version')) if isinstance(info, dict) else info
      raise errors.WorkdirError(
          f'{self} was written by another version of SecureNet-JAX (model.json format {found}, '
          f'expected {(FORMAT, VERSION)}).', hint='Retrain in a new --workdir with this version.')
    return int(info['num_classes']), tuple(int(d) for d in info['image_shape'])
