"""`score`: runs every reward source on a batch so that no reward can stop a run.

Each call runs in its own daemon thread with a per-call timeout. A call that
raises, times out, or returns NaN/inf or a non-number is a counted failure:
its value is NaN in `per_source` and 0 in `total`. A Python thread cannot be
killed, so a timed-out call is abandoned (it keeps running in the background
and its late result is ignored); the rewards that can truly hang (math-verify,
the code sandbox) run in subprocesses that are killed for real.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import numbers
import queue
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from jpost.rewards.registry import RewardFailure, Scored, Source, StepScored

log = logging.getLogger('jpost.rewards')

FAILURE_KINDS = ('raised', 'timeout', 'nan', 'bad_type')

_abandoned: set[threading.Thread] = set()  # timed-out calls still running


@dataclasses.dataclass
class ScoreResult:
  total: np.ndarray  # [N] float32: sum of weight * value, a failed value counts 0
  per_source: dict[str, np.ndarray]  # name -> [N] float32, NaN where it failed
  failures: dict[str, dict[str, int]]  # name -> kind -> count in this call
  stats: dict[str, dict[str, float]]  # name -> stat -> mean over reporting calls
  # name -> per completion (step end offsets, step rewards), for the sources
  # that score steps (StepScored); absent where the source failed.
  steps: dict[str, list]
  errors: dict[str, str]  # name -> first error message of this call
  seconds: float

  def failed(self) -> int:
    """Failed calls of this call's every source, whatever their kind."""
    return sum(sum(kinds.values()) for kinds in self.failures.values())

  def metrics(self) -> dict[str, float]:
    """Flat metrics for logging; a mean over no valid values is NaN."""
    out = {}
    for name, values in self.per_source.items():
      valid = values[np.isfinite(values)]
      out[f'reward/{name}/mean'] = float(valid.mean()) if valid.size else math.nan
      out[f'reward/{name}/std'] = float(valid.std()) if valid.size else math.nan
      out[f'reward/{name}/failures'] = sum(self.failures[name].values())
      for kind, count in self.failures[name].items():
        if count:
          out[f'reward/{name}/failures/{kind}'] = count
      for stat, value in self.stats[name].items():
        out[f'reward/{name}/{stat}'] = value
    out['reward/total/mean'] = float(self.total.mean()) if self.total.size else math.nan
    out['reward/total/std'] = float(self.total.std()) if self.total.size else math.nan
    out['reward/seconds'] = self.seconds
    out['reward/abandoned_threads'] = abandoned_threads()
    return out


def abandoned_threads() -> int:
  """How many timed-out reward calls are still running in the background."""
  for thread in [t for t in _abandoned if not t.is_alive()]:
    _abandoned.discard(thread)
  return len(_abandoned)


def score(sources: Sequence[Source], prompts: Sequence[str], completions: Sequence[str],
          rows: Sequence[Mapping]) -> ScoreResult:
  """Runs all sources on N completions; always returns, whatever fails."""
  n = len(completions)
  if len(prompts) != n or len(rows) != n:
    raise ValueError(f'score(): {len(prompts)} prompts, {n} completions and {len(rows)} '
                     'rows; pass one prompt and one dataset row per completion.')
  if not sources:
    raise ValueError('score(): no reward sources; build them with rewards.build(config).')
  start = time.perf_counter()
  batch = _Batch(sources, list(prompts), list(completions), list(rows))
  batch.run()
  total = np.zeros(n, np.float64)
  for source in sources:
    values = batch.values[source.name]
    total += source.weight * np.where(np.isfinite(values), values, 0.0)
  stats = {name: {stat: sums[stat] / batch.stat_counts[name][stat] for stat in sums}
           for name, sums in batch.stat_sums.items()}
  return ScoreResult(
      total=total.astype(np.float32),
      per_source={name: v.astype(np.float32) for name, v in batch.values.items()},
      failures={name: dict(c) for name, c in batch.failures.items()},
      stats=stats, steps=batch.steps, errors=batch.errors,
      seconds=time.perf_counter() - start)


