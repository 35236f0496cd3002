"""Orbax checkpoints of the train state, with clear errors instead of silent fresh starts."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.training import train_state


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored into the expected train state."""


def manager(directory: str, save_every: int, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager that saves every ``save_every`` steps (and whenever forced) and keeps the
  ``keep`` latest checkpoints."""
  cm = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=cm.FixedIntervalPolicy(max(1, save_every)),
      preservation_policy=cm.LatestN(keep),
      read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_now(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves ``state`` at ``step`` regardless of the interval policy (no-op if already saved)."""
  if mngr.latest_step() != step:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def _without_empty_batch_stats(abstract_state: Any) -> Any:
  """The same state as flax's plain TrainState (no ``batch_stats`` field), if its statistics are empty."""
  if not hasattr(abstract_state, 'batch_stats') or jax.tree.leaves(abstract_state.batch_stats):
    return None
  return train_state.TrainState(step=abstract_state.step, apply_fn=abstract_state.apply_fn,
                                params=abstract_state.params, tx=abstract_state.tx,
                                opt_state=abstract_state.opt_state)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores ``step`` (default: the latest) into the structure, shapes and shardings of
  ``abstract_state``.

  Raises:
    CheckpointError: no checkpoint, or one that does not match the model/optimizer of the config
      (different architecture, corrupt files...). The message says which directory and what to do.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'No checkpoint in {mngr.directory}.')
  try:
    try:
      restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except ValueError:
      legacy = _without_empty_batch_stats(abstract_state)
      if legacy is None:
        raise
      # A checkpoint written before the train state had BatchNorm statistics (models without them).
      old = mngr.restore(step, args=ocp.args.StandardRestore(legacy))
      restored = abstract_state.replace(step=old.step, params=old.params, opt_state=old.opt_state)
  except Exception as e:  # orbax raises many types (ValueError, KeyError, FileNotFoundError, ...)
    raise CheckpointError(
        f'Checkpoint {step} in {mngr.directory} cannot be restored into this config\'s train state '
        f'({type(e).__name__}: {str(e)[:500]}). It is corrupt or was written by a different model or '
        f'optimizer. Use a new --workdir, or delete that directory to start over.') from e
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), restored)
  if expected != got:
    raise CheckpointError(f'Checkpoint {step} in {mngr.directory} holds arrays of other shapes than '
                          f'this config\'s model. Use a new --workdir or the config it was trained with.')
  return restored
