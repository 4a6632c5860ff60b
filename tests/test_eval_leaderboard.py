"""Battle-log validation, Bradley-Terry fits, bootstrap intervals, online Elo
and leaderboard rows."""

import math

import numpy as np
import pytest

from jpost.eval import battles as battles_lib
from jpost.eval import leaderboard as lb

NAMES = ('m800', 'm950', 'anchor', 'm1200')
TRUE = np.array([800.0, 950.0, 1000.0, 1200.0])


def _simulate(n, rng):
  """n battles between random distinct pairs, won with Elo probabilities."""
  i = rng.integers(0, 4, n)
  j = (i + rng.integers(1, 4, n)) % 4
  p_i = 1.0 / (1.0 + 10.0 ** ((TRUE[j] - TRUE[i]) / 400.0))
  win = rng.random(n) < p_i
  return [{'model_a': NAMES[a], 'model_b': NAMES[b],
           'winner': 'model_a' if w else 'model_b'}
          for a, b, w in zip(i, j, win)]


def _log(*rows):
  return [{'model_a': a, 'model_b': b, 'winner': w} for a, b, w in rows]


@pytest.mark.parametrize('battles, kwargs, match', [
    (_log(('a', 'b', 'model_a'), ('a', 'b', 'draw')), {},
     r"battle 1: winner='draw'"),
    (_log(('a', 'b', 'tie'), ('a', 'a', 'tie')), {},
     "battle 1: model 'a' battles itself"),
    (_log(('a', 'b', 'tie'), ('a', 'c', 'tie')), {'models': ['a', 'b']},
     "battle 1: model_b='c' is not in models"),
    ([{'model_a': 'a', 'winner': 'tie'}], {}, 'battle 0: model_b=None'),
    (['a beats b'], {}, 'battle 0: is a str'),
    ([], {}, 'empty'),
])
def test_encode_rejects_bad_rows(battles, kwargs, match):
  with pytest.raises(ValueError, match=match):
    battles_lib.encode(battles, **kwargs)


def test_two_models_closed_form():
  # a wins 3 of 4: the MLE strength ratio is 3, i.e. 400 log10(3) Elo apart.
  battles = _log(*[('a', 'b', 'model_a')] * 3, ('b', 'a', 'model_a'))
  ratings = lb.bradley_terry(battles, l2=0.0, anchor='b')
  assert ratings['b'] == 1000.0
  assert ratings['a'] == pytest.approx(1000 + 400 * math.log10(3), abs=1e-6)
  # One win and two ties: scores 2 vs 1, so a ratio of 2.
  battles = _log(('a', 'b', 'model_a'), ('a', 'b', 'tie'),
                 ('b', 'a', 'both_bad'))
  ratings = lb.bradley_terry(battles, l2=0.0)
  assert ratings['a'] - ratings['b'] == pytest.approx(400 * math.log10(2))
  assert (ratings['a'] + ratings['b']) / 2 == pytest.approx(1000.0)
  # scale=1, base=e, init=0 gives the natural log-strengths themselves.
  theta = lb.bradley_terry(battles, l2=0.0, scale=1.0, base=math.e,
                           init_rating=0.0)
  assert theta['a'] - theta['b'] == pytest.approx(math.log(2))


def test_fit_satisfies_the_likelihood_equations():
  # At the MLE each model's expected score equals its observed score.
  battles = _simulate(300, np.random.default_rng(3))
  ratings = lb.bradley_terry(battles, l2=0.0)
  log = battles_lib.encode(battles)
  wins, games = battles_lib.score_matrix(log)
  r = np.array([ratings[m] for m in log.models])
  p = 1.0 / (1.0 + 10.0 ** ((r[None, :] - r[:, None]) / 400.0))
  np.testing.assert_allclose((games * p).sum(axis=1), wins.sum(axis=1),
                             atol=1e-6)


def test_bradley_terry_recovers_known_ratings():
  battles = _simulate(4000, np.random.default_rng(0))
  ratings = lb.bradley_terry(battles, anchor='anchor')
  error = np.abs(np.array([ratings[m] for m in NAMES]) - TRUE)
  assert error.max() < 30, dict(zip(NAMES, error))


def test_undefeated_model_needs_the_penalty():
  battles = _log(*[('a', 'b', 'model_a')] * 5, ('b', 'c', 'model_a'),
                 ('c', 'b', 'model_a'))
  ratings = lb.bradley_terry(battles)  # default l2 keeps it finite
  assert math.isfinite(ratings['a']) and ratings['a'] > ratings['b'] + 400
  with pytest.raises(ValueError, match=r"never won or never lost: \['a'\]"):
    lb.bradley_terry(battles, l2=0.0)
  with pytest.raises(RuntimeError, match='use l2 > 0'):
    wins, games = battles_lib.score_matrix(battles_lib.encode(battles))
    lb.fit_log_strengths(wins, games, l2=0.0)


