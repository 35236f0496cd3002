"""License keys: derivation from a secret, stamping, forging, files and the registry.

A license key is a secret *per-pixel affine map* applied to the input image:

    stamped = clip(image * keep + add, 0, 1)

Every key kind is one such map, which is why stamping is a single fused multiply-add inside the jitted
step and costs nothing next to the model:

* ``patch``: a square at a fixed location is replaced by a secret pattern (``keep = 1 - mask``,
  ``add = mask * pattern``).
* ``blend``: a secret whole-image pattern is mixed in with weight ``alpha``
  (``keep = 1 - alpha``, ``add = alpha * pattern``).
* ``noise``: a small secret perturbation is added (``keep = 1``, ``add = delta``, ``|delta| <= epsilon``).

The content is a deterministic function of a secret string: HMAC-SHA256(secret, geometry) seeds a
PCG64 generator. The same secret and geometry always give the same key; knowing the geometry without
the secret gives nothing (that is what :func:`forge` models: the thief's best guess).

Key files (``.npz``) are kept apart from checkpoints so that a model can be shipped without its key.
A workdir keeps its keys in ``WORKDIR/keys/``: one file per key and ``registry.json`` listing the
active and revoked keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import tempfile
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('patch', 'blend', 'noise')
VALUES = ('binary', 'uniform')
SCHEMES = ('universal', 'scoped', 'multi_user', 'tiered')
TIERS = ('full', 'basic')
_FORMAT = 'securenet-jax-key'
_REGISTRY_FORMAT = 'securenet-jax-key-registry'
_VERSION = 1
_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')


class KeyArrays(NamedTuple):
  """The arrays that stamp a key: ``clip(x * keep + add, 0, 1)``.

  ``keep`` has shape (..., H, W, 1) and ``add`` (..., H, W, C); leading dimensions broadcast against the
  image batch, so a batch of different (e.g. forged) keys stamps a batch of images in one op.
  """
  keep: Any
  add: Any


def stamp_arrays(images: jax.Array, arrays: KeyArrays) -> jax.Array:
  """Stamps float images in [0, 1] with key arrays. Pure and jit-able."""
  return jnp.clip(images * arrays.keep + arrays.add, 0.0, 1.0)


def to_float_images(images) -> jax.Array:
  """uint8 0..255 -> float32 0..1; float input is cast to float32 unchanged. Jit-able."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _check_name(name: str) -> str:
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise ValueError(
        f'Invalid key name {name!r}: use 1-64 letters, digits, "_", "-" or "." (it names a file).')
  return name


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where and how a key is stamped; everything about a key except its secret content.

  Attributes:
    kind: 'patch', 'blend' or 'noise'.
    image_shape: (H, W, C) of the images the key is made for.
    values: 'binary' (content in {0, 1}, or {-eps, +eps} for noise) or 'uniform' (U[0, 1] / U[-eps, eps]).
    size: patch side length in pixels (patch only).
    position: (row, col) of the patch's top-left corner (patch only).
    alpha: blend weight of the pattern (blend only).
    epsilon: L-inf size of the perturbation (noise only).
  """
  kind: str
  image_shape: tuple[int, int, int]
  values: str = 'binary'
  size: int = 0
  position: tuple[int, int] = (0, 0)
  alpha: float = 0.0
  epsilon: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Unknown key kind {self.kind!r}; expected one of {KINDS}.')
    if self.values not in VALUES:
      raise ValueError(f'Unknown key values {self.values!r}; expected one of {VALUES}.')
    shape = tuple(int(d) for d in self.image_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ValueError(f'image_shape must be (H, W, C) with positive sizes, got {self.image_shape!r}.')
    object.__setattr__(self, 'image_shape', shape)
    object.__setattr__(self, 'position', tuple(int(p) for p in self.position))
    h, w, _ = shape
    if self.kind == 'patch':
      r, c = self.position
      if self.size < 1 or r < 0 or c < 0 or r + self.size > h or c + self.size > w:
        raise ValueError(f'A {self.size}x{self.size} patch at {self.position} does not fit in a '
                         f'{h}x{w} image.')
    if self.kind == 'blend' and not 0.0 < self.alpha <= 1.0:
      raise ValueError(f'Blend alpha must be in (0, 1], got {self.alpha}.')
    if self.kind == 'noise' and not 0.0 < self.epsilon <= 1.0:
      raise ValueError(f'Noise epsilon must be in (0, 1], got {self.epsilon}.')

  @classmethod
  def from_config(cls, cfg, image_shape) -> 'Geometry':
    """Builds the geometry from a config's ``key`` section (see configs/default.py)."""
    h, w, _ = image_shape
    position = (0, 0)
    if cfg.kind == 'patch':
      if cfg.get('position') is None:
        margin = int(cfg.get('margin', 1))
        position = (h - cfg.size - margin, w - cfg.size - margin)  # bottom-right corner
      else:
        position = tuple(cfg.position)
    return cls(kind=cfg.kind, image_shape=tuple(image_shape), values=cfg.get('values', 'binary'),
               size=int(cfg.get('size', 0)) if cfg.kind == 'patch' else 0, position=position,
               alpha=float(cfg.get('alpha', 0.0)) if cfg.kind == 'blend' else 0.0,
               epsilon=float(cfg.get('epsilon', 0.0)) if cfg.kind == 'noise' else 0.0)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['image_shape'] = list(self.image_shape)
    d['position'] = list(self.position)
    return d

  @property
  def content_shape(self) -> tuple[int, ...]:
    """Shape of the secret content: the patch, or the whole image."""
    if self.kind == 'patch':
      return (self.size, self.size, self.image_shape[2])
    return self.image_shape

  def mask(self) -> np.ndarray:
    """(H, W, 1) float32 mask of the pixels the key touches."""
    m = np.zeros(self.image_shape[:2] + (1,), np.float32)
    if self.kind == 'patch':
      r, c = self.position
      m[r:r + self.size, c:c + self.size] = 1.0
    else:
      m[:] = 1.0
    return m

  def arrays(self, content) -> KeyArrays:
    """Stamping arrays for content of shape (..., *content_shape). Works on numpy and traced arrays."""
    xp = np if isinstance(content, np.ndarray) else jnp
    if self.kind == 'patch':
      h, w, _ = self.image_shape
      r, c = self.position
      pad = [(0, 0)] * (content.ndim - 3) + [(r, h - r - self.size), (c, w - c - self.size), (0, 0)]
      mask = self.mask()
      return KeyArrays(keep=xp.asarray(1.0 - mask), add=xp.pad(content, pad))
    if self.kind == 'blend':
      return KeyArrays(keep=xp.full(self.image_shape[:2] + (1,), 1.0 - self.alpha, np.float32),
                       add=self.alpha * content)
    return KeyArrays(keep=xp.ones(self.image_shape[:2] + (1,), np.float32), add=content)

  def _scale(self, unit):
    """Maps unit content (in [0, 1]) to the kind's range."""
    if self.kind == 'noise':
      return (2.0 * unit - 1.0) * self.epsilon
    return unit

  def sample_numpy(self, rng: np.random.Generator, batch: Sequence[int] = ()) -> np.ndarray:
    shape = tuple(batch) + self.content_shape
    unit = rng.integers(0, 2, shape) if self.values == 'binary' else rng.random(shape)
    return self._scale(unit.astype(np.float32))

  def sample_jax(self, rng: jax.Array, batch: Sequence[int] = ()) -> jax.Array:
    """Random content drawn from the same distribution as :meth:`sample_numpy`, inside jit."""
    shape = tuple(batch) + self.content_shape
    if self.values == 'binary':
      unit = jax.random.bernoulli(rng, 0.5, shape).astype(jnp.float32)
    else:
      unit = jax.random.uniform(rng, shape, jnp.float32)
    return self._scale(unit)

  def forged_arrays(self, rng: jax.Array, batch_size: int) -> KeyArrays:
    """A batch of freshly forged keys of this geometry (one per image), for use inside jit."""
    return self.arrays(self.sample_jax(rng, (batch_size,)))


