"""Runs untrusted Python with its tests, so that no program can harm the run.

One subprocess per program (`_sandbox_harness.py` under `python -I`) in a
fresh temporary directory, with a minimal environment (no proxies, no
credentials), stdout/stderr discarded, and:

  - resource limits set by the harness before the program runs (soft = hard,
    so the program cannot raise them): CPU seconds, address space (1 GB),
    processes (32, so a fork bomb dies), file size, open files;
  - when this process is root: the program runs as a dedicated unprivileged
    uid (one per concurrent run), since root ignores the process limit;
  - network: when `unshare` can create namespaces here (root, or an
    unprivileged user namespace) the program runs in new network and PID
    namespaces (no interface but a down loopback; killing the harness kills
    every process it forked); the harness also replaces the socket
    constructors with functions that raise, the only barrier without
    namespaces (`isolation()` says which applies);
  - a wall-clock timeout, after which the whole process group is killed.

The interpreter is this one if the sandbox uid can run it, else the system's
`python3` (`sandbox_python()`): a Python installed under /root is unreadable
to that uid, and then only the system's packages are importable. Without
namespaces, a process that leaves its process group (setsid) outlives the
timeout, bounded by the CPU and process limits.

The limits are set in the child itself rather than in a `preexec_fn`: the
parent runs JAX threads, and `preexec_fn` is unsafe in threaded processes.
A program could find the result nonce by inspecting the harness's frames and
forge a report; the sandbox protects the host, not against deliberate forgery.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import pathlib
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_HARNESS = pathlib.Path(__file__).with_name('_sandbox_harness.py')
SANDBOX_UID_BASE = 1_900_000_000  # uids used when running as root (no user needs them)
MAX_PARALLEL = 64
_UIDS: queue.SimpleQueue = queue.SimpleQueue()
for _slot in range(MAX_PARALLEL):
  _UIDS.put(SANDBOX_UID_BASE + _slot)


class SandboxError(RuntimeError):
  """The sandbox itself failed (not the program in it): a set-up problem."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
  wall_seconds: float = 10.0
  cpu_seconds: int = 10
  memory_mb: int = 1024  # address space
  processes: int = 32
  file_mb: int = 16
  open_files: int = 256

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if not getattr(self, field.name) > 0:
        raise ValueError(f'sandbox limit {field.name}={getattr(self, field.name)} must be > 0.')


@dataclasses.dataclass(frozen=True)
class RunResult:
  outcome: str  # 'passed' | 'failed' | 'error' | 'timeout' | 'crashed'
  passed: int
  total: int
  error: str | None  # the program's exception type, or how the process ended
  seconds: float


def split_tests(tests: str) -> list[tuple[bool, str]]:
  """Top-level statements as (is_test, source): each top-level `assert` is
  one test, other statements (imports, helpers) run in order as set-up; a
  block with no top-level assert (e.g. `check(candidate)`) is one test."""
  try:
    tree = ast.parse(tests)
  except SyntaxError as e:
    raise ValueError(f'the tests do not parse (line {e.lineno}: {e.msg}); fix the dataset '
                     'row.') from None
  parts = [(isinstance(node, ast.Assert), ast.get_source_segment(tests, node))
           for node in tree.body]
  if not parts:
    raise ValueError('the tests are empty; give each row at least one assert.')
  if not any(is_test for is_test, _ in parts):
    return [(True, tests)]
  return parts


