"""The local launcher (jpost/launch.py), with throwaway child modules."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

_JAX_CHILD = '''
import os, sys
import jax
jax.distributed.initialize(num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                           process_id=int(os.environ['JAX_PROCESS_ID']))
print(f'process {jax.process_index()} of {jax.process_count()}, '
      f'{jax.local_device_count()} of {jax.device_count()} devices, args {sys.argv[1:]}')
print('on stderr', file=sys.stderr)
'''

_FAILING_CHILD = '''
import os, pathlib, sys, time
pid_file = pathlib.Path(sys.argv[1])
if os.environ['JAX_PROCESS_ID'] == '1':
  while not pid_file.exists():  # fail once the sleeper is up
    time.sleep(0.05)
  sys.exit(3)
pid_file.write_text(str(os.getpid()))
time.sleep(1000)
'''


def _launch(tmp_path, *args, child: str = '', timeout: float = 60):
  if child:
    (tmp_path / 'launch_child.py').write_text(textwrap.dedent(child))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path), *filter(None, [os.environ.get('PYTHONPATH')])]))
  return subprocess.run([sys.executable, '-m', 'jpost.launch', *args], capture_output=True,
                        text=True, timeout=timeout, env=env)


def test_two_processes_see_every_device(tmp_path):
  proc = _launch(tmp_path, '--processes', '2', '--devices-per-process', '4',
                 '--module', 'launch_child', '--', '--x=1', child=_JAX_CHILD)
  assert proc.returncode == 0, proc.stderr[-3000:]
  flag = "'--config.distributed.enabled=True'"
  assert sorted(proc.stdout.splitlines()) == [
      f"[p0] process 0 of 2, 4 of 8 devices, args ['--x=1', {flag}]",
      f"[p1] process 1 of 2, 4 of 8 devices, args ['--x=1', {flag}]"]
  assert '[p0] on stderr' in proc.stderr and '[p1] on stderr' in proc.stderr


def test_a_failure_ends_the_run_with_its_status(tmp_path):
  pid_file = tmp_path / 'sleeper.pid'
  start = time.monotonic()
  proc = _launch(tmp_path, '--processes', '2', '--timeout-s', '1', '--module', 'launch_child',
                 '--', str(pid_file), child=_FAILING_CHILD, timeout=30)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert time.monotonic() - start < 15  # the sleeper got SIGTERM after 1 s
  assert 'process(es) [0] still running 1 s after the first failure: SIGTERM' in proc.stderr
  with pytest.raises(ProcessLookupError):  # the sleeper is gone
    os.kill(int(pid_file.read_text()), 0)


def test_usage_error_is_one_line(tmp_path):
  proc = _launch(tmp_path, '--processes', '2', '--')
  assert proc.returncode == 2
  assert proc.stdout == ''
  assert proc.stderr.startswith('jpost.launch: error: give the arguments for jpost.main')
  assert proc.stderr.count('\n') == 1