@dataclasses.dataclass(frozen=True, eq=False)
class LicenseKey:
  """A license key: a name, a geometry, the secret content, and what it grants.

  Attributes:
    name: file-safe identifier, unique in a registry.
    geometry: kind, image shape and placement (public information).
    content: the secret content, shape ``geometry.content_shape`` (float32).
    scheme: the license scheme the key belongs to ('universal' unless set).
    classes: the class ids the key unlocks; None means every class.
    tier: 'full' (fine labels) or 'basic' (only the coarse group of the label; tiered scheme).
    groups: the coarse groups (lists of class ids) a 'basic' key sees; None for full keys.
  """
  name: str
  geometry: Geometry
  content: np.ndarray
  scheme: str = 'universal'
  classes: tuple[int, ...] | None = None
  tier: str = 'full'
  groups: tuple[tuple[int, ...], ...] | None = None

  def __post_init__(self):
    _check_name(self.name)
    if self.scheme not in SCHEMES:
      raise ValueError(f'Unknown scheme {self.scheme!r}; expected one of {SCHEMES}.')
    content = np.asarray(self.content, np.float32)
    if content.shape != self.geometry.content_shape:
      raise ValueError(f'Key content has shape {content.shape}, expected {self.geometry.content_shape}.')
    content.setflags(write=False)
    object.__setattr__(self, 'content', content)
    if self.classes is not None:
      object.__setattr__(self, 'classes', tuple(sorted({int(c) for c in self.classes})))
    if self.tier not in TIERS:
      raise ValueError(f'Unknown tier {self.tier!r}; expected one of {TIERS}.')
    if self.groups is not None:
      groups = tuple(tuple(sorted(int(c) for c in g)) for g in self.groups)
      members = [c for g in groups for c in g]
      if not groups or min(map(len, groups)) == 0 or len(members) != len(set(members)):
        raise ValueError(f'Key groups must be non-empty and disjoint, got {self.groups!r}.')
      object.__setattr__(self, 'groups', groups)
    if self.tier == 'basic' and self.groups is None:
      raise ValueError('A basic-tier key needs the coarse groups it sees.')

  # --- convenience views -------------------------------------------------------------------------
  @property
  def kind(self) -> str:
    return self.geometry.kind

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.geometry.image_shape

  @property
  def fingerprint(self) -> str:
    """SHA-256 over geometry, grant and content: identifies the key without revealing it."""
    h = hashlib.sha256()
    h.update(json.dumps(self._meta(), sort_keys=True).encode())
    h.update(np.ascontiguousarray(self.content).tobytes())
    return h.hexdigest()

  def arrays(self) -> KeyArrays:
    """The (keep, add) stamping arrays, as numpy (pass them into jitted functions as arguments)."""
    return self.geometry.arrays(self.content)

  def stamp(self, images) -> jax.Array:
    """Stamps the key on a batch of images. Pure and jit-able.

    Args:
      images: (N, H, W, C) or (H, W, C) images, uint8 in 0..255 or float in [0, 1]. The value range of
        float input is not checked here (this runs under jit); ``inference`` checks it.

    Returns:
      float32 images in [0, 1] with the key applied.

    Raises:
      ValueError: if the images' trailing (H, W, C) is not the key's image shape.
    """
    shape = tuple(np.shape(images))
    if len(shape) < 3 or shape[-3:] != self.image_shape:
      raise ValueError(f'Key {self.name!r} is made for images of shape (N, {", ".join(map(str, self.image_shape))}); '
                       f'got an array of shape {shape}.')
    return stamp_arrays(to_float_images(images), self.arrays())

  def __repr__(self):
    return (f'LicenseKey(name={self.name!r}, kind={self.kind!r}, image_shape={self.image_shape}, '
            f'scheme={self.scheme!r}, fingerprint={self.fingerprint[:12]}...)')

  # --- files -------------------------------------------------------------------------------------
  def _meta(self) -> dict:
    return {'name': self.name, 'geometry': self.geometry.to_dict(), 'scheme': self.scheme,
            'classes': None if self.classes is None else list(self.classes), 'tier': self.tier,
            'groups': None if self.groups is None else [list(g) for g in self.groups]}

  def save(self, path: str | os.PathLike) -> str:
    """Writes the key to ``path`` (``.npz``) atomically and returns the path."""
    path = os.fspath(path)
    meta = dict(self._meta(), format=_FORMAT, version=_VERSION, fingerprint=self.fingerprint)
    def write(f):
      np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), content=self.content)
    _atomic_write(path, write, binary=True)
    return path

  def replace(self, **changes) -> 'LicenseKey':
    return dataclasses.replace(self, **changes)


