"""The 'code' reward: run the completion's program against the row's tests
in the sandbox (`jpost.rewards.sandbox`)."""

from __future__ import annotations

import os
import re

from jpost.rewards import sandbox
from jpost.rewards.registry import Scored, register_factory

MODES = ('fraction', 'all')
OUTCOMES = ('passed', 'failed', 'error', 'timeout', 'crashed')
_FENCE = re.compile(r'```[ \t]*(python3?|py)?[ \t]*\n(.*?)```', re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
  """The last ```python (or ```py, or unlabelled) fenced block, else the
  whole completion."""
  blocks = _FENCE.findall(completion)
  return blocks[-1][1] if blocks else completion


@register_factory('code', timeout=60.0, concurrency=max(1, min(4, os.cpu_count() or 1)))
def code_reward(*, tests_key: str = 'tests', mode: str = 'fraction',
                wall_seconds: float = 10.0, cpu_seconds: int = 10, memory_mb: int = 1024,
                processes: int = 32, python: str | None = None):
  """Reward = fraction of the row's tests passed (mode='fraction', the
  default: a denser signal for RL) or 1.0 only if all pass (mode='all').

  Tests are Python statements in `row[tests_key]`; each top-level assert is
  one test. A program that raises, times out, or dies scores 0.0: that is a
  property of the completion, not a failure of the reward, so it is counted
  in the stats 'passed', 'failed', 'error', 'timeout', 'crashed' (fractions
  of the completions) rather than in `failures`. Keep the source's runner
  timeout (default 60 s) above `wall_seconds`.
  """
  if mode not in MODES:
    raise ValueError(f'code reward: mode={mode!r}; use one of {MODES}.')
  limits = sandbox.Limits(wall_seconds=wall_seconds, cpu_seconds=cpu_seconds,
                          memory_mb=memory_mb, processes=processes)
  python = sandbox.sandbox_python(python)  # probe now: a broken set-up fails the build

  def reward(prompt: str, completion: str, row) -> Scored:
    if tests_key not in row:
      raise KeyError(f'dataset row has no {tests_key!r} column (it has {sorted(row)}); '
                     "set the code reward's tests_key option.")
    result = sandbox.run_tests(extract_code(completion), row[tests_key], limits=limits,
                               python=python)
    if mode == 'fraction':
      value = result.passed / result.total
    else:
      value = float(result.passed == result.total)
    stats = {outcome: float(result.outcome == outcome) for outcome in OUTCOMES}
    return Scored(value, stats | {'seconds': result.seconds})
  return reward
