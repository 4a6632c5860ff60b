"""Pairwise preference with an LLM judge, vote aggregation and win rates.

A judge compares two responses to one prompt and answers strict JSON,
`{"verdict": "A"|"B"|"tie"|"both_bad", "rationale": "..."}`. Judges prefer a
position (often the first) more than one would like, so `judge_pair` asks
twice with the responses swapped and keeps a win only when both orders agree.

Outcomes name the responses by identity, not position: '1' (the first
response given to `judge_pair`), '2', 'tie', 'both_bad'.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from jpost.eval import battles as battles_lib
from jpost.eval import intervals

VERDICTS = ('A', 'B', 'tie', 'both_bad')
OUTCOMES = ('1', '2', 'tie', 'both_bad')

Chat = Callable[[list[dict[str, str]]], str]

PAIRWISE_PROMPT = """\
You are an impartial judge comparing two AI assistant responses to the same \
user prompt.

Judge which response better serves the user: correctness first, then \
helpfulness, relevance, clarity and appropriate length. Do not let the order \
of the responses, their length or the assistants' names sway you.

[User prompt]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Reply with one JSON object and nothing else:
{{"verdict": "A" | "B" | "tie" | "both_bad", "rationale": "<one or two sentences>"}}
Use "A" or "B" when that response is better, "tie" when both are about \
equally good, and "both_bad" when neither is acceptable."""

_FENCE = re.compile(r'^```(?:json)?[ \t]*\n(.*?)\n?```$', re.DOTALL)


class VerdictError(ValueError):
  """A judge reply that is not the required JSON. `reason` is a short slug
  for counting failures by kind."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def parse_judgement(text: str) -> tuple[str, str]:
  """(verdict, rationale) from a judge reply, or VerdictError.

  Strict: the reply (optionally inside one ```json fence) must be exactly a
  JSON object with the keys 'verdict' (one of VERDICTS, case-sensitive) and
  'rationale' (a string), and no others.
  """
  if not isinstance(text, str):
    raise VerdictError('not_text', f'judge reply is a {type(text).__name__}, '
                       'not a string')
  body = text.strip()
  fenced = _FENCE.match(body)
  if fenced:
    body = fenced.group(1).strip()
  try:
    obj = json.loads(body)
  except json.JSONDecodeError as e:
    raise VerdictError('not_json', f'judge reply is not JSON ({e.msg} at char '
                       f'{e.pos}): {_clip(text)!r}') from None
  if not isinstance(obj, dict):
    raise VerdictError('not_object', f'judge reply is a JSON '
                       f'{type(obj).__name__}, not an object: {_clip(text)!r}')
  missing = [k for k in ('verdict', 'rationale') if k not in obj]
  if missing:
    raise VerdictError('missing_key', f'judge reply lacks {missing}: '
                       f'{_clip(text)!r}')
  extra = sorted(set(obj) - {'verdict', 'rationale'})
  if extra:
    raise VerdictError('extra_key', f'judge reply has unexpected keys {extra}: '
                       f'{_clip(text)!r}')
  if obj['verdict'] not in VERDICTS:
    raise VerdictError('bad_verdict', f'verdict {obj["verdict"]!r} is not one '
                       f'of {VERDICTS}')
  if not isinstance(obj['rationale'], str):
    raise VerdictError('bad_rationale', 'rationale is a '
                       f'{type(obj["rationale"]).__name__}, not a string')
  return obj['verdict'], obj['rationale']


def parse_verdict(text: str) -> str:
  """The verdict of a strict JSON judge reply (see parse_judgement)."""
  return parse_judgement(text)[0]


def _clip(text: str, limit: int = 200) -> str:
  return text if len(text) <= limit else text[:limit] + '...'


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairResult:
  """The combined verdict of one swapped pair of judge calls.

  outcome:    '1', '2', 'tie', 'both_bad', or None when the pair failed.
  verdicts:   per order (response 1 as A, then response 2 as A), the verdict
              mapped to identities ('1', '2', 'tie', 'both_bad'); None for an
              order whose replies all failed.
  rationales: the judge's rationale per order ('' when that order failed).
  failure:    None, or why the pair failed (the last error of a failed order).
  invalid:    number of replies rejected (parse errors and chat exceptions),
              including ones a retry recovered from; callers sum it.
  """

  outcome: str | None
  verdicts: tuple[str | None, str | None]
  rationales: tuple[str, str] = ('', '')
  failure: str | None = None
  invalid: int = 0

  def __post_init__(self):
    if (self.outcome is None) == (self.failure is None):
      raise ValueError('PairResult: set exactly one of outcome and failure '
                       f'(got outcome={self.outcome!r}, '
                       f'failure={self.failure!r})')
    if self.outcome is not None and self.outcome not in OUTCOMES:
      raise ValueError(f'PairResult: outcome={self.outcome!r} is not one of '
                       f'{OUTCOMES}')
    if len(self.verdicts) != 2 or len(self.rationales) != 2:
      raise ValueError('PairResult: verdicts and rationales need one entry per '
                       'order (2)')


def _ask(chat: Chat, content: str, retries: int) -> tuple[str | None, str, str,
                                                          int]:
  """(verdict or None, rationale, last error, invalid count) for one order."""
  error, invalid = '', 0
  for _ in range(retries + 1):
    try:
      reply = chat([{'role': 'user', 'content': content}])
      verdict, rationale = parse_judgement(reply)
      return verdict, rationale, '', invalid
    except VerdictError as e:
      error = f'{e.reason}: {e}'
    except Exception as e:  # A crashing judge is a counted failure.
      error = f'chat_error: {type(e).__name__}: {e}'
    invalid += 1
  return None, '', error, invalid