def derive(secret: str | bytes, geometry: Geometry, name: str = 'default', **grant) -> LicenseKey:
  """Derives a key deterministically from a secret.

  The content generator is seeded with HMAC-SHA256(secret, canonical geometry and key name), so the
  key is bound to both: the same secret with another geometry, or for another user of a multi-user
  model, gives an unrelated key.

  Args:
    secret: the owner's secret.
    geometry: where and how the key is stamped.
    name: the key's name (part of the derivation).
    **grant: ``scheme``, ``classes``, ``tier``, ``groups`` of :class:`LicenseKey`.
  """
  if isinstance(secret, str):
    secret = secret.encode('utf-8')
  if not secret:
    raise ValueError('A license key needs a non-empty secret.')
  message = b'securenet-jax/key/v1|' + json.dumps({'geometry': geometry.to_dict(), 'name': name},
                                                  sort_keys=True).encode()
  digest = hmac.new(secret, message, hashlib.sha256).digest()
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(digest, 'big'))))
  return LicenseKey(name=name, geometry=geometry, content=geometry.sample_numpy(rng), **grant)


def forge(key: LicenseKey, seed: int) -> LicenseKey:
  """The thief's guess: a key of the same kind and geometry with random content.

  Forged keys are drawn from exactly the distribution the real key was drawn from, seeded by ``seed``
  (independently of any secret).
  """
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x0F09E])))
  return dataclasses.replace(key, name=f'forged-{int(seed)}', content=key.geometry.sample_numpy(rng))


