"""Reward sources by name, and `build(config)` turning a config into sources.

Three kinds of registration:

  @register('name')            fn(prompt, completion, row, **options) -> float
                               (options from the config are passed on each call)
  @register_factory('name')    factory(**options) -> fn(prompt, completion, row)
                               (built once per run: a judge client, a spec)
  register_scorer('name', s)   s(prompts, completions) -> np.ndarray [N]
                               (one call for the whole batch: a reward model)

A function may return a float or a `Scored(value, stats)`; it signals a
counted failure of a named kind by raising `RewardFailure(kind)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from jpost.errors import ConfigError

# Per-source options read by the runner, never passed to the reward function.
RUNNER_OPTIONS = ('weight', 'timeout', 'concurrency')


class RewardFailure(Exception):
  """Raised by a reward function for a counted failure of kind `kind`
  (e.g. 'timeout', 'invalid_json'); the completion's value becomes NaN."""

  def __init__(self, kind: str, message: str = ''):
    super().__init__(message or kind)
    self.kind = kind


@dataclasses.dataclass(frozen=True)
class Scored:
  """A reward value plus per-completion statistics, logged as
  `reward/{source}/{stat}` averaged over the completions that reported them."""
  value: float
  stats: Mapping[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for key in self.stats:
      if key in ('mean', 'std', 'failures'):
        raise ValueError(f'stat name {key!r} is reserved for the runner; rename it.')


@dataclasses.dataclass(frozen=True)
class StepScored:
  """What a batched step-level source (a process reward model) returns:
  `values` [N], one reward per completion, plus per completion the character
  offsets where its scored steps end and the reward credited at each (they
  sum to its value), so PPO can place them on the steps' last tokens; and
  `stats` logged as `reward/{source}/{stat}`."""
  values: Any
  steps: list
  stats: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Source:
  """One configured reward: what `build` returns and `score` runs."""
  name: str
  fn: Callable
  weight: float = 1.0
  timeout: float = 10.0  # seconds per call (per batch when batched)
  concurrency: int = 1  # calls of this source in flight at once
  batched: bool = False

  def __post_init__(self):
    if not math.isfinite(self.weight):
      raise ConfigError(f'reward {self.name!r}: weight={self.weight} must be finite.')
    if not self.timeout > 0:
      raise ConfigError(f'reward {self.name!r}: timeout={self.timeout} must be > 0 seconds.')
    if int(self.concurrency) != self.concurrency or self.concurrency < 1:
      raise ConfigError(f'reward {self.name!r}: concurrency={self.concurrency} must be an '
                       'integer >= 1.')


@dataclasses.dataclass(frozen=True)
class _Entry:
  make: Callable[..., Callable]  # options -> the callable the runner calls
  signature: inspect.Signature  # what options `make` accepts
  batched: bool
  timeout: float
  concurrency: int


_REGISTRY: dict[str, _Entry] = {}


def _add(name: str, entry: _Entry) -> None:
  if not isinstance(name, str) or not name:
    raise ValueError(f'reward name must be a non-empty string, got {name!r}.')
  if name in _REGISTRY:
    raise ValueError(f'reward {name!r} is registered twice; pick another name.')
  _REGISTRY[name] = entry


def register(name: str, *, timeout: float = 10.0, concurrency: int = 1):
  """Decorator for `fn(prompt, completion, row, **options) -> float`.

  The function runs in a worker thread; with `concurrency` > 1 several calls
  run at once, so it must then be thread-safe.
  """
  def add(fn):
    params = list(inspect.signature(fn).parameters.values())[3:]
    options = inspect.Signature(params)

    def make(**kwargs):
      return functools.partial(fn, **kwargs) if kwargs else fn
    _add(name, _Entry(make, options, False, timeout, concurrency))
    return fn
  return add


def register_factory(name: str, *, batched: bool = False, timeout: float = 10.0,
                     concurrency: int = 1):
  """Decorator for `factory(**options)` returning the function to call:
  `fn(prompt, completion, row)`, or `fn(prompts, completions)` when batched."""
  def add(factory):
    _add(name, _Entry(factory, inspect.signature(factory), batched, timeout, concurrency))
    return factory
  return add


def register_scorer(name: str, scorer: Callable, *, timeout: float = 120.0) -> None:
  """Registers a batch scorer `scorer(prompts, completions) -> np.ndarray [N]`
  (e.g. a reward model loaded by the trainer) under `name`."""
  if not callable(scorer):
    raise TypeError(f'register_scorer({name!r}, ...): scorer must be callable, '
                    f'got {type(scorer).__name__}.')
  _add(name, _Entry(lambda: scorer, inspect.Signature(), True, timeout, 1))


def unregister(name: str) -> None:
  """Removes `name` (tests, notebooks re-running a cell)."""
  _REGISTRY.pop(name, None)


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(config: Any) -> tuple[Source, ...]:
  """Sources from `{name: {option: value}}`; 'weight' (default 1.0),
  'timeout' and 'concurrency' are the runner's, the rest go to the reward."""
  if hasattr(config, 'to_dict'):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise ConfigError('rewards config must be a mapping {name: {option: value}}, got '
                      f'{type(config).__name__}.')
  if not config:
    raise ConfigError(f'rewards config is empty; name at least one of {names()}.')
  sources = []
  for name, options in config.items():
    if name not in _REGISTRY:
      raise ConfigError(f'unknown reward {name!r}; known rewards: {names()} '
                       '(register your own with @jpost.rewards.register).')
    if hasattr(options, 'to_dict'):
      options = options.to_dict()
    if options is None:
      options = {}
    if not isinstance(options, Mapping):
      raise ConfigError(f'reward {name!r}: options must be a mapping, got '
                        f'{type(options).__name__}.')
    entry = _REGISTRY[name]
    options = dict(options)
    runner = {key: options.pop(key) for key in RUNNER_OPTIONS if key in options}
    try:
      entry.signature.bind(**options)
    except TypeError as e:
      accepted = [p for p in entry.signature.parameters if p not in ('args', 'kwargs')]
      raise ConfigError(f'reward {name!r}: {e}; it accepts {accepted} plus '
                       f'{list(RUNNER_OPTIONS)}.') from None
    try:  # a reward's own checks of its option values (a rubric, a mode, a limit)
      fn = entry.make(**options)
    except ValueError as e:
      raise ConfigError(f'reward {name!r}: {e}') from None
    sources.append(Source(
        name=name, fn=fn, batched=entry.batched,
        weight=float(runner.get('weight', 1.0)),
        timeout=float(runner.get('timeout', entry.timeout)),
        concurrency=runner.get('concurrency', entry.concurrency)))
  return tuple(sources)
