"""The battle log: the one format pairwise results are exchanged in.

A battle log is a list of dicts in the Chatbot Arena style:

    {'model_a': 'm1', 'model_b': 'm2', 'winner': 'model_a'}

with `winner` one of 'model_a', 'model_b', 'tie', 'both_bad'. Other keys
(prompt ids, judge names, ...) are allowed and ignored. `encode` validates a
log once and turns it into index arrays that the leaderboard and win-rate code
share. For scoring, 'both_bad' is a tie: neither model earned the win.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

WINNERS = ('model_a', 'model_b', 'tie', 'both_bad')
# Score of model_a for each winner value; ties and both_bad are half a win.
SCORE_A = {'model_a': 1.0, 'model_b': 0.0, 'tie': 0.5, 'both_bad': 0.5}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Encoded:
  """A validated battle log as arrays, one entry per battle, in log order.

  `a[i]`, `b[i]` index into `models`; `score_a[i]` is 1, 0 or 0.5;
  `winner[i]` indexes into WINNERS.
  """

  models: tuple[str, ...]
  a: np.ndarray
  b: np.ndarray
  score_a: np.ndarray
  winner: np.ndarray

  def __post_init__(self):
    n = len(self.a)
    for name in ('b', 'score_a', 'winner'):
      if len(getattr(self, name)) != n:
        raise ValueError(f'Encoded: {name} has {len(getattr(self, name))} '
                         f'entries but a has {n}; all arrays need one entry '
                         'per battle')
    if len(set(self.models)) != len(self.models):
      raise ValueError(f'Encoded: models {self.models} has duplicates')

  @property
  def num_battles(self) -> int:
    return len(self.a)

  def counts(self) -> np.ndarray:
    """[m] number of battles each model took part in."""
    m = len(self.models)
    return (np.bincount(self.a, minlength=m) + np.bincount(self.b, minlength=m))


def _model_name(row: dict, key: str, i: int) -> str:
  value = row.get(key)
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f'battle {i}: {key}={value!r} is not a model name (give a '
                     'non-empty string)')
  return value


def encode(battles: Sequence[dict[str, Any]], *,
           models: Sequence[str] | None = None) -> Encoded:
  """Validates a battle log and returns it as arrays.

  Raises ValueError naming the row index and the bad value for: a row that is
  not a dict, a missing/empty model name, a model battling itself, an unknown
  `winner`, and (when `models` is given) a model not in `models`. Without
  `models`, the models are the sorted names seen in the log.
  """
  if isinstance(battles, dict) or not isinstance(battles, Sequence):
    raise TypeError(f'battles is a {type(battles).__name__}; give a list of '
                    "dicts with 'model_a', 'model_b', 'winner'")
  if not battles:
    raise ValueError('battle log is empty: there is nothing to rate')
  if models is not None:
    models = tuple(models)
    if len(set(models)) != len(models):
      raise ValueError(f'models={models} lists a model twice')
    allowed = set(models)
  rows = []
  for i, row in enumerate(battles):
    if not isinstance(row, dict):
      raise ValueError(f'battle {i}: is a {type(row).__name__}, not a dict with '
                       "'model_a', 'model_b', 'winner'")
    model_a = _model_name(row, 'model_a', i)
    model_b = _model_name(row, 'model_b', i)
    if model_a == model_b:
      raise ValueError(f'battle {i}: model {model_a!r} battles itself; drop the '
                       'row or fix the model names')
    winner = row.get('winner')
    if winner not in WINNERS:
      raise ValueError(f'battle {i}: winner={winner!r} is not one of {WINNERS}')
    if models is not None:
      for key, name in (('model_a', model_a), ('model_b', model_b)):
        if name not in allowed:
          raise ValueError(f'battle {i}: {key}={name!r} is not in models='
                           f'{models}; add it to models or drop the row')
    rows.append((model_a, model_b, winner))
  if models is None:
    models = tuple(sorted({r[0] for r in rows} | {r[1] for r in rows}))
  index = {name: j for j, name in enumerate(models)}
  return Encoded(
      models=models,
      a=np.array([index[r[0]] for r in rows], dtype=np.int64),
      b=np.array([index[r[1]] for r in rows], dtype=np.int64),
      score_a=np.array([SCORE_A[r[2]] for r in rows], dtype=np.float64),
      winner=np.array([WINNERS.index(r[2]) for r in rows], dtype=np.int64))


def score_matrix(log: Encoded) -> tuple[np.ndarray, np.ndarray]:
  """(wins, games), both [m, m]: wins[i, j] is i's score against j (ties
  count half to each side), games[i, j] the number of i-vs-j battles."""
  m = len(log.models)
  wins = np.zeros((m, m))
  games = np.zeros((m, m))
  np.add.at(wins, (log.a, log.b), log.score_a)
  np.add.at(wins, (log.b, log.a), 1.0 - log.score_a)
  np.add.at(games, (log.a, log.b), 1.0)
  np.add.at(games, (log.b, log.a), 1.0)
  return wins, games
