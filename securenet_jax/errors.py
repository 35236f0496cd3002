"""Errors a user can cause and fix.

Each error's message says what is wrong in terms that fit a Python caller; ``hint`` says what to do
from the command line (``main.py`` prints both as two short lines, without a traceback).
"""

from __future__ import annotations


class SecureNetError(Exception):
  """Base class of the errors the command line reports as one line plus a hint."""

  def __init__(self, message: str, hint: str = ''):
    super().__init__(message)
    self.hint = hint


class ConfigError(SecureNetError, ValueError):
  """A config value is invalid or contradicts another."""


class WorkdirError(SecureNetError, ValueError):
  """A directory is not a workdir of this version, or holds a run of another config."""


class CheckpointError(SecureNetError, RuntimeError):
  """No checkpoint of a workdir can be restored into the expected state."""


class KeyFileError(SecureNetError, ValueError):
  """A key file or key registry is missing, corrupt, or does not match its workdir."""