def combine(first: str, second: str) -> str:
  """The pair outcome from the two identity-mapped verdicts.

  The verdict stands when both orders agree ('1', '2', 'tie' or 'both_bad').
  Every disagreement is a 'tie': '1' vs '2' is position bias, and a win in
  one order against a tie or both_bad in the other is not a win the judge
  gives regardless of position.
  """
  for v in (first, second):
    if v not in OUTCOMES:
      raise ValueError(f'combine: {v!r} is not one of {OUTCOMES}')
  return first if first == second else 'tie'


def judge_pair(chat: Chat, prompt: str, response_1: str, response_2: str, *,
               retries: int = 2,
               template: str = PAIRWISE_PROMPT) -> PairResult:
  """Asks `chat` to compare the responses in both orders and combines them.

  `chat(messages) -> str` takes OpenAI-style messages. Each order gets up to
  `1 + retries` attempts; a reply that fails `parse_judgement`, or a chat
  call that raises, is retried. If an order never yields a valid verdict the
  pair is a failure (outcome None, failure says why) and, when that is the
  first order, the second is not asked.
  """
  if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
    raise ValueError(f'judge_pair: retries={retries!r} must be an int >= 0')
  to_identity = ({'A': '1', 'B': '2'}, {'A': '2', 'B': '1'})
  orders = ((response_1, response_2), (response_2, response_1))
  verdicts, rationales, invalid = [], [], 0
  failure = None
  for mapping, (resp_a, resp_b) in zip(to_identity, orders):
    content = template.format(prompt=prompt, response_a=resp_a,
                              response_b=resp_b)
    verdict, rationale, error, bad = _ask(chat, content, retries)
    invalid += bad
    if verdict is None:
      failure = error
      break  # One order alone cannot be combined: skip the other one.
    verdicts.append(mapping.get(verdict, verdict))
    rationales.append(rationale)
  verdicts += [None] * (2 - len(verdicts))
  rationales += [''] * (2 - len(rationales))
  outcome = None if failure else combine(verdicts[0], verdicts[1])
  return PairResult(outcome=outcome, verdicts=tuple(verdicts),
                    rationales=tuple(rationales), failure=failure,
                    invalid=invalid)


def to_battle(model_1: str, model_2: str, result: PairResult | str,
              **extra: Any) -> dict[str, Any]:
  """A battle-log row for response 1 from `model_1` vs response 2 from
  `model_2` (see jpost.eval.battles). A failed PairResult is an error: count
  failures and drop them before building the log."""
  outcome = result.outcome if isinstance(result, PairResult) else result
  if outcome is None:
    failure = getattr(result, 'failure', None)
    raise ValueError(f'to_battle: the {model_1} vs {model_2} pair failed '
                     f'({failure}); count it and leave it out of the log')
  winner = {'1': 'model_a', '2': 'model_b', 'tie': 'tie',
            'both_bad': 'both_bad'}.get(outcome)
  if winner is None:
    raise ValueError(f'to_battle: outcome {outcome!r} is not one of {OUTCOMES}')
  return {'model_a': model_1, 'model_b': model_2, 'winner': winner, **extra}


def majority_vote(verdicts: Sequence[Hashable]) -> Hashable:
  """The verdict given by more than half of the voters, else 'tie'.

  Works for any labels (judge verdicts, outcomes, rater choices): 3-0 and 2-1
  give the majority verdict; 1-1, 2-2 or 1-1-1 have no strict majority and
  give 'tie'.
  """
  if len(verdicts) == 0:
    raise ValueError('majority_vote: no verdicts given')
  label, count = collections.Counter(verdicts).most_common(1)[0]
  return label if 2 * count > len(verdicts) else 'tie'


def win_rates(battles: Sequence[dict[str, Any]], *,
              models: Sequence[str] | None = None,
              alpha: float = 0.05) -> dict[str, dict[str, float]]:
  """Each model's win rate over all its battles, with a Wilson interval.

  win_rate = (wins + (ties + both_bad) / 2) / battles: a tie or a both_bad is
  half a win for each side. `low`/`high` is the Wilson (1 - alpha) interval
  of that rate with the fractional score as successes. Also returns the raw
  counts: wins, losses, ties, both_bad, battles.
  """
  log = battles_lib.encode(battles, models=models)
  out = {}
  for j, name in enumerate(log.models):
    as_a, as_b = log.a == j, log.b == j
    won = (as_a & (log.score_a == 1.0)) | (as_b & (log.score_a == 0.0))
    lost = (as_a & (log.score_a == 0.0)) | (as_b & (log.score_a == 1.0))
    mine = as_a | as_b
    tie = mine & (log.winner == battles_lib.WINNERS.index('tie'))
    bad = mine & (log.winner == battles_lib.WINNERS.index('both_bad'))
    n = int(mine.sum())
    score = float(won.sum()) + 0.5 * float(tie.sum() + bad.sum())
    low, high = intervals.wilson_interval(score, n, alpha=alpha)
    out[name] = {
        'win_rate': score / n if n else float('nan'),
        'low': low, 'high': high, 'battles': n,
        'wins': int(won.sum()), 'losses': int(lost.sum()),
        'ties': int(tie.sum()), 'both_bad': int(bad.sum()),
    }
  return out


def win_matrix(battles: Sequence[dict[str, Any]], *,
               models: Sequence[str] | None = None
               ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
  """(models, rate, games): rate[i, j] is i's score rate against j (ties
  half), NaN where they never met; games[i, j] counts their battles."""
  log = battles_lib.encode(battles, models=models)
  wins, games = battles_lib.score_matrix(log)
  with np.errstate(invalid='ignore', divide='ignore'):
    rate = np.where(games > 0, wins / np.maximum(games, 1), np.nan)
  return log.models, rate, games
