"""Orbax checkpoints of the train state: save, restore with fallback, and the variables alone.

A checkpoint holds the whole train state (step, params, batch_stats, opt_state). Restoring for more
training takes all of it (:func:`restore`); inference and attacks take only the variables
(:func:`restore_variables`: params and batch_stats, no optimizer state). When the newest checkpoint
cannot be read (a crash while writing it, a truncated file), restoring falls back to the newest one
that can, and says which one it skipped and why.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from securenet_jax import errors
from securenet_jax import workdir as workdir_lib

CheckpointError = errors.CheckpointError


class _DropReadOnlyNotices(pylogging.Filter):
  """Orbax warns that a read-only manager is read only; that is the point, not a fault."""

  def filter(self, record):
    message = str(record.msg)
    return not (message.startswith('Given directory is read only') or
                message.startswith('CheckpointManagerOptions.read_only=True'))


@contextlib.contextmanager
def _quiet_read_only():
  logger, notice = pylogging.getLogger('absl'), _DropReadOnlyNotices()
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


def manager(directory, save_every: int = 1, keep: int = 1, read_only: bool = False
            ) -> ocp.CheckpointManager:
  """A CheckpointManager that saves every ``save_every`` steps (and whenever forced) and keeps the
  ``keep`` latest checkpoints. ``directory`` may be local or remote (``gs://...``)."""
  cm = ocp.checkpoint_managers
  with _quiet_read_only():
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=cm.FixedIntervalPolicy(max(1, save_every)),
        preservation_policy=cm.LatestN(keep),
        read_only=read_only,
        create=not read_only)
    return ocp.CheckpointManager(workdir_lib.as_path(directory), options=options)


def save_now(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves ``state`` at ``step`` regardless of the interval policy (no-op if already saved)."""
  if mngr.latest_step() != step:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def _shapes(tree) -> Any:
  return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)


def _newest_that_restores(mngr: ocp.CheckpointManager, restore_fn: Callable[[int], Any],
                          expected: Any, step: int | None) -> Any:
  """Restores ``step``, or (``step`` None) the newest checkpoint that restores and has the expected
  shapes; a checkpoint skipped on the way is logged with its reason."""
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise CheckpointError(f'No checkpoint in {mngr.directory}.', hint='Train first.')
  failures = []
  for s in steps:
    try:
      restored = restore_fn(s)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types for one problem)
      text = str(e)
      if 'shape' in text and ('compatible' in text or 'mismatch' in text):
        failures.append((s, 'its arrays have other shapes than this config\'s model'))
      else:
        failures.append((s, f'{type(e).__name__}: {text.splitlines()[0][:160] if text else ""}'))
    else:
      if _shapes(restored) == expected:
        if failures:
          logging.warning('Skipped checkpoint(s) %s in %s that could not be restored (%s); restored '
                          'step %d instead.', [f for f, _ in failures], mngr.directory,
                          '; '.join(r for _, r in failures), s)
        return restored
      failures.append((s, 'its arrays have other shapes than this config\'s model'))
  reasons = '; '.join(f'step {s}: {r}' for s, r in failures)
  raise CheckpointError(
      f'No checkpoint in {mngr.directory} can be restored into this config\'s model ({reasons}). '
      f'They are corrupt or were written by another model or optimizer.',
      hint=f'Start over in a new --workdir, or delete {mngr.directory} to retrain here.')


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
  """Restores the train state: ``step``, or the newest checkpoint that restores.

  Args:
    mngr: the manager of the checkpoint directory.
    abstract_state: the state's structure, shapes, dtypes and shardings (``jax.ShapeDtypeStruct``).
    step: a specific step; None takes the newest one that can be restored.

  Raises:
    errors.CheckpointError: no checkpoint, or none that fits ``abstract_state``.
  """
  return _newest_that_restores(
      mngr, lambda s: mngr.restore(s, args=ocp.args.StandardRestore(abstract_state)),
      _shapes(abstract_state), step)


def restore_variables(directory, abstract_variables: Any, step: int | None = None) -> Any:
  """Restores only the model's variables (``{'params', 'batch_stats'}``) of a train-state checkpoint,
  as host numpy arrays: what inference and attacks need, without the optimizer state.

  Raises:
    errors.CheckpointError: see :func:`restore`.
  """
  directory = workdir_lib.as_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'No checkpoint directory {directory}.', hint='Train first.')
  mngr = manager(directory, read_only=True)
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
  try:
    return _newest_that_restores(
        mngr, lambda s: mngr.restore(s, args=ocp.args.PyTreeRestore(
            item=abstract_variables, restore_args=restore_args, partial_restore=True)),
        _shapes(abstract_variables), step)
  finally:
    mngr.close()

