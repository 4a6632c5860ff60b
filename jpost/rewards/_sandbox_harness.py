"""Runs one untrusted program and its tests; started by `jpost.rewards.sandbox`.

    python -I _sandbox_harness.py RESULT_FD

Reads a JSON job from stdin: {"nonce", "code", "tests": [[is_test, source]],
"limits": {"RLIMIT_...": n}, "uid": int | null}. Before any untrusted code
runs it sets the resource limits (soft = hard), drops to `uid` when started
as root, and replaces the socket constructors with functions that raise.
Then it executes the code and, unless that raised, each test statement, in
one namespace, and
writes {"nonce", "passed", "total", "error"} to RESULT_FD, after a first
line {"nonce", "started": true} that tells the parent the sandbox started. Only the original
process reports: a copy made by os.fork() in the program exits silently.
"""

import json
import os
import resource
import sys


def _limit(limits: dict) -> None:
  for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))


def _drop_privileges(uid: int) -> None:
  os.setgroups([])
  os.setgid(uid)
  os.setuid(uid)


def _block_network() -> None:
  import _socket
  import socket

  def refuse(*args, **kwargs):
    raise PermissionError('network access is disabled in the code sandbox')

  for module in (socket, _socket):
    for name in ('socket', 'SocketType', 'socketpair', 'fromfd', 'create_connection',
                 'create_server', 'getaddrinfo', 'gethostbyname', 'gethostbyname_ex',
                 'gethostbyaddr'):
      if hasattr(module, name):
        setattr(module, name, refuse)


def _run(code: str, tests: list) -> tuple[int, int, str | None]:
  namespace = {'__name__': '__main__', '__builtins__': __builtins__}
  error = None
  try:
    exec(compile(code, 'solution.py', 'exec'), namespace)
  except BaseException as e:  # noqa: BLE001 -- SystemExit and MemoryError too
    error = type(e).__name__
  total = sum(1 for is_test, _ in tests if is_test)
  if error is not None:
    return 0, total, error  # a program that crashes fails every test
  passed = 0
  for is_test, source in tests:
    try:
      exec(compile(source, 'tests.py', 'exec'), namespace)
      passed += is_test
    except BaseException:  # noqa: BLE001 -- a failed test, whatever it raised
      pass
  return passed, total, error


def main() -> None:
  job = json.loads(sys.stdin.read())
  sys.stdin.close()
  out = os.fdopen(int(sys.argv[1]), 'w')
  nonce = job['nonce']
  out.write(json.dumps({'nonce': nonce, 'started': True}) + '\n')
  out.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)  # stderr so far told the parent why a start failed; now discard it
  os.close(devnull)
  _limit(job['limits'])
  if job['uid'] is not None:
    _drop_privileges(job['uid'])
  _block_network()
  owner = os.getpid()
  passed, total, error = _run(job['code'], job['tests'])
  if os.getpid() != owner:
    os._exit(0)
  out.write(json.dumps({'nonce': nonce, 'passed': passed, 'total': total, 'error': error}))
  out.flush()
  os._exit(0)


if __name__ == '__main__':
  main()
