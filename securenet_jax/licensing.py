"""License management: which keys a model has, what each grants, and the registry that records them.

* :func:`grants`: the users a config licenses and what each may see (the ``license`` section: scheme,
  users x classes matrix, tiers, coarse groups; docs/schemes.md).
* :func:`training_keys`: the keys of a training run: derived from ``key.secret`` (or a fresh random
  secret) on the first run and registered in ``WORKDIR/keys``, read back from the registry on a rerun.
* :func:`plan_replacement`: the new registry of a key replacement or revocation, and
  :func:`successors`, which new key takes over from which revoked one.
"""

from __future__ import annotations

import secrets as secrets_lib

import jax
import numpy as np
from absl import logging

from securenet_jax import errors
from securenet_jax import keys as keys_lib
from securenet_jax import parallel
from securenet_jax import registry as registry_lib
from securenet_jax import workdir as workdir_lib

DENIED_OUTPUTS = ('silence', 'refuse')


def grants(license_cfg, num_classes: int) -> list[dict]:
  """The keys a config asks for: name and grant (scheme, classes, tier, groups) of each user.

  ``license_cfg.matrix`` is the users x classes authorization matrix (0/1); empty means every user is
  granted every class. ``license_cfg.tiers`` gives each user's tier ('full' or 'basic').

  Raises:
    errors.ConfigError: a malformed license section.
  """
  lcfg = license_cfg
  if lcfg.denied_output not in DENIED_OUTPUTS:
    raise errors.ConfigError(f'license.denied_output must be one of {DENIED_OUTPUTS}, got '
                             f'{lcfg.denied_output!r}.')
  users = list(lcfg.users)
  if not users or len(set(users)) != len(users):
    raise errors.ConfigError(f'license.users must be distinct names, got {users}.')
  matrix = (np.asarray(lcfg.matrix, np.int64) if len(lcfg.matrix)
            else np.ones((len(users), num_classes), np.int64))
  if matrix.shape != (len(users), num_classes) or not np.isin(matrix, (0, 1)).all():
    raise errors.ConfigError(f'license.matrix must be a {len(users)} x {num_classes} matrix of 0/1 '
                             f'(users x classes), got shape {matrix.shape}.')
  tiers = list(lcfg.tiers) if len(lcfg.tiers) else ['full'] * len(users)
  if len(tiers) != len(users):
    raise errors.ConfigError(f'license.tiers needs one tier per user ({len(users)}), got {tiers}.')
  groups = [list(g) for g in lcfg.groups] if len(lcfg.groups) else None
  if groups is not None and sorted(c for g in groups for c in g) != list(range(num_classes)):
    raise errors.ConfigError(f'license.groups must partition the {num_classes} classes, got {groups}.')
  out = []
  for user, row, tier in zip(users, matrix, tiers):
    if not row.any():
      raise errors.ConfigError(f'User {user!r} is granted no class.')
    out.append(dict(name=user, scheme=lcfg.scheme, classes=tuple(np.flatnonzero(row).tolist()),
                    tier=tier, groups=groups if tier == 'basic' else None))
  return out


def training_keys(config, workdir: workdir_lib.Workdir, image_shape, num_classes: int
                  ) -> tuple[list[keys_lib.LicenseKey], list[keys_lib.LicenseKey]]:
  """The run's (active, revoked) keys: from the workdir's registry when it has one, otherwise derived
  from ``config.key.secret`` (or a fresh random secret) for each user and registered.

  Raises:
    errors.KeyFileError: the registry lacks a configured user, or ``key.secret`` does not derive the
      registered keys (the workdir was trained with another secret).
    errors.ConfigError: a multi-process run without an explicit secret.
  """
  kcfg = config.key
  geometry = keys_lib.Geometry.from_config(kcfg, image_shape)
  wanted = grants(config.license, num_classes)
  # Every process looks before any can write: the primary registers new keys below only after the
  # all-gather, which waits for every process's look. (A barrier before the look let a late process
  # find the keys the primary had just written, take the other branch and miss 'keys:written'.)
  if parallel.same_on_every_process(registry_lib.KeyRegistry.exists(workdir.keys_dir),
                                    f'{workdir.keys_dir} holds a key registry'):
    registry = registry_lib.KeyRegistry.load(workdir.keys_dir)
    known = {**registry.active, **registry.revoked}
    for grant in wanted:
      if grant['name'] not in known:
        raise errors.KeyFileError(f'The key registry in {workdir.keys_dir} has no key {grant["name"]!r} '
                                  f'(active: {sorted(registry.active)}).',
                                  hint='Use a new --workdir for a different set of users.')
      key = known[grant['name']]
      if kcfg.secret and keys_lib.derive(kcfg.secret, geometry, **grant).fingerprint != key.fingerprint:
        raise errors.KeyFileError(
            f'key.secret does not derive the key {key.name!r} registered in {workdir.keys_dir}: this '
            f'workdir was trained with another secret or grant.',
            hint='Rerun without --config.key.secret (the registry holds the keys), or use a new '
                 '--workdir for the new secret.')
    return list(registry.active.values()), list(registry.revoked.values())
  secret = kcfg.secret
  if not secret:
    if jax.process_count() > 1:
      raise errors.ConfigError('Multi-process runs need an explicit key secret (every process must '
                               'derive the same keys).', hint='Add --config.key.secret=SECRET.')
    secret = secrets_lib.token_hex(32)
    logging.info('No key.secret given: generated a random one. The keys are saved in %s.',
                 workdir.keys_dir)
  keys = [keys_lib.derive(secret, geometry, **grant) for grant in wanted]
  if parallel.is_primary():
    register(workdir, keys, [])
  parallel.barrier('keys:written')
  return keys, []