@functools.cache
def isolation() -> tuple[str, ...]:
  """The namespace wrapper used here, or () when `unshare` cannot create one."""
  if shutil.which('unshare') is None:
    return ()
  flags = ['--net', '--pid', '--fork', '--kill-child']
  if os.geteuid() != 0:
    flags = ['--user', '--map-root-user'] + flags
  command = ('unshare', *flags)
  try:
    probe = subprocess.run([*command, 'true'], capture_output=True, timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    return ()
  return command if probe.returncode == 0 else ()


@functools.cache
def sandbox_python(python: str | None = None) -> str:
  """An interpreter that works inside the sandbox: `python` if given, else
  this one, else the system's (a root-owned Python under /root cannot be read
  by the sandbox's unprivileged uid)."""
  candidates = [python] if python else [sys.executable, '/usr/bin/python3',
                                        shutil.which('python3')]
  tried = []
  for candidate in dict.fromkeys(c for c in candidates if c):
    try:
      result = run_tests('import collections, json, math, re', 'assert True',
                         python=candidate)
    except SandboxError as e:
      tried.append(f'{candidate} ({e})')
      continue
    if result.outcome == 'passed':
      return candidate
    tried.append(f'{candidate} ({result.outcome}: {result.error})')
  raise RuntimeError(f'no Python interpreter runs inside the code sandbox; tried {tried}. '
                     "Set the code reward's python option to one readable by all users.")


def run_tests(code: str, tests: str | list[tuple[bool, str]], *, limits: Limits = Limits(),
              python: str | None = None) -> RunResult:
  """Runs `code` then `tests` in the sandbox. Whatever the code does is an
  outcome; SandboxError only if the sandbox could not start."""
  parts = split_tests(tests) if isinstance(tests, str) else tests
  python = python or sandbox_python()
  uid = _UIDS.get() if os.geteuid() == 0 else None
  workdir = tempfile.mkdtemp(prefix='jpost-sandbox-')
  read_fd, write_fd = os.pipe()
  nonce = secrets.token_hex(16)
  start = time.monotonic()
  errors = tempfile.TemporaryFile()  # stderr until the harness has started
  try:
    if uid is not None:
      os.chown(workdir, uid, uid)
    processes = limits.processes if uid is not None else _tasks_of(os.getuid()) + limits.processes
    mb = 1 << 20
    job = {'nonce': nonce, 'code': code, 'tests': parts, 'uid': uid, 'limits': {
        'RLIMIT_CPU': int(limits.cpu_seconds), 'RLIMIT_AS': limits.memory_mb * mb,
        'RLIMIT_NPROC': processes, 'RLIMIT_FSIZE': limits.file_mb * mb,
        'RLIMIT_NOFILE': limits.open_files, 'RLIMIT_CORE': 0}}
    env = {'PATH': '/usr/local/bin:/usr/bin:/bin', 'HOME': workdir, 'TMPDIR': workdir,
           'LANG': 'C.UTF-8', 'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1'}
    proc = subprocess.Popen(
        [*isolation(), python, '-I', str(_HARNESS), str(write_fd)], cwd=workdir, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
        pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    write_fd = -1
    timed_out = _feed_and_wait(proc, json.dumps(job).encode(), start + limits.wall_seconds)
    seconds = time.monotonic() - start
    started, report = _read_report(read_fd, nonce)
    if not started and not timed_out:
      errors.seek(0)
      message = errors.read(2000).decode(errors='replace').strip()
      raise SandboxError(f'the code sandbox did not start (exit {proc.returncode}): {message}')
  finally:
    errors.close()
    for fd in (read_fd, write_fd):
      if fd >= 0:
        os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    if uid is not None:
      _UIDS.put(uid)
  if timed_out:
    return RunResult('timeout', 0, _count(parts), f'over {limits.wall_seconds:g}s', seconds)
  if report is None:
    code_ = proc.returncode
    how = f'signal {signal.Signals(-code_).name}' if code_ < 0 else f'exit {code_}'
    return RunResult('crashed', 0, _count(parts), f'{how} without a report', seconds)
  passed, total, error = report['passed'], report['total'], report['error']
  outcome = 'passed' if passed == total else 'error' if error else 'failed'
  return RunResult(outcome, passed, total, error, seconds)


def _count(parts) -> int:
  return sum(1 for is_test, _ in parts if is_test)


def _feed_and_wait(proc: subprocess.Popen, job: bytes, deadline: float) -> bool:
  """Sends the job, waits for the exit until `deadline`, then kills the whole
  process group (leftover children too); True if the deadline passed."""
  try:
    proc.stdin.write(job)
    proc.stdin.close()
  except BrokenPipeError:
    pass
  # pidfd: wait without reaping, so the group id cannot be reused before killpg.
  pidfd = os.pidfd_open(proc.pid)
  try:
    exited = bool(select.select([pidfd], [], [], max(deadline - time.monotonic(), 0))[0])
  finally:
    os.close(pidfd)
  if not exited:
    # Kill the wrapper's children first (with namespaces, the namespace's init,
    # whose death ends every process in it), so that `unshare` lives to reap
    # them; killed together, the init would be left a zombie for the host's init.
    for child in _children(proc.pid):
      try:
        os.kill(child, signal.SIGKILL)
      except ProcessLookupError:
        pass
    try:
      proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
      pass
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in the group
  except ProcessLookupError:
    pass
  proc.wait()
  return not exited


def _children(pid: int) -> list[int]:
  found = []
  for entry in os.scandir('/proc'):
    if entry.name.isdigit():
      try:
        with open(f'/proc/{entry.name}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except (OSError, IndexError):
        continue
      if int(fields[1]) == pid:
        found.append(int(entry.name))
  return found


def _read_report(fd: int, nonce: str) -> tuple[bool, dict | None]:
  """(whether the harness started, its final report or None)."""
  os.set_blocking(fd, False)
  data = b''
  while len(data) < (1 << 20):
    try:
      chunk = os.read(fd, 65536)
    except BlockingIOError:
      break  # a writer escaped the kill (no PID namespace); do not wait for it
    if not chunk:
      break
    data += chunk
  lines = []
  for line in data.splitlines():
    try:
      lines.append(json.loads(line))
    except ValueError:
      lines.append(None)
  ours = [x for x in lines if isinstance(x, dict) and x.get('nonce') == nonce]
  started = bool(ours) and ours[0].get('started') is True
  report = ours[-1] if len(ours) >= 2 and 'passed' in ours[-1] else None
  return started, report


def _tasks_of(uid: int) -> int:
  """Threads and processes owned by `uid` (RLIMIT_NPROC counts them all)."""
  count = 0
  for entry in os.scandir('/proc'):
    if not entry.name.isdigit():
      continue
    try:
      with open(f'/proc/{entry.name}/status') as f:
        fields = dict(line.split(':', 1) for line in f if ':' in line)
      if int(fields['Uid'].split()[0]) == uid:
        count += int(fields['Threads'])
    except (OSError, KeyError, ValueError):
      continue
  return count
