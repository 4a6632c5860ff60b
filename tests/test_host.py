"""The host process's memory (jpost/host.py): when the command-line entry
points restart themselves with glibc's malloc asking for huge pages, and
that the restarted process gets them."""

import os
import subprocess
import sys

import pytest

from jpost import host

MADVISE_GLIBC = ('madvise', 'glibc')


@pytest.mark.parametrize('environ, mode_libc, recipe, want', [
    ({}, MADVISE_GLIBC, 'sft', host.TUNABLE),
    ({}, MADVISE_GLIBC, 'dpo', host.TUNABLE),
    ({}, MADVISE_GLIBC, 'grpo', None),  # many programs: their 2 MB faults cost more than they earn
    ({}, MADVISE_GLIBC, 'chat', None),
    ({}, MADVISE_GLIBC, None, None),  # a config without a recipe: its error comes without a restart
    ({'JPOST_HUGE_PAGES': '1'}, MADVISE_GLIBC, 'grpo', host.TUNABLE),  # asked for every recipe
    ({'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=9'}, MADVISE_GLIBC, 'sft',
     f'glibc.malloc.trim_threshold=9:{host.TUNABLE}'),  # the user's tunables kept
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, MADVISE_GLIBC, 'sft', None),  # the user's choice stands
    ({'GLIBC_TUNABLES': host.TUNABLE}, MADVISE_GLIBC, 'sft', None),  # restarted already: no loop
    ({'JPOST_HUGE_PAGES': '0'}, MADVISE_GLIBC, 'sft', None),
    ({'JPOST_HUGE_PAGES': '1'}, ('always', 'glibc'), 'sft', None),  # the kernel gives them unasked
    ({}, ('always', 'glibc'), 'sft', None),
    ({}, ('never', 'glibc'), 'sft', None),
    ({}, (None, 'glibc'), 'sft', None),  # no transparent huge pages to read (not Linux)
    ({}, ('madvise', ''), 'sft', None),  # not glibc (musl ignores the tunable)
])
def test_when_the_environment_asks_for_huge_pages(environ, mode_libc, recipe, want):
  env = host.huge_page_env(environ, *mode_libc, recipe)
  if want is None:
    assert env is None
  else:
    assert env == dict(environ, GLIBC_TUNABLES=want)


_CHILD = """
import ctypes, json, os, sys
from jpost import host
host.restart_with_huge_pages('sft')
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)  # 64 MB from malloc, as XLA's buffers are (not numpy's,
ctypes.memset(block, 1, 64 << 20)  # which asks the kernel for huge pages itself)
huge_kb = sum(int(line.split()[1]) for line in open('/proc/self/smaps')
              if line.startswith('AnonHugePages:'))
print(json.dumps([os.environ.get('GLIBC_TUNABLES'), os.getpid(), sys.argv[1:], huge_kb]))
"""


def test_the_restarted_process_gets_huge_pages():
  """Same process id and arguments, the tunable set once, and the kernel's
  huge pages under a 64 MB buffer, where this machine gives them on
  request; where it gives them unasked or never, no restart."""
  import json
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'JPOST_HUGE_PAGES')}
  child = subprocess.Popen([sys.executable, '-c', _CHILD, 'a', '--b=c'], env=env,
                           stdout=subprocess.PIPE, text=True)
  out, _ = child.communicate(timeout=120)
  assert child.returncode == 0
  tunables, pid, args, huge_kb = json.loads(out)
  assert pid == child.pid and args == ['a', '--b=c']
  if host.thp_mode() == 'madvise' and host.libc() == 'glibc':
    assert tunables == host.TUNABLE
    assert huge_kb >= 32 << 10, f'{huge_kb} kB of huge pages under a 64 MB buffer'
  else:
    assert tunables is None