def register(workdir: workdir_lib.Workdir, active, revoked) -> registry_lib.KeyRegistry:
  """Writes a new registry with these keys into ``workdir`` (call on one process only)."""
  registry = registry_lib.KeyRegistry(workdir.keys_dir)
  for key in active:
    registry.add(key)
  for key in revoked:
    registry.add(key, revoked=True)
  return registry


def load(workdir: workdir_lib.Workdir) -> registry_lib.KeyRegistry | None:
  """The workdir's registry, or None when it has none."""
  if not registry_lib.KeyRegistry.exists(workdir.keys_dir):
    return None
  return registry_lib.KeyRegistry.load(workdir.keys_dir)


def plan_replacement(source: registry_lib.KeyRegistry, revoke: str, new_secret: str,
                     new_key_name: str = '') -> tuple[list[keys_lib.LicenseKey], list[keys_lib.LicenseKey]]:
  """The (active, revoked) keys after revoking ``revoke`` (default: the only active key) and, with a
  ``new_secret``, adding a key with the same grant in its place.

  Raises:
    errors.ConfigError: no such key, an ambiguous one, a name clash, or a model left without keys.
  """
  active, revoked = dict(source.active), dict(source.revoked)
  name = revoke or (next(iter(active)) if len(active) == 1 else '')
  if not name:
    raise errors.ConfigError(f'The source has several active keys {sorted(active)}: say which one to '
                             f'revoke.', hint='Add --config.revoke=NAME.')
  if name not in active:
    raise errors.ConfigError(f'No active key {name!r} in the source registry (active: {sorted(active)}).')
  old = active.pop(name)
  revoked[name] = old
  if new_secret:
    new_name = new_key_name or next_name(name, set(active) | set(revoked))
    if new_name in active or new_name in revoked:
      raise errors.ConfigError(f'Key name {new_name!r} is already used in the registry.')
    new = keys_lib.with_flip_of(  # a block flip is the model's domain: the new key keeps it
        keys_lib.derive(new_secret, old.geometry, name=new_name, scheme=old.scheme,
                        classes=old.classes, tier=old.tier, groups=old.groups), old)
    active = {new_name: new, **active}
  elif not active:
    raise errors.ConfigError('Revoking the only key without a new secret would leave a model nobody '
                             'can use.', hint='Add --config.new_secret=SECRET.')
  return list(active.values()), list(revoked.values())


def successors(active, revoked) -> dict[str, str]:
  """New key -> the revoked key it replaces (same grant): the key whose stamp a teacher sees."""
  out = {}
  for new in active:
    for old in revoked:
      if (old.classes, old.tier, old.groups) == (new.classes, new.tier, new.groups) and old.name != new.name:
        out.setdefault(new.name, old.name)
  return out


def next_name(name: str, taken: set[str]) -> str:
  """``name.r2``, ``name.r3``, ...: the first free successor name of a key."""
  base, _, suffix = name.rpartition('.r')
  stem, n = (base, int(suffix) + 1) if base and suffix.isdigit() else (name, 2)
  while f'{stem}.r{n}' in taken:
    n += 1
  return f'{stem}.r{n}'
