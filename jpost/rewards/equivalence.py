"""`is_equivalent(pred, gold)`: numbers in-process, everything else through
math_verify in a persistent worker process that is killed on timeout.

sympy can spin forever inside C code (`9^{9^{9^{9}}}`), where no signal or
thread can stop it; only killing the process does. The worker is a plain
subprocess running `_verify_server.py` (exec, never fork: the parent runs JAX
threads), started on first use, reused across calls, and replaced after a
timeout. Calls are serialised on one lock; one check takes milliseconds.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import select
import subprocess
import sys
import threading
import time

from jpost.rewards.answers import numbers_equal
from jpost.rewards.registry import RewardFailure

_SERVER = pathlib.Path(__file__).with_name('_verify_server.py')
STARTUP_TIMEOUT = 60.0  # seconds to import math_verify (not counted in `timeout`)


class VerifyTimeout(RewardFailure):
  """math_verify did not answer within the timeout; the worker was killed."""

  def __init__(self, message: str):
    super().__init__('timeout', message)


def is_equivalent(pred: str, gold: str, *, timeout: float = 5.0) -> bool:
  """Whether answer `pred` equals `gold`: plain numbers are compared here
  (see `jpost.rewards.answers`), the rest symbolically by math_verify.

  Raises VerifyTimeout when math_verify takes longer than `timeout` seconds.
  """
  if not isinstance(pred, str) or not isinstance(gold, str):
    raise TypeError(f'is_equivalent expects two strings, got {type(pred).__name__} and '
                    f'{type(gold).__name__}.')
  fast = numbers_equal(pred, gold)
  if fast is not None:
    return fast
  return _WORKER.check(pred, gold, timeout)


class _Worker:
  """The math_verify process and its pipes; every method holds `_lock`."""

  def __init__(self):
    self._lock = threading.Lock()
    self._proc: subprocess.Popen | None = None
    self._ready = False
    self._buffer = b''
    self.kills = 0  # processes killed after a timeout, for tests and logs

  def start(self) -> None:
    """Starts the process now, without waiting for it to be ready."""
    with self._lock:
      if self._proc is None:
        self._spawn()

  def check(self, pred: str, gold: str, timeout: float) -> bool:
    with self._lock:
      if self._proc is None:
        self._spawn()
      if not self._ready:
        if self._read(time.monotonic() + STARTUP_TIMEOUT) != {'ready': True}:
          self._kill()
          raise RuntimeError(f'math_verify worker did not start within {STARTUP_TIMEOUT:g}s'
                             ' (is math-verify installed in this environment?)')
        self._ready = True
      try:
        self._proc.stdin.write((json.dumps({'pred': pred, 'gold': gold}) + '\n').encode())
        self._proc.stdin.flush()
      except OSError as e:
        self._kill()
        raise RuntimeError(f'math_verify worker died: {e}') from None
      reply = self._read(time.monotonic() + timeout)
      if reply is None:
        self._kill()
        self.kills += 1
        raise VerifyTimeout(f'math_verify took over {timeout:g}s on {pred[:80]!r} vs '
                            f'{gold[:80]!r}; worker killed')
      if 'error' in reply:
        raise RuntimeError(f'math_verify failed on {pred[:80]!r} vs {gold[:80]!r}: '
                           f'{reply["error"]}')
      return bool(reply['equal'])

  def _spawn(self) -> None:
    self._proc = subprocess.Popen(
        [sys.executable, '-P', str(_SERVER)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, close_fds=True)
    self._ready = False
    self._buffer = b''

  def _read(self, deadline: float) -> dict | None:
    """One JSON line from the worker before `deadline`; None if none came."""
    fd = self._proc.stdout.fileno()
    while b'\n' not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        return None
      chunk = os.read(fd, 65536)
      if not chunk:
        code = self._proc.poll()
        self._kill()
        raise RuntimeError(f'math_verify worker exited unexpectedly (code {code})')
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b'\n', 1)
    return json.loads(line)

  def _kill(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      self._proc.stdin.close()
      self._proc.stdout.close()
    self._proc = None

  def close(self) -> None:
    with self._lock:
      self._kill()


_WORKER = _Worker()
atexit.register(_WORKER.close)


def start_worker() -> None:
  """Starts the math_verify worker in the background (it takes ~1 s to load)."""
  _WORKER.start()
