"""The host process's memory: transparent huge pages for XLA's CPU buffers.

XLA:CPU takes each step's temporaries from malloc, and glibc serves the
large ones (over 32 MB at most) with fresh mmaps that it unmaps when they are
freed, so every step touches them page by page again: 507k page faults a
step for the SmolLM2 SFT step at 8 x 256 (its [8, 255, 49152] float32
logits alone are 400 MB). Where the kernel gives huge pages only to memory
that asks for them (`transparent_hugepage/enabled` = madvise, a common
default), glibc asks when the tunable `glibc.malloc.hugetlb=1` is set: 1.4k
faults a step, and the step 7-18% faster (bench/RESULTS.md). Peak RSS was
the same.

The same tunable puts every malloc arena on huge pages, and in a virtual
machine a fresh 2 MB page can cost milliseconds of system time (measured:
1,416 huge-page faults, no compaction stall, 6-7 s more system time for a
one-line chat). A training run that repeats one compiled step
earns that back; other runs lose: on the 2-core AMX Xeon the GRPO demo took
398 s with huge pages against 316 s without (system time 233 against 89 s),
a one-line chat 17 s against 10, while configs/sft.py's 24 steps took 94 s
against 98. So they are asked for by the recipes of `HUGE_PAGE_RECIPES`
only.

glibc reads its tunables when the process starts, so the command-line entry
points (`python -m jpost.main`, the SFT benchmarks) start themselves once
more with it set (`restart_with_huge_pages`). JPOST_HUGE_PAGES=0 turns that
off for every recipe, JPOST_HUGE_PAGES=1 on for every recipe.
"""

from __future__ import annotations

import os
import pathlib
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
# The supervised training recipes: one compiled step, run over and over.
HUGE_PAGE_RECIPES = frozenset({'sft', 'dpo', 'reward', 'prm'})
_THP_MODE = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')


def thp_mode() -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'),
  or None where there is none to read (not Linux)."""
  try:
    text = _THP_MODE.read_text()
  except OSError:
    return None
  chosen = [word[1:-1] for word in text.split() if word.startswith('[')]
  return chosen[0] if chosen else None


def libc() -> str:
  """The C library's name ('glibc', or '' where it does not say)."""
  try:
    return (os.confstr('CS_GNU_LIBC_VERSION') or '').split(' ')[0]
  except (ValueError, OSError, AttributeError):
    return ''


def huge_page_env(environ, mode: str | None, libc_name: str,
                  recipe: str | None) -> dict | None:
  """`environ` with glibc's malloc asking for huge pages, or None when there
  is nothing to change: they are asked for already, the C library is not
  glibc, the kernel gives them to all memory ('always') or to none, the
  recipe is not one of `HUGE_PAGE_RECIPES` (unless JPOST_HUGE_PAGES=1), or
  JPOST_HUGE_PAGES=0."""
  asked = environ.get('JPOST_HUGE_PAGES', '')
  wanted = asked == '1' or (asked != '0' and recipe in HUGE_PAGE_RECIPES)
  if not wanted or libc_name != 'glibc' or mode != 'madvise':
    return None
  tunables = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  if any(t.startswith('glibc.malloc.hugetlb=') for t in tunables):
    return None  # set already (by us, once restarted, or by the user: theirs stands)
  return dict(environ, GLIBC_TUNABLES=':'.join([*tunables, TUNABLE]))


def restart_with_huge_pages(recipe: str | None) -> None:
  """Replaces this process with the same command line, huge pages asked for
  (same process id, arguments and open files); returns where there is
  nothing to change (`huge_page_env`). Call it in a command-line entry
  point before JAX allocates anything."""
  env = huge_page_env(os.environ, thp_mode(), libc(), recipe)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
