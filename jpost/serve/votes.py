"""The Arena's votes: a SQLite store safe under concurrent writers, and the
exports that feed training and evaluation.

  votes -> preference rows {prompt, chosen, rejected} (chat messages), what
           configs/reward.py and configs/dpo.py read; ties and both-bad votes
           carry no preference: they are counted and left out.
  votes -> battles {model_a, model_b, winner}, the battle log jpost.eval's
           leaderboard rates.

Each operation opens its own connection (SQLite connections are not shared
across threads); the database is in WAL mode with a busy timeout, so many
writers wait their turn instead of failing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import pathlib
import sqlite3
import time

VOTES = ('model_a', 'model_b', 'tie', 'both_bad')  # jpost.eval.battles.WINNERS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  time REAL NOT NULL,
  session TEXT NOT NULL,
  prompt TEXT NOT NULL,
  model_a TEXT NOT NULL,
  model_b TEXT NOT NULL,
  answer_a TEXT NOT NULL,
  answer_b TEXT NOT NULL,
  vote TEXT NOT NULL CHECK (vote IN ('model_a', 'model_b', 'tie', 'both_bad'))
)"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Vote:
  prompt: str
  model_a: str
  model_b: str
  answer_a: str
  answer_b: str
  vote: str
  session: str
  time: float = 0.0

  def __post_init__(self):
    if self.vote not in VOTES:
      raise ValueError(f'vote {self.vote!r} is not one of {VOTES}.')


class VoteStore:
  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self._connect() as db:
      db.execute('PRAGMA journal_mode=WAL')
      db.execute(_SCHEMA)

  @contextlib.contextmanager
  def _connect(self):
    db = sqlite3.connect(self.path, timeout=30)
    try:
      db.execute('PRAGMA busy_timeout=30000')
      with db:  # one transaction: committed on success, rolled back on error
        yield db
    finally:
      db.close()

  def add(self, vote: Vote) -> int:
    """Stores a vote (its time now if it has none); returns its id."""
    with self._connect() as db:
      cursor = db.execute(
          'INSERT INTO votes (time, session, prompt, model_a, model_b, answer_a, answer_b, vote) '
          'VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
          (vote.time or time.time(), vote.session, vote.prompt, vote.model_a, vote.model_b,
           vote.answer_a, vote.answer_b, vote.vote))
      return cursor.lastrowid

  def all(self) -> list[Vote]:
    with self._connect() as db:
      rows = db.execute('SELECT prompt, model_a, model_b, answer_a, answer_b, vote, session, time '
                        'FROM votes ORDER BY id').fetchall()
    return [Vote(prompt=r[0], model_a=r[1], model_b=r[2], answer_a=r[3], answer_b=r[4],
                 vote=r[5], session=r[6], time=r[7]) for r in rows]


def vote_counts(votes: list[Vote]) -> dict[str, int]:
  counts = collections.Counter(v.vote for v in votes)
  return {name: counts.get(name, 0) for name in VOTES} | {'total': len(votes)}


def preference_rows(votes: list[Vote]) -> tuple[list[dict], dict[str, int]]:
  """(rows {prompt, chosen, rejected} as chat messages, counts of what was
  kept and left out)."""
  rows = []
  for v in votes:
    if v.vote not in ('model_a', 'model_b'):
      continue
    chosen, rejected = (v.answer_a, v.answer_b) if v.vote == 'model_a' else (v.answer_b, v.answer_a)
    rows.append({'prompt': [{'role': 'user', 'content': v.prompt}],
                 'chosen': [{'role': 'assistant', 'content': chosen}],
                 'rejected': [{'role': 'assistant', 'content': rejected}]})
  counts = vote_counts(votes)
  return rows, {'pairs': len(rows), 'ties_left_out': counts['tie'],
                'both_bad_left_out': counts['both_bad']}


def battle_rows(votes: list[Vote]) -> list[dict]:
  """The battle log of jpost.eval.battles (a vote for A is a win of model_a)."""
  return [{'model_a': v.model_a, 'model_b': v.model_b, 'winner': v.vote, 'prompt': v.prompt}
          for v in votes]


def write_jsonl(rows: list[dict], path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  return path
