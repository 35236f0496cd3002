"""The key registry of a workdir: which keys are active, which are revoked, and what each grants.

``WORKDIR/keys/registry.json`` lists the keys; each key lives in its own ``.npz`` beside it
(:func:`keys.load`). Every write is atomic, and the registry is validated on load: each listed file
must exist and match its recorded fingerprint.
"""

from __future__ import annotations

import json
import os

from securenet_jax import errors
from securenet_jax import keys as keys_lib
from securenet_jax import workdir as workdir_lib

_FORMAT = 'securenet-jax-key-registry'
_VERSION = 1


class KeyRegistry:
  """The keys of a workdir: ``DIR/registry.json`` plus one ``.npz`` file per key."""

  FILENAME = 'registry.json'

  def __init__(self, directory: str | os.PathLike):
    self.directory = workdir_lib.as_path(directory)
    self._entries: dict[str, dict] = {}
    self._keys: dict[str, keys_lib.LicenseKey] = {}

  @property
  def path(self):
    return self.directory / self.FILENAME

  @classmethod
  def exists(cls, directory) -> bool:
    return (workdir_lib.as_path(directory) / cls.FILENAME).is_file()

  @classmethod
  def load(cls, directory) -> 'KeyRegistry':
    """Reads and validates a registry.

    Raises:
      errors.KeyFileError: no registry, a corrupt one, or a key file that does not match its entry.
    """
    reg = cls(directory)
    if not reg.path.is_file():
      raise errors.KeyFileError(f'No key registry at {reg.path}.')
    try:
      data = json.loads(reg.path.read_text())
      if data.get('format') != _FORMAT or data.get('version') != _VERSION:
        raise ValueError(f'unexpected format/version {data.get("format")!r}/{data.get("version")!r}')
      entries = data['keys']
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise errors.KeyFileError(f'Key registry {reg.path} is corrupt or not a registry: {e}') from e
    for entry in entries:
      if not isinstance(entry, dict) or entry.get('status') not in ('active', 'revoked'):
        raise errors.KeyFileError(f'Key registry {reg.path}: entry {entry!r} has no valid status.')
      key = keys_lib.load(reg.directory / entry['file'])
      if key.name != entry['name'] or key.fingerprint != entry['fingerprint']:
        raise errors.KeyFileError(f'Key registry {reg.path}: file {entry["file"]!r} does not match '
                                  f'its entry.')
      reg._entries[key.name] = entry
      reg._keys[key.name] = key
    return reg

  def _save(self) -> None:
    workdir_lib.write_json(self.path, {'format': _FORMAT, 'version': _VERSION,
                                       'keys': list(self._entries.values())})

  def add(self, key: keys_lib.LicenseKey, revoked: bool = False) -> None:
    """Adds a key, active unless ``revoked`` (key file first, then the registry, so a crash leaves
    no dangling entry)."""
    if key.name in self._entries:
      raise ValueError(f'Key {key.name!r} is already in the registry at {self.directory}.')
    filename = f'{key.name}.npz'
    key.save(self.directory / filename)
    self._entries[key.name] = {'name': key.name, 'file': filename,
                               'status': 'revoked' if revoked else 'active',
                               'scheme': key.scheme, 'fingerprint': key.fingerprint,
                               'classes': None if key.classes is None else list(key.classes),
                               'tier': key.tier}
    self._keys[key.name] = key
    self._save()

  def revoke(self, name: str) -> None:
    if name not in self._entries:
      raise KeyError(f'No key named {name!r} in the registry at {self.directory}.')
    self._entries[name] = dict(self._entries[name], status='revoked')
    self._save()

  def _with_status(self, status: str) -> dict[str, keys_lib.LicenseKey]:
    return {n: self._keys[n] for n, e in self._entries.items() if e['status'] == status}

  @property
  def active(self) -> dict[str, keys_lib.LicenseKey]:
    return self._with_status('active')

  @property
  def revoked(self) -> dict[str, keys_lib.LicenseKey]:
    return self._with_status('revoked')
