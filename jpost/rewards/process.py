"""Process rewards: a process reward model (PRM) scores each step of an answer.

An answer is split into steps at a separator (a newline by default; blank
pieces are not steps). The PRM gives each step the probability that it is
correct so far, and an aggregate turns the step scores into one reward:

  'min'      the weakest step (one wrong step spoils the answer)
  'last'     the last step's score (how sure the PRM is at the end)
  'mean'     the average step
  'product'  the probability that every step is right, if they were independent

For PPO the reward is also given per step (`StepScored`): step k is credited
A(s_1..s_k) - A(s_1..s_{k-1}), with A() = 0, so the step rewards sum to the
aggregate. GAE then credits the step where the aggregate moves (with 'min',
the first step the PRM doubts), and an answer gains nothing by writing more
steps; placing each raw step score on its step would pay for every extra line.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jpost.errors import ConfigError
from jpost.rewards.registry import StepScored, register_factory

AGGREGATES = ('min', 'last', 'mean', 'product')


def split_steps(text: str, separator: str = '\n') -> tuple[list[str], list[int]]:
  """(steps, ends): the non-blank pieces of `text` between separators, with
  surrounding whitespace removed, and the character offset in `text` just
  after each step's last non-blank character."""
  if not separator:
    raise ConfigError('the step separator is empty; use e.g. "\\n".')
  steps, ends, start = [], [], 0
  for piece in text.split(separator):
    stripped = piece.strip()
    if stripped:
      steps.append(stripped)
      ends.append(start + len(piece.rstrip()))
    start += len(piece) + len(separator)
  return steps, ends


def aggregate(scores: Sequence[float], how: str) -> float:
  """One reward from per-step scores in [0, 1]; no steps scores 0."""
  if how not in AGGREGATES:
    raise ConfigError(f'PRM aggregate {how!r} is unknown; use one of {AGGREGATES}.')
  scores = np.asarray(scores, np.float64)
  if scores.size == 0:
    return 0.0
  if how == 'min':
    return float(scores.min())
  if how == 'last':
    return float(scores[-1])
  if how == 'mean':
    return float(scores.mean())
  return float(np.prod(scores))


def step_increments(scores: Sequence[float], how: str) -> np.ndarray:
  """Per-step rewards [S]: the aggregate over steps 1..k minus over 1..k-1
  (the empty aggregate is 0); they sum to `aggregate(scores, how)`."""
  prefix = np.array([aggregate(scores[:k], how) for k in range(len(scores) + 1)])
  return np.diff(prefix)


def score_completions(step_scorer, prompts, completions, *, aggregate_by: str = 'min',
                      separator: str = '\n') -> StepScored:
  """PRM rewards of a batch: split, score every step, aggregate. Steps past
  the scorer's window are not scored (the scorer returns fewer scores)."""
  if aggregate_by not in AGGREGATES:
    raise ConfigError(f'PRM aggregate {aggregate_by!r} is unknown; use one of {AGGREGATES}.')
  split = [split_steps(c, separator) for c in completions]
  has_steps = [i for i, (steps, _) in enumerate(split) if steps]
  scored = step_scorer([prompts[i] for i in has_steps], [split[i][0] for i in has_steps])
  per_row = [np.zeros(0)] * len(completions)
  for i, scores in zip(has_steps, scored):
    per_row[i] = np.asarray(scores, np.float64)
  values = np.array([aggregate(s, aggregate_by) for s in per_row], np.float32)
  steps = [(split[i][1][:len(s)], list(step_increments(s, aggregate_by)))
           for i, s in enumerate(per_row)]
  every = np.concatenate(per_row) if any(s.size for s in per_row) else np.zeros(0)
  stats = {'steps': float(np.mean([s.size for s in per_row])),
           'no_steps': float(np.mean([s.size == 0 for s in per_row]))}
  if every.size:  # the distribution of step scores, logged each step
    for q in (10, 50, 90):
      stats[f'step_score_p{q}'] = float(np.percentile(every, q))
    stats['step_score_mean'] = float(every.mean())
    stats['first_step_score'] = float(np.mean([s[0] for s in per_row if s.size]))
  return StepScored(values=values, steps=steps, stats=stats)


@register_factory('prm', batched=True, timeout=600.0)
def prm(*, path: str, aggregate: str = 'min', separator: str | None = None,
        batch_size: int = 16, max_len: int = 1024):
  """A trained process reward model (`configs/prm.py`'s export) scoring each
  step of the completion; `aggregate` in AGGREGATES makes it one reward.
  Steps are split at `separator`, by default the one the PRM was trained with."""
  if aggregate not in AGGREGATES:
    raise ConfigError(f"reward 'prm': aggregate={aggregate!r} is unknown; use one of "
                      f'{AGGREGATES}.')
  from jpost.models import reward  # lazy: loading a model pulls in JAX
  scorer = reward.load_step_scorer(path, separator=separator or None, batch_size=batch_size,
                                   max_len=max_len)

  def score(prompts, completions):
    return score_completions(scorer, prompts, completions, aggregate_by=aggregate,
                             separator=scorer.separator)
  return score
