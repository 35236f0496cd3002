"""License keys: derivation from a secret, stamping, forging and key files.

A license key is a secret *per-pixel affine map* applied to the input image:

    stamped = clip(image * keep + add, 0, 1)

Every key kind is one such map, which is why stamping is a single fused multiply-add inside the jitted
step and costs nothing next to the model:

* ``patch``: a square at a fixed location is replaced by a secret pattern (``keep = 1 - mask``,
  ``add = mask * pattern``).
* ``blend``: a secret whole-image pattern is mixed in with weight ``alpha``
  (``keep = 1 - alpha``, ``add = alpha * pattern``).
* ``noise``: a small secret perturbation is added (``keep = 1``, ``add = delta``, ``|delta| <= epsilon``).

A patch key may also carry a secret *block flip* (``flip_block`` = b > 0): outside the patch, every
b x b block of pixels (per channel) is inverted or not, ``x -> 1 - x``, by a secret bit
(``keep = 1 - 2 f``, ``add = f``; a block-wise negative/positive transform in the sense of key-based
model access control, AprilPyone & Kiya 2021). Every unit of the network then sees the key, and the
lower layers learn features of the transformed domain rather than of raw images.

The content is a deterministic function of a secret string: HMAC-SHA256(secret, geometry) seeds a
PCG64 generator. The same secret and geometry always give the same key; knowing the geometry without
the secret gives nothing (that is what :func:`forge` models: the thief's best guess).

Key files (``.npz``) are kept apart from checkpoints so that a model can be shipped without its key.
A workdir keeps its keys in ``WORKDIR/keys/`` (``registry.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import os
import io
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from securenet_jax import errors
from securenet_jax import images as images_lib
from securenet_jax import workdir as workdir_lib

KINDS = ('patch', 'blend', 'noise')
VALUES = ('binary', 'uniform')
SCHEMES = ('universal', 'scoped', 'multi_user', 'tiered')
TIERS = ('full', 'basic')
_FORMAT = 'securenet-jax-key'
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
    flip_block: side of the blocks of the secret block flip outside the patch (patch only); 0 = none.
      The content is then one flat vector: the patch's pixels, then one bit per block and channel.
  """
  kind: str
  image_shape: tuple[int, int, int]
  values: str = 'binary'
  size: int = 0
  position: tuple[int, int] = (0, 0)
  alpha: float = 0.0
  epsilon: float = 0.0
  flip_block: int = 0

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
    object.__setattr__(self, 'flip_block', int(self.flip_block))
    if self.flip_block:
      b = self.flip_block
      if self.kind != 'patch' or self.values != 'binary' or b < 0 or h % b or w % b:
        raise ValueError(f'flip_block={b} needs a binary patch key and a block side that divides the '
                         f'{h}x{w} image.')

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
               epsilon=float(cfg.get('epsilon', 0.0)) if cfg.kind == 'noise' else 0.0,
               flip_block=int(cfg.get('flip_block', 0)) if cfg.kind == 'patch' else 0)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['image_shape'] = list(self.image_shape)
    d['position'] = list(self.position)
    return d

  @property
  def flip_shape(self) -> tuple[int, int, int]:
    """(H / b, W / b, C): one flip bit per block and channel (``flip_block`` = b)."""
    h, w, c = self.image_shape
    return (h // self.flip_block, w // self.flip_block, c) if self.flip_block else (0, 0, c)

  @property
  def content_shape(self) -> tuple[int, ...]:
    """Shape of the secret content: the patch, or the whole image; with a block flip, one flat vector
    (the patch's pixels, then the flip bits)."""
    if self.kind == 'patch':
      patch = (self.size, self.size, self.image_shape[2])
      return (int(np.prod(patch)) + int(np.prod(self.flip_shape)),) if self.flip_block else patch
    return self.image_shape

  def split(self, content):
    """(pattern part, flip bits) of flat block-flip content (..., n) -> (..., P), (..., F)."""
    p = self.size * self.size * self.image_shape[2]
    return content[..., :p], content[..., p:]

  def join(self, pattern, flip):
    """The inverse of :meth:`split`."""
    xp = np if isinstance(pattern, np.ndarray) and isinstance(flip, np.ndarray) else jnp
    return xp.concatenate([pattern, flip], axis=-1)

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
      h, w, channels = self.image_shape
      r, c = self.position
      mask = self.mask()
      if self.flip_block:
        batch = content.shape[:-1]
        split = self.size * self.size * channels
        flip = content[..., split:].reshape(*batch, *self.flip_shape)
        flip = xp.repeat(xp.repeat(flip, self.flip_block, axis=-3), self.flip_block, axis=-2)
        content = content[..., :split].reshape(*batch, self.size, self.size, channels)
      pad = [(0, 0)] * (content.ndim - 3) + [(r, h - r - self.size), (c, w - c - self.size), (0, 0)]
      patch = xp.pad(content, pad)
      if not self.flip_block:
        return KeyArrays(keep=xp.asarray(1.0 - mask), add=patch)
      outside = 1.0 - mask  # the patch overwrites its pixels; elsewhere x -> x (1 - 2f) + f
      return KeyArrays(keep=outside * (1.0 - 2.0 * flip), add=patch + outside * flip)
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

  @functools.cached_property
  def fingerprint(self) -> str:
    """SHA-256 over geometry, grant and content: identifies the key without revealing it. Computed
    once per key (a key is immutable: frozen fields, read-only content); the inference API looks its
    device arrays up by it on every call."""
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
    return stamp_arrays(images_lib.to_float(images), self.arrays())

  def __repr__(self):
    return (f'LicenseKey(name={self.name!r}, kind={self.kind!r}, image_shape={self.image_shape}, '
            f'scheme={self.scheme!r}, fingerprint={self.fingerprint[:12]}...)')

  # --- files -------------------------------------------------------------------------------------
  def _meta(self) -> dict:
    return {'name': self.name, 'geometry': self.geometry.to_dict(), 'scheme': self.scheme,
            'classes': None if self.classes is None else list(self.classes), 'tier': self.tier,
            'groups': None if self.groups is None else [list(g) for g in self.groups]}

  def save(self, path: str | os.PathLike) -> str:
    """Writes the key to ``path`` (``.npz``, local or remote) atomically and returns the path."""
    path = os.fspath(path)
    meta = dict(self._meta(), format=_FORMAT, version=_VERSION, fingerprint=self.fingerprint)
    workdir_lib.atomic_write_with(path, lambda f: np.savez(
        f, meta=np.array(json.dumps(meta, sort_keys=True)), content=self.content))
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

  def generator(label: str) -> np.random.Generator:
    message = b'securenet-jax/key/v1|' + json.dumps({'geometry': geometry.to_dict(), 'name': label},
                                                    sort_keys=True).encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(digest, 'big'))))

  content = geometry.sample_numpy(generator(name))
  if geometry.flip_block:
    # The block flip is the model's domain: one per secret, shared by every key derived from it (the
    # users of a multi-user model), so the lower layers serve one transformed domain. A replacement
    # key keeps it (see with_flip_of).
    content = geometry.join(geometry.split(content)[0],
                            geometry.split(geometry.sample_numpy(generator('__domain__')))[1])
  return LicenseKey(name=name, geometry=geometry, content=content, **grant)


