"""The code reward and its sandbox: hostile programs fail quickly and are counted."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jpost import rewards
from jpost.rewards import coding, sandbox

TESTS = 'assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4'
FAST = sandbox.Limits(wall_seconds=1.5, cpu_seconds=2)


def _score(completions, tests=TESTS, **options):
  sources = rewards.build({'code': {'wall_seconds': 1.5, 'cpu_seconds': 2, **options}})
  n = len(completions)
  return rewards.score(sources, ['q'] * n, completions, [{'tests': tests}] * n)


@pytest.mark.parametrize('completion, expected', [
    ('Here:\n```python\ndef f(): return 1\n```\nand better:\n```python\ndef f(): return 2\n```',
     'def f(): return 2\n'),
    ('```py\nx = 1\n```', 'x = 1\n'),
    ('```\nx = 2\n```', 'x = 2\n'),
    ('```js\nlet x = 3\n```', '```js\nlet x = 3\n```'),
    ('x = 4', 'x = 4'),
])
def test_extract_code(completion, expected):
  assert coding.extract_code(completion) == expected


def test_split_tests():
  parts = sandbox.split_tests('import math\nassert math.pi > 3\n\ndef g():\n  return 1\nassert g()')
  assert parts == [(False, 'import math'), (True, 'assert math.pi > 3'),
                   (False, 'def g():\n  return 1'), (True, 'assert g()')]
  assert sandbox.split_tests('check(add)') == [(True, 'check(add)')]
  with pytest.raises(ValueError, match='do not parse'):
    sandbox.split_tests('assert (')


def test_rewards_fraction_and_all():
  good = '```python\ndef add(a, b):\n  return a + b\n```'
  partial = 'def add(a, b):\n  return a + b if a != 2 else 0'
  result = _score([good, partial])
  np.testing.assert_allclose(result.per_source['code'], [1.0, 2 / 3])
  result = _score([good, partial], mode='all')
  np.testing.assert_array_equal(result.per_source['code'], [1.0, 0.0])
  metrics = result.metrics()
  assert metrics['reward/code/passed'] == 0.5
  assert metrics['reward/code/failed'] == 0.5


HOSTILE = {
    'socket': 'import socket\nsocket.create_connection(("1.1.1.1", 80), timeout=1)\n'
              'def add(a, b):\n  return a + b',
    'fork_bomb': 'import os\nwhile True:\n  os.fork()',
    'infinite_loop': 'while True:\n  pass',
    'ten_gb': 'memory = bytearray(10 * 1024 ** 3)\ndef add(a, b):\n  return a + b',
    'sleeps': 'import time\ntime.sleep(60)',
    'exits_early': 'import os\nos._exit(0)',
}


@pytest.mark.parametrize('name', sorted(HOSTILE))
def test_hostile_programs_fail_quickly(name):
  start = time.perf_counter()
  result = sandbox.run_tests(HOSTILE[name], TESTS, limits=FAST)
  assert time.perf_counter() - start < FAST.wall_seconds + 2
  assert result.passed == 0
  expected = {'socket': 'error', 'fork_bomb': 'error', 'ten_gb': 'error', 'sleeps': 'timeout',
              'infinite_loop': 'timeout', 'exits_early': 'crashed'}[name]
  assert result.outcome == expected, result


def test_hostile_batch_is_scored_and_counted():
  good = 'def add(a, b):\n  return a + b'
  completions = [HOSTILE['socket'], HOSTILE['fork_bomb'], HOSTILE['infinite_loop'],
                 HOSTILE['ten_gb'], good]
  start = time.perf_counter()
  result = _score(completions)
  assert time.perf_counter() - start < 1.5 + 3  # the programs run side by side
  np.testing.assert_array_equal(result.per_source['code'], [0, 0, 0, 0, 1])
  assert sum(result.failures['code'].values()) == 0  # bad programs score 0, not NaN
  metrics = result.metrics()
  assert metrics['reward/code/error'] == pytest.approx(3 / 5)
  assert metrics['reward/code/timeout'] == pytest.approx(1 / 5)
  assert metrics['reward/code/passed'] == pytest.approx(1 / 5)


def _sandbox_processes():
  pids = []
  for entry in os.scandir('/proc'):
    if entry.name.isdigit():
      try:
        with open(f'/proc/{entry.name}/status') as f:
          uid = next(int(line.split()[1]) for line in f if line.startswith('Uid:'))
      except (OSError, StopIteration):
        continue
      if sandbox.SANDBOX_UID_BASE <= uid < sandbox.SANDBOX_UID_BASE + sandbox.MAX_PARALLEL:
        pids.append(int(entry.name))
  return pids


def test_parent_unharmed_after_fork_bomb():
  program = 'import os, time\nfor _ in range(5):\n  if os.fork() == 0:\n    time.sleep(60)\n' \
            'while True:\n  os.fork()'
  result = sandbox.run_tests(program, TESTS, limits=FAST)
  assert result.outcome == 'error' and result.error == 'BlockingIOError'
  time.sleep(0.2)
  assert _sandbox_processes() == []  # the sleeping children died with the sandbox
  assert subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True).stdout == b'1\n'


@pytest.mark.skipif(not sandbox.isolation(), reason='no network namespace on this machine')
def test_network_namespace_stops_a_program_that_restores_sockets():
  """Re-importing `socket` undoes the harness's socket patch; the network
  namespace still leaves nothing to connect to, not even this host."""
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    port = server.getsockname()[1]
    program = ('import sys\nfor name in ("socket", "_socket"):\n  sys.modules.pop(name, None)\n'
               'import socket\n'
               f'def connect():\n  socket.create_connection(("127.0.0.1", {port}), 1).close()\n'
               '  return True')
    tests = 'assert connect()'
    result = sandbox.run_tests(program, tests, limits=FAST)
    assert result.outcome == 'failed', result
    patched = 'from jpost.rewards import _sandbox_harness\n_sandbox_harness._block_network()\n'
    unsandboxed = subprocess.run([sys.executable, '-c', patched + program + '\n' + tests],
                                 capture_output=True, timeout=10)
    assert unsandboxed.returncode == 0, unsandboxed.stderr  # the patch alone is not enough


def test_missing_tests_column_is_a_counted_failure():
  sources = rewards.build({'code': {}})
  result = rewards.score(sources, ['q'], ['x = 1'], [{'answer': '1'}])
  assert result.failures['code']['raised'] == 1
  assert "no 'tests' column" in result.errors['code']


def test_a_sandbox_that_cannot_start_is_an_error_not_a_zero_reward():
  with pytest.raises(sandbox.SandboxError, match='did not start'):
    sandbox.run_tests('x = 1', 'assert x', python='/nonexistent/python')
  with pytest.raises(RuntimeError, match='no Python interpreter runs inside the code sandbox'):
    rewards.build({'code': {'python': '/nonexistent/python'}})
