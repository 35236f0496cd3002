"""Tests of securenet_jax.loop_support: progress lines, accumulated training time, stop signals."""

import os
import signal
import threading

import pytest
from absl import logging

from securenet_jax import loop_support
from securenet_jax import workdir as workdir_lib


def test_duration_reads_as_minutes_and_seconds():
  assert loop_support.duration(59.4) == '59s'
  assert loop_support.duration(61) == '1m01s'
  assert loop_support.duration(3600) == '60m00s'


def test_clock_accumulates_over_resumed_runs(tmp_path):
  wd = workdir_lib.Workdir(str(tmp_path))
  assert loop_support.Clock.read(wd) == 0.0
  first = loop_support.Clock(wd, primary=True)
  first.save()
  after_first = loop_support.Clock.read(wd)
  second = loop_support.Clock(wd, primary=True)
  assert second.before == after_first
  second.save()
  assert loop_support.Clock.read(wd) >= after_first
  loop_support.Clock(wd, primary=False).save()  # only process 0 writes


def test_progress_reports_rate_and_time_left(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  progress = loop_support.Progress('licensed', start=0, end=100, total=100, per_epoch=10, batch_size=32,
                                   every_s=0.0)
  progress.report(50, {'loss': 0.5, 'pos_acc': 0.75, 'ignored': 1.0})
  progress.report(100, {'loss': 0.25})
  assert 'licensed  epoch 6/10  step 50/100' in lines[0] and 'loss 0.500  pos_acc 0.750' in lines[0]
  assert 'left' in lines[0] and 'ignored' not in lines[0]
  assert 'step 100/100' in lines[1] and 'done in' in lines[1]


def test_first_signal_is_a_request_second_one_the_default():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip('signal handlers can only be installed from the main thread')
  before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a pytest-xdist worker
  with loop_support.StopSignals() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGINT)  # handled: a request, not a KeyboardInterrupt
    assert stop.requested and stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one would end the process
  assert signal.getsignal(signal.SIGINT) == before  # restored on exit