def test_disconnected_groups_are_an_error():
  battles = _log(('a', 'b', 'model_a'), ('c', 'd', 'tie'))
  with pytest.raises(ValueError, match=r"never met: \[\['a', 'b'\], \['c', "):
    lb.bradley_terry(battles)
  # The bootstrap alone too: it rated a model that never played at the
  # prior's 1000 with an interval of zero width.
  with pytest.raises(ValueError, match=r"never met: \[\['a', 'b'\], \['c', "):
    lb.bootstrap_intervals(battles, rounds=5)
  with pytest.raises(ValueError, match=r"never met: \[\['a', 'b'\], \['c'\]\]"):
    lb.bootstrap_intervals(battles[:1], rounds=5, models=['a', 'b', 'c'])


def test_leaderboard_intervals_need_a_penalty():
  battles = _log(('a', 'b', 'model_a'), ('b', 'c', 'model_a'), ('a', 'b', 'model_b'),
                 ('b', 'c', 'model_b'), ('a', 'b', 'model_a'), ('b', 'c', 'model_a'))
  with pytest.raises(ValueError, match='l2 must be > 0 for its bootstrap intervals'):
    lb.leaderboard(battles, l2=0.0, rounds=5)
  with pytest.raises(ValueError, match='bootstrap intervals need l2 > 0'):
    lb.bootstrap_intervals(battles, l2=0.0, rounds=5)


def test_bad_arguments():
  battles = _log(('a', 'b', 'model_a'), ('a', 'b', 'model_b'))
  with pytest.raises(ValueError, match='anchor'):
    lb.bradley_terry(battles, anchor='zz')
  with pytest.raises(ValueError, match='scale'):
    lb.bradley_terry(battles, scale=0)
  with pytest.raises(ValueError, match='rounds'):
    lb.bootstrap_intervals(battles, rounds=1)


def test_bootstrap_is_ordered_seeded_and_pins_the_anchor():
  battles = _simulate(500, np.random.default_rng(1))
  spans = lb.bootstrap_intervals(battles, rounds=50, anchor='anchor', seed=4)
  assert spans == lb.bootstrap_intervals(battles, rounds=50, anchor='anchor',
                                         seed=4)
  assert spans['anchor'] == (1000.0, 1000.0, 1000.0)
  for low, mid, high in spans.values():
    assert low <= mid <= high


def test_bootstrap_intervals_cover_true_ratings():
  # 20 simulated logs x 3 non-anchor models; nominal coverage is 0.95.
  rng = np.random.default_rng(1)
  covered = []
  for rep in range(20):
    battles = _simulate(2000, rng)
    spans = lb.bootstrap_intervals(battles, rounds=100, seed=rep,
                                   anchor='anchor')
    for name, true in zip(NAMES, TRUE):
      if name != 'anchor':
        covered.append(spans[name][0] <= true <= spans[name][2])
  coverage = np.mean(covered)
  assert 0.8 <= coverage <= 1.0, coverage


def test_online_elo_by_hand_and_on_simulated_logs():
  ratings = lb.online_elo(_log(('a', 'b', 'model_a')), k=4)
  assert ratings == {'a': 1002.0, 'b': 998.0}
  ratings = lb.online_elo(_log(('a', 'b', 'model_a'), ('a', 'b', 'tie')), k=4)
  expected_a = 1 / (1 + 10 ** ((998 - 1002) / 400))
  assert ratings['a'] == pytest.approx(1002 + 4 * (0.5 - expected_a))
  assert ratings['a'] + ratings['b'] == pytest.approx(2000)
  simulated = lb.online_elo(_simulate(4000, np.random.default_rng(2)), k=4)
  assert sorted(simulated, key=simulated.get) == list(NAMES)


def test_leaderboard_rows():
  battles = _simulate(1000, np.random.default_rng(5))
  rows = lb.leaderboard(battles, anchor='anchor', rounds=50)
  assert [r['model'] for r in rows] == ['m1200', 'anchor', 'm950', 'm800']
  assert list(rows[0]) == ['rank', 'model', 'rating', 'low', 'high',
                           'battles', 'win_rate']
  assert rows[0]['rank'] == 1 and rows[-1]['rank'] == 4
  assert sum(r['battles'] for r in rows) == 2 * len(battles)
  for r in rows:
    assert r['low'] <= r['rating'] <= r['high'] or r['model'] == 'anchor'
  assert rows[0]['win_rate'] > 0.5 > rows[-1]['win_rate']


def test_rank_is_shared_when_intervals_overlap():
  battles = _log(*[('a', 'b', 'model_a'), ('b', 'a', 'model_a')] * 5,
                 *[('a', 'c', 'model_a')] * 10, *[('b', 'c', 'model_a')] * 10)
  rows = lb.leaderboard(battles, rounds=50)
  ranks = {r['model']: r['rank'] for r in rows}
  assert ranks['a'] == ranks['b'] == 1 and ranks['c'] == 3
