"""What a long training loop needs around its steps: stop signals honoured between steps, progress
lines with the time left, training seconds accumulated across resumes, and TensorBoard summaries."""

from __future__ import annotations

import signal
import threading
import time

from absl import logging

from securenet_jax import parallel
from securenet_jax import workdir as workdir_lib


class StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) become a request that the loop honours after the
  current step: checkpoint, then raise :class:`Preempted`. The first signal also restores the
  system's default handlers, so a second SIGTERM or Ctrl-C ends the process at once, even while it
  waits in a collective or on a file. Only the main thread can install handlers; elsewhere this does
  nothing."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    for other in self._previous:
      signal.signal(other, signal.SIG_DFL)
    logging.warning('%s received: checkpointing after the current step, then stopping (send it again '
                    'to stop at once, losing the steps since the last checkpoint).',
                    signal.Signals(signum).name)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class Progress:
  """One compact line now and then: phase, epoch, step, input images/s, a few metrics, time left."""
  SHOWN = ('loss', 'pos_acc', 'neg_silenced_frac', 'acc')

  def __init__(self, phase: str, start: int, end: int, total: int, per_epoch: int, batch_size: int,
               every_s: float):
    self.phase, self.start, self.end, self.total, self.per_epoch = phase, start, end, total, per_epoch
    self.batch_size, self.every_s = batch_size, every_s
    self.t_start = self.t_last = time.perf_counter()
    self.step_last = start

  def report(self, step: int, metrics: dict) -> None:
    now = time.perf_counter()
    if now - self.t_last < self.every_s and step != self.end:
      return
    rate = (step - self.step_last) / max(now - self.t_last, 1e-9)  # steps/s since the last line
    left = (self.end - step) / max(rate, 1e-9)
    shown = '  '.join(f'{k} {float(metrics[k]):.3f}' for k in self.SHOWN if k in metrics)
    logging.info('%s  epoch %d/%d  step %d/%d  %s img/s  %s  %s', self.phase,
                 min(step // self.per_epoch + 1, self.total // self.per_epoch), self.total // self.per_epoch,
                 step, self.total, f'{rate * self.batch_size:,.0f}', shown,
                 'done in ' + duration(now - self.t_start) if step == self.end else
                 f'{duration(left)} left')
    self.t_last, self.step_last = now, step


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


class Clock:
  """Training seconds of a workdir, accumulated over every run that resumed it (``timings.json``)."""

  def __init__(self, workdir: workdir_lib.Workdir, primary: bool):
    self.path, self.primary = workdir.root / 'timings.json', primary
    self.before = self.read(workdir)
    self.t0 = time.perf_counter()

  @staticmethod
  def read(workdir: workdir_lib.Workdir) -> float:
    path = workdir.root / 'timings.json'
    return float(workdir_lib.read_json(path, 'timings file')['train_s']) if path.exists() else 0.0

  def save(self) -> None:
    if self.primary:
      workdir_lib.write_json(self.path, {'train_s': self.before + time.perf_counter() - self.t0})


def summary_writer(logdir):
  """TensorBoard event files (process 0 only). A store the writer cannot reach costs the curves, not
  the run."""
  if not parallel.is_primary():
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    return SummaryWriter(logdir=str(logdir), flush_secs=10)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('No TensorBoard summaries: cannot write to %s (%s).', logdir, e)
    return None
