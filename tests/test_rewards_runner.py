"""The reward runner: failures are counted, never fatal; build() validates configs."""

import math
import time

import ml_collections
import numpy as np
import pytest

from jpost import rewards


@pytest.fixture
def registered():
  """Registers test rewards and removes them afterwards."""
  names = []

  def add(name, fn=None, *, factory=False, scorer=None, **options):
    names.append(name)
    if scorer is not None:
      rewards.register_scorer(name, scorer, **options)
    elif factory:
      rewards.register_factory(name, **options)(fn)
    else:
      rewards.register(name, **options)(fn)
    return name
  yield add
  for name in names:
    rewards.unregister(name)


def _run(sources, completions):
  n = len(completions)
  return rewards.score(sources, ['prompt'] * n, completions, [{'answer': '1'}] * n)


def test_weighted_total_and_metrics(registered):
  registered('t_length', lambda p, c, row: float(len(c)))
  registered('t_scaled', lambda p, c, row, *, scale: scale * len(c))
  sources = rewards.build({'t_length': {'weight': 0.5}, 't_scaled': {'scale': 2.0}})
  result = _run(sources, ['a', 'abc'])
  np.testing.assert_allclose(result.per_source['t_length'], [1.0, 3.0])
  np.testing.assert_allclose(result.per_source['t_scaled'], [2.0, 6.0])
  np.testing.assert_allclose(result.total, [0.5 * 1 + 2, 0.5 * 3 + 6])
  assert result.total.dtype == np.float32
  metrics = result.metrics()
  assert metrics['reward/t_length/mean'] == 2.0
  assert metrics['reward/t_length/std'] == 1.0
  assert metrics['reward/t_scaled/failures'] == 0
  assert metrics['reward/total/mean'] == pytest.approx(5.0)


def test_failures_are_counted_and_the_batch_still_scores(registered):
  def flaky(prompt, completion, row):
    if completion == 'raise':
      raise RuntimeError('boom')
    if completion == 'sleep':
      time.sleep(3)
    if completion == 'nan':
      return float('nan')
    if completion == 'inf':
      return np.inf
    if completion == 'text':
      return 'high'
    return 1.0
  registered('t_flaky', flaky, timeout=0.5, concurrency=2)
  completions = ['ok', 'raise', 'sleep', 'nan', 'inf', 'text', 'ok']
  start = time.perf_counter()
  result = _run(rewards.build({'t_flaky': {}}), completions)
  assert time.perf_counter() - start < 2.5  # the sleeper is abandoned at 0.5 s
  values = result.per_source['t_flaky']
  np.testing.assert_array_equal(np.isnan(values), [0, 1, 1, 1, 1, 1, 0])
  assert np.isfinite(result.total).all()
  np.testing.assert_array_equal(result.total, [1, 0, 0, 0, 0, 0, 1])
  assert result.failures['t_flaky'] == {'raised': 1, 'timeout': 1, 'nan': 2, 'bad_type': 1}
  metrics = result.metrics()
  assert metrics['reward/t_flaky/failures'] == 5
  assert metrics['reward/t_flaky/failures/nan'] == 2
  assert metrics['reward/t_flaky/mean'] == 1.0
  assert 'RuntimeError: boom' in result.errors['t_flaky']
  assert metrics['reward/abandoned_threads'] >= 1


def test_every_completion_failing_still_returns(registered):
  def broken(prompt, completion, row):
    raise ValueError('always')
  registered('t_broken', broken)
  registered('t_ok', lambda p, c, row: 1.0)
  result = _run(rewards.build({'t_broken': {'weight': 3.0}, 't_ok': {}}), ['a', 'b', 'c'])
  np.testing.assert_array_equal(result.total, [1.0, 1.0, 1.0])
  assert result.failures['t_broken']['raised'] == 3
  metrics = result.metrics()
  assert math.isnan(metrics['reward/t_broken/mean'])
  assert metrics['reward/t_broken/failures'] == 3


def test_timeout_counts_from_the_call_start_not_the_batch_start(registered):
  registered('t_slowish', lambda p, c, row: time.sleep(0.3) or 1.0, timeout=1.0)
  result = _run(rewards.build({'t_slowish': {}}), ['a'] * 5)  # 1.5 s in all, 0.3 s each
  assert result.failures['t_slowish']['timeout'] == 0
  np.testing.assert_array_equal(result.total, [1.0] * 5)


def test_concurrency_runs_calls_at_once(registered):
  registered('t_sleep', lambda p, c, row: time.sleep(0.4) or 1.0)
  start = time.perf_counter()
  result = _run(rewards.build({'t_sleep': {'concurrency': 4}}), ['a'] * 8)
  assert time.perf_counter() - start < 1.5  # two waves, not eight calls in a row
  assert result.failures['t_sleep']['timeout'] == 0


def test_scored_stats_and_reward_failure(registered):
  def judged(prompt, completion, row):
    if completion == 'bad':
      raise rewards.RewardFailure('invalid_json', 'judge said nonsense')
    return rewards.Scored(0.5, {'long': float(len(completion) > 3)})
  registered('t_judged', judged)
  result = _run(rewards.build({'t_judged': {}}), ['abcd', 'ab', 'bad', 'abcdef'])
  assert result.failures['t_judged']['invalid_json'] == 1
  metrics = result.metrics()
  assert metrics['reward/t_judged/long'] == pytest.approx(2 / 3)  # over the 3 scored
  assert metrics['reward/t_judged/failures/invalid_json'] == 1


def test_batched_scorer(registered):
  registered('t_rm', scorer=lambda prompts, completions: np.array([len(c) for c in completions]))
  registered('t_rm_nan', scorer=lambda prompts, completions: np.array([1.0, np.nan, 2.0]))
  registered('t_rm_shape', scorer=lambda prompts, completions: np.zeros(2))
  result = _run(rewards.build({'t_rm': {}, 't_rm_nan': {}, 't_rm_shape': {}}),
                ['a', 'bb', 'ccc'])
  np.testing.assert_array_equal(result.per_source['t_rm'], [1, 2, 3])
  assert result.failures['t_rm_nan']['nan'] == 1
  assert result.failures['t_rm_shape']['bad_type'] == 3
  np.testing.assert_array_equal(result.total, [2, 2, 5])


def test_build_accepts_config_dict_and_lists_known_names(registered):
  registered('t_one', lambda p, c, row: 1.0)
  config = ml_collections.ConfigDict({'t_one': {'weight': 2.0, 'timeout': 3.0}})
  (source,) = rewards.build(config)
  assert (source.name, source.weight, source.timeout) == ('t_one', 2.0, 3.0)
  assert 't_one' in rewards.names() and 'math' in rewards.names()
  with pytest.raises(ValueError, match=r"unknown reward 'mathh'.*'math'"):
    rewards.build({'mathh': {}})
  with pytest.raises(ValueError, match=r"reward 't_one'.*unexpected keyword.*'scale'"):
    rewards.build({'t_one': {'scale': 2}})
  with pytest.raises(ValueError, match='registered twice'):
    rewards.register('t_one')(lambda p, c, row: 0.0)
  with pytest.raises(ValueError, match='timeout'):
    rewards.build({'t_one': {'timeout': 0}})
  with pytest.raises(ValueError, match='empty'):
    rewards.build({})


def test_score_checks_lengths(registered):
  registered('t_two', lambda p, c, row: 1.0)
  with pytest.raises(ValueError, match='one prompt and one dataset row per completion'):
    rewards.score(rewards.build({'t_two': {}}), ['p'], ['a', 'b'], [{}, {}])
