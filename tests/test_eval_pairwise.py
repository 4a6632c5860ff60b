"""Strict judge verdicts, position-swapped pair judging, votes, win rates."""

import json
import re

import pytest

from jpost.eval import intervals
from jpost.eval import pairwise as pw


def _reply(verdict, rationale='because'):
  return json.dumps({'verdict': verdict, 'rationale': rationale})


def _responses(messages):
  """(response_a, response_b) as shown to the judge in PAIRWISE_PROMPT."""
  content = messages[-1]['content']
  found = re.search(r'\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nReply',
                    content, re.DOTALL)
  return found.group(1), found.group(2)


@pytest.mark.parametrize('text, verdict', [
    ('{"verdict": "A", "rationale": "clearer"}', 'A'),
    ('  {"verdict": "both_bad", "rationale": ""}\n', 'both_bad'),
    ('```json\n{"verdict": "tie", "rationale": "same"}\n```', 'tie'),
    ('```\n{"verdict": "B", "rationale": "x"}```', 'B'),
])
def test_parse_verdict_accepts_strict_json(text, verdict):
  assert pw.parse_verdict(text) == verdict


@pytest.mark.parametrize('text, reason', [
    ('A', 'not_json'),
    ('Sure! {"verdict": "A", "rationale": "x"}', 'not_json'),
    ('["A"]', 'not_object'),
    ('{"verdict": "A"}', 'missing_key'),
    ('{"verdict": "a", "rationale": "x"}', 'bad_verdict'),
    ('{"verdict": "A", "rationale": 3}', 'bad_rationale'),
    ('{"verdict": "A", "rationale": "x", "score": 9}', 'extra_key'),
    (None, 'not_text'),
])
def test_parse_verdict_rejects_everything_else(text, reason):
  with pytest.raises(pw.VerdictError) as info:
    pw.parse_verdict(text)
  assert info.value.reason == reason


def test_prompt_template_keeps_braces_in_content():
  text = pw.PAIRWISE_PROMPT.format(prompt='f(x) = {x}', response_a='{a}',
                                   response_b='b')
  assert 'f(x) = {x}' in text and '[Response A]\n{a}' in text
  assert '{"verdict": "A" | "B" | "tie" | "both_bad"' in text


def test_judge_always_answering_a_gives_ties_not_wins():
  calls = []

  def always_a(messages):
    calls.append(_responses(messages))
    return _reply('A')

  result = pw.judge_pair(always_a, 'Q?', 'first', 'second')
  assert result.outcome == 'tie'
  assert result.verdicts == ('1', '2')  # position bias, exposed by the swap
  assert calls == [('first', 'second'), ('second', 'first')]
  assert result.failure is None and result.invalid == 0


@pytest.mark.parametrize('response_1, response_2, outcome', [
    ('a much longer answer', 'short', '1'),
    ('short', 'a much longer answer', '2'),
])
def test_judge_preferring_longer_response_wins_in_both_orders(
    response_1, response_2, outcome):
  def longer(messages):
    a, b = _responses(messages)
    return _reply('A' if len(a) > len(b) else 'B')

  result = pw.judge_pair(longer, 'Q?', response_1, response_2)
  assert result.outcome == outcome
  assert result.verdicts == (outcome, outcome)


@pytest.mark.parametrize('first, second, outcome', [
    ('1', '1', '1'), ('2', '2', '2'), ('tie', 'tie', 'tie'),
    ('both_bad', 'both_bad', 'both_bad'), ('1', '2', 'tie'),
    ('1', 'tie', 'tie'), ('tie', '2', 'tie'), ('both_bad', '1', 'tie'),
    ('both_bad', 'tie', 'tie')])
def test_combine(first, second, outcome):
  assert pw.combine(first, second) == outcome


def test_invalid_replies_are_retried_and_counted():
  replies = iter(['no json here', _reply('A'), _reply('B')])
  result = pw.judge_pair(lambda m: next(replies), 'Q', 'x', 'y', retries=1)
  assert result.outcome == '1' and result.invalid == 1


def test_exhausted_retries_are_a_counted_failure():
  calls = []

  def broken(messages):
    calls.append(messages)
    return 'I think A is better.'

  result = pw.judge_pair(broken, 'Q', 'x', 'y', retries=2)
  assert result.outcome is None and result.failure.startswith('not_json')
  assert result.invalid == 3 and len(calls) == 3  # second order not asked
  with pytest.raises(ValueError, match='failed'):
    pw.to_battle('m1', 'm2', result)


def test_a_crashing_judge_is_a_counted_failure():
  def crash(messages):
    raise TimeoutError('judge timed out')

  result = pw.judge_pair(crash, 'Q', 'x', 'y', retries=0)
  assert result.outcome is None and 'TimeoutError' in result.failure


def test_pair_result_validation():
  with pytest.raises(ValueError, match='exactly one'):
    pw.PairResult(outcome=None, verdicts=(None, None))
  with pytest.raises(ValueError, match='not one of'):
    pw.PairResult(outcome='A', verdicts=('1', '1'))


@pytest.mark.parametrize('votes, expected', [
    (['1', '1', '1'], '1'), (['2', '1', '2'], '2'), (['1', '2'], 'tie'),
    (['1', '2', 'both_bad'], 'tie'), (['1', '1', '2', '2'], 'tie'),
    (['both_bad', 'both_bad', 'tie'], 'both_bad'), (['A'], 'A')])
def test_majority_vote(votes, expected):
  assert pw.majority_vote(votes) == expected


def test_majority_vote_needs_votes():
  with pytest.raises(ValueError):
    pw.majority_vote([])


def test_to_battle():
  assert pw.to_battle('m1', 'm2', '2', prompt_id=7) == {
      'model_a': 'm1', 'model_b': 'm2', 'winner': 'model_b', 'prompt_id': 7}
  result = pw.PairResult(outcome='both_bad', verdicts=('both_bad',) * 2)
  assert pw.to_battle('m1', 'm2', result)['winner'] == 'both_bad'


def test_win_rates_count_ties_half():
  battles = [
      {'model_a': 'x', 'model_b': 'y', 'winner': 'model_a'},
      {'model_a': 'y', 'model_b': 'x', 'winner': 'model_b'},
      {'model_a': 'y', 'model_b': 'x', 'winner': 'model_a'},
      {'model_a': 'x', 'model_b': 'y', 'winner': 'tie'},
      {'model_a': 'x', 'model_b': 'z', 'winner': 'both_bad'},
  ]
  rates = pw.win_rates(battles)
  x = rates['x']
  # x: wins 2, loss 1, tie 1, both_bad 1 -> (2 + 2 * 0.5) / 5
  assert (x['wins'], x['losses'], x['ties'], x['both_bad'], x['battles']) == (
      2, 1, 1, 1, 5)
  assert x['win_rate'] == pytest.approx(0.6)
  assert (x['low'], x['high']) == pytest.approx(intervals.wilson_interval(3, 5))
  assert rates['y']['win_rate'] == pytest.approx(1.5 / 4)
  assert rates['z']['win_rate'] == pytest.approx(0.5)

  models, rate, games = pw.win_matrix(battles)
  assert models == ('x', 'y', 'z')
  assert rate[0, 1] == pytest.approx(2.5 / 4) and games[0, 1] == 4
  assert rate[1, 0] == pytest.approx(1.5 / 4)
  assert rate[1, 2] != rate[1, 2]  # y and z never met: NaN