class _Batch:
  """The scheduler of one score() call: starts up to `concurrency` calls per
  source, collects results from a queue, abandons calls past their deadline."""

  def __init__(self, sources, prompts, completions, rows):
    self.sources = sources
    self.prompts, self.completions, self.rows = prompts, completions, rows
    n = len(completions)
    self.values = {s.name: np.full(n, np.nan, np.float64) for s in sources}
    self.failures = {s.name: collections.Counter({k: 0 for k in FAILURE_KINDS})
                     for s in sources}
    self.stat_sums = {s.name: collections.defaultdict(float) for s in sources}
    self.stat_counts = {s.name: collections.defaultdict(int) for s in sources}
    self.errors: dict[str, str] = {}
    self.steps: dict[str, list] = {}
    self.pending = {s.name: collections.deque([None] if s.batched else range(n))
                    for s in sources}
    self.results: queue.SimpleQueue = queue.SimpleQueue()
    self.active: dict[tuple[str, int | None], tuple[float, threading.Thread]] = {}

  def run(self):
    by_name = {s.name: s for s in self.sources}
    in_flight = collections.Counter()
    while True:
      for source in self.sources:
        todo = self.pending[source.name]
        while todo and in_flight[source.name] < source.concurrency:
          in_flight[source.name] += self._start(source, todo.popleft())
      if not self.active:
        return
      now = time.monotonic()
      wait = min(deadline for deadline, _ in self.active.values()) - now
      try:
        key, status, payload = self.results.get(timeout=max(wait, 0.0))
      except queue.Empty:
        now = time.monotonic()
        for key, (deadline, thread) in list(self.active.items()):
          if deadline <= now:
            del self.active[key]
            in_flight[key[0]] -= 1
            _abandoned.add(thread)
            source = by_name[key[0]]
            self._fail(source, key[1], 'timeout',
                       f'call exceeded its timeout of {source.timeout:g}s')
        continue
      if key not in self.active:
        continue  # late result of a call already counted as a timeout
      del self.active[key]
      in_flight[key[0]] -= 1
      try:
        self._record(by_name[key[0]], key[1], status, payload)
      except Exception as e:  # noqa: BLE001 -- a strange return value is counted too
        self._fail(by_name[key[0]], key[1], 'bad_type', f'unusable return value: {e!r}')

  def _start(self, source: Source, index: int | None) -> bool:
    if source.batched:
      args = (self.prompts, self.completions)
    else:
      args = (self.prompts[index], self.completions[index], self.rows[index])
    key = (source.name, index)
    thread = threading.Thread(target=_call, args=(key, source.fn, args, self.results),
                              name=f'reward-{source.name}', daemon=True)
    try:
      thread.start()
    except RuntimeError as e:  # the process is out of threads (many abandoned calls?)
      self._fail(source, index, 'raised', f'could not start a thread: {e}')
      return False
    self.active[key] = (time.monotonic() + source.timeout, thread)
    return True

  def _fail(self, source: Source, index: int | None, kind: str, message: str, count=None,
            exc: BaseException | None = None):
    if count is None:
      count = len(self.completions) if index is None else 1
    self.failures[source.name][kind] += count
    if source.name not in self.errors:  # log the first failure of each source per call
      where = 'the batch' if index is None else f'completion {index}'
      self.errors[source.name] = f'{kind}: {message} ({where})'
      log.warning('reward %r failed on %s: %s: %s', source.name, where, kind, message,
                  exc_info=exc)

  def _record(self, source: Source, index: int | None, status: str, payload):
    if status == 'failure':
      self._fail(source, index, payload.kind, str(payload))
    elif status == 'raised':
      self._fail(source, index, 'raised', f'{type(payload).__name__}: {payload}',
                 exc=payload)
    elif source.batched:
      self._record_batch(source, payload)
    else:
      value, stats = _as_value(payload)
      if value is None:
        self._fail(source, index, 'bad_type',
                   f'returned {type(payload).__name__}, expected a float')
      elif not math.isfinite(value):
        self._fail(source, index, 'nan', f'returned {value}')
      else:
        self.values[source.name][index] = value
        for stat, x in stats.items():
          if not math.isfinite(x):
            continue
          self.stat_sums[source.name][stat] += float(x)
          self.stat_counts[source.name][stat] += 1

  def _record_batch(self, source: Source, payload):
    n = len(self.completions)
    steps = None
    if isinstance(payload, StepScored):
      if len(payload.steps) != n:
        self._fail(source, None, 'bad_type', f'returned steps for {len(payload.steps)} '
                   f'completions, expected {n}')
        return
      for stat, x in payload.stats.items():
        if math.isfinite(x):
          self.stat_sums[source.name][stat] += float(x)
          self.stat_counts[source.name][stat] += 1
      steps, payload = payload.steps, payload.values
    try:
      values = np.asarray(payload, dtype=np.float64)
    except (TypeError, ValueError):
      values = None
    if values is None or values.shape != (n,):
      shape = None if values is None else values.shape
      self._fail(source, None, 'bad_type', f'returned {type(payload).__name__} of shape '
                 f'{shape}, expected an array of shape ({n},)')
      return
    finite = np.isfinite(values)
    if not finite.all():
      self._fail(source, int(np.argmin(finite)), 'nan', 'returned NaN or inf',
                 count=int((~finite).sum()))
    self.values[source.name] = np.where(finite, values, np.nan)
    if steps is not None:  # a completion whose value failed credits no step
      self.steps[source.name] = [row if ok else ([], []) for row, ok in zip(steps, finite)]


def _as_value(payload) -> tuple[float | None, Mapping[str, float]]:
  stats = {}
  if isinstance(payload, Scored):
    payload, stats = payload.value, {key: float(x) for key, x in payload.stats.items()}
  if isinstance(payload, numbers.Real) or (isinstance(payload, np.ndarray)
                                           and payload.shape == ()):
    return float(payload), stats
  return None, stats


def _call(key, fn, args, results: queue.SimpleQueue):
  try:
    results.put((key, 'ok', fn(*args)))
  except RewardFailure as e:
    results.put((key, 'failure', e))
  except BaseException as e:  # noqa: BLE001 -- any error of a reward is counted
    results.put((key, 'raised', e))