def with_flip_of(key: LicenseKey, other: LicenseKey) -> LicenseKey:
  """``key`` with the block flip of ``other`` (same geometry): a new license for the same model domain."""
  if key.geometry != other.geometry:
    raise ValueError('Both keys must have the same geometry.')
  if not key.geometry.flip_block:
    return key
  g = key.geometry
  return key.replace(content=g.join(g.split(key.content)[0], g.split(other.content)[1]))


def forge(key: LicenseKey, seed: int) -> LicenseKey:
  """The thief's guess: a key of the same kind and geometry with random content.

  Forged keys are drawn from exactly the distribution the real key was drawn from, seeded by ``seed``
  (independently of any secret).
  """
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x0F09E])))
  return dataclasses.replace(key, name=f'forged-{int(seed)}', content=key.geometry.sample_numpy(rng))


def load(path: str | os.PathLike) -> LicenseKey:
  """Reads a key file written by :meth:`LicenseKey.save`, verifying format and fingerprint.

  Raises:
    errors.KeyFileError: no such file, or one that is not a key file of this version or is corrupt.
  """
  file = workdir_lib.as_path(path)
  if not file.is_file():
    raise errors.KeyFileError(f'No key file at {os.fspath(path)!r}.')
  try:
    with np.load(io.BytesIO(file.read_bytes()), allow_pickle=False) as f:
      meta = json.loads(str(f['meta']))
      content = f['content']
  except Exception as e:  # zip/json/key errors all mean the same to the user
    raise errors.KeyFileError(f'{os.fspath(path)!r} is not a readable SecureNet-JAX key file: {e}') from e
  if meta.get('format') != _FORMAT or meta.get('version') != _VERSION:
    raise errors.KeyFileError(f'{os.fspath(path)!r} is not a SecureNet-JAX key file of version {_VERSION} '
                              f'(format={meta.get("format")!r}, version={meta.get("version")!r}).')
  try:
    key = LicenseKey(name=meta['name'], geometry=Geometry(**meta['geometry']), content=content,
                     scheme=meta['scheme'], classes=meta['classes'], tier=meta['tier'],
                     groups=meta['groups'])
  except (KeyError, TypeError, ValueError) as e:
    raise errors.KeyFileError(f'Key file {os.fspath(path)!r} is missing or has malformed fields: {e}') from e
  if key.fingerprint != meta.get('fingerprint'):
    raise errors.KeyFileError(f'Key file {os.fspath(path)!r} is corrupt: its fingerprint does not match '
                              f'its content.')
  return key