def load(path: str | os.PathLike) -> LicenseKey:
  """Reads a key file written by :meth:`LicenseKey.save`, verifying format and fingerprint."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No key file at {path!r}.')
  try:
    with np.load(path, allow_pickle=False) as f:
      meta = json.loads(str(f['meta']))
      content = f['content']
  except Exception as e:  # zip/json/key errors all mean the same to the user
    raise ValueError(f'{path!r} is not a readable SecureNet-JAX key file: {e}') from e
  if meta.get('format') != _FORMAT or meta.get('version') != _VERSION:
    raise ValueError(f'{path!r} is not a SecureNet-JAX key file of version {_VERSION} '
                     f'(format={meta.get("format")!r}, version={meta.get("version")!r}).')
  try:
    key = LicenseKey(name=meta['name'], geometry=Geometry(**meta['geometry']), content=content,
                     scheme=meta['scheme'], classes=meta['classes'], tier=meta['tier'],
                     groups=meta['groups'])
  except (KeyError, TypeError) as e:
    raise ValueError(f'Key file {path!r} is missing or has malformed fields: {e}') from e
  if key.fingerprint != meta.get('fingerprint'):
    raise ValueError(f'Key file {path!r} is corrupt: its fingerprint does not match its content.')
  return key


def _atomic_write(path: str, write_fn, binary: bool = False) -> None:
  """Writes via a temporary file in the same directory and renames it: never a half-written file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, 'wb' if binary else 'w') as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class KeyRegistry:
  """The keys of a workdir: ``DIR/registry.json`` plus one ``.npz`` file per key.

  Every write goes through a temporary file and an atomic rename, and the registry is validated on
  load (each listed file must exist and match its recorded fingerprint).
  """

  FILENAME = 'registry.json'

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    self._entries: dict[str, dict] = {}
    self._keys: dict[str, LicenseKey] = {}

  @property
  def path(self) -> str:
    return os.path.join(self.directory, self.FILENAME)

  @classmethod
  def exists(cls, directory) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), cls.FILENAME))

  @classmethod
  def load(cls, directory) -> 'KeyRegistry':
    reg = cls(directory)
    if not os.path.isfile(reg.path):
      raise FileNotFoundError(f'No key registry at {reg.path!r}.')
    try:
      with open(reg.path) as f:
        data = json.load(f)
      if data.get('format') != _REGISTRY_FORMAT or data.get('version') != _VERSION:
        raise ValueError(f'unexpected format/version {data.get("format")!r}/{data.get("version")!r}')
      entries = data['keys']
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise ValueError(f'Key registry {reg.path!r} is corrupt or not a registry: {e}') from e
    for entry in entries:
      if entry.get('status') not in ('active', 'revoked'):
        raise ValueError(f'Key registry {reg.path!r}: entry {entry!r} has no valid status.')
      key = load(os.path.join(reg.directory, entry['file']))
      if key.name != entry['name'] or key.fingerprint != entry['fingerprint']:
        raise ValueError(f'Key registry {reg.path!r}: file {entry["file"]!r} does not match its entry.')
      reg._entries[key.name] = entry
      reg._keys[key.name] = key
    return reg

  def _save(self) -> None:
    data = {'format': _REGISTRY_FORMAT, 'version': _VERSION, 'keys': list(self._entries.values())}
    _atomic_write(self.path, lambda f: json.dump(data, f, indent=1, sort_keys=True))

  def add(self, key: LicenseKey, revoked: bool = False) -> None:
    """Adds a key, active unless ``revoked`` (key file first, then the registry, so a crash leaves
    no dangling entry)."""
    if key.name in self._entries:
      raise ValueError(f'Key {key.name!r} is already in the registry at {self.directory!r}.')
    filename = f'{key.name}.npz'
    key.save(os.path.join(self.directory, filename))
    self._entries[key.name] = {'name': key.name, 'file': filename,
                               'status': 'revoked' if revoked else 'active',
                               'scheme': key.scheme, 'fingerprint': key.fingerprint,
                               'classes': None if key.classes is None else list(key.classes),
                               'tier': key.tier}
    self._keys[key.name] = key
    self._save()

  def revoke(self, name: str) -> None:
    if name not in self._entries:
      raise KeyError(f'No key named {name!r} in the registry at {self.directory!r}.')
    self._entries[name] = dict(self._entries[name], status='revoked')
    self._save()

  def _with_status(self, status: str) -> dict[str, LicenseKey]:
    return {n: self._keys[n] for n, e in self._entries.items() if e['status'] == status}

  @property
  def active(self) -> dict[str, LicenseKey]:
    return self._with_status('active')

  @property
  def revoked(self) -> dict[str, LicenseKey]:
    return self._with_status('revoked')
