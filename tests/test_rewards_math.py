"""Answer extraction, numeric and symbolic equivalence, the 'math' and 'format' rewards."""

import time

import numpy as np
import pytest

from jpost import rewards
from jpost.rewards import answers, equivalence


@pytest.fixture(scope='module')
def warm_worker():
  """Loads math_verify in its worker once, so timings below exclude start-up."""
  assert rewards.is_equivalent('\\sqrt{4}', '2')


@pytest.mark.parametrize('text, expected', [
    ('so \\boxed{\\frac{1}{2}}.', '\\frac{1}{2}'),
    ('\\boxed{{60}}', '{60}'),
    ('first \\boxed{3}, then \\boxed{4}', '4'),
    ('\\fbox{7}', '7'),
    ('\\boxed {8}', '8'),
    ('\\boxed{\\{1, 2\\}}', '\\{1, 2\\}'),
    ('\\boxed{5} then \\boxed{6', '5'),  # a truncated last box does not count
    ('\\boxedx{3} and 9', '9'),  # not a box: falls back to the last number
    ('work\n#### 1,234', '1,234'),
    ('#### 5\nlater #### 6', '6'),
    ('\\boxed{2} #### 3', '2'),  # a box beats the hashes
    ('it costs $18.50 or -3', '-3'),
    ('5-3 is 2', '2'),
    ('a third is 1/3', '1/3'),
    ('no answer here', None),
    ('', None),
])
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


def test_extract_answer_without_fallback():
  assert rewards.extract_answer('the answer is 42', fallback='none') is None
  assert rewards.extract_answer('\\boxed{42}', fallback='none') == '42'
  with pytest.raises(ValueError, match='fallback'):
    rewards.extract_answer('1', fallback='first_number')


@pytest.mark.parametrize('pred, gold, expected', [
    ('1,234', '1234', True),
    ('72.0', '72', True),
    ('72.', '72', True),
    ('$72', '72', True),
    ('\\$72', '72', True),
    ('3/4', '0.75', True),
    ('\\frac{3}{4}', '0.75', True),
    ('-\\frac{3}{4}', '-0.75', True),
    ('{60}', '60', True),
    ('25%', '25', True),  # policy: a trailing % is dropped, not divided by 100
    ('0.333333', '1/3', True),  # within the 1e-6 relative tolerance
    ('0.33', '1/3', False),
    ('55', '60', False),
    ('1/0', '1', None),
    ('\\sqrt{4}', '2', None),  # not a plain number: math_verify decides
    ('x = 5', '5', None),
    ('2.5e3', '2500', True),
    ('1e1000', '1e1000', True),
    # Exactly, 10**10000000: 6 s of big-integer arithmetic (10**99999999:
    # hours) that no timeout in this process can stop. math_verify decides.
    ('1e10000000', '60', None),
    ('1e-10000000', '0', None),
])
def test_numbers_equal(pred, gold, expected):
  assert answers.numbers_equal(pred, gold) is expected


@pytest.mark.parametrize('pred, gold, expected', [
    ('\\frac{1}{2}', '0.5', True),
    ('\\sqrt{4}', '2', True),
    ('\\sqrt{5}', '2', False),
    ('\\frac{\\pi}{2}', '\\pi/2', True),
    ('x = 5', '5', True),
    ('five', '5', False),
])
def test_is_equivalent(warm_worker, pred, gold, expected):
  assert rewards.is_equivalent(pred, gold) is expected


def test_symbolic_answers_go_through_math_verify(warm_worker):
  """'\\sqrt{4}' is no plain number, so the worker process decides it."""
  (math_source,) = rewards.build({'math': {}})
  result = rewards.score([math_source], ['q'], ['so \\boxed{\\sqrt{4}}'], [{'answer': '2'}])
  assert result.per_source['math'][0] == 1.0


def _math(completions, gold, **options):
  sources = rewards.build({'math': options})
  n = len(completions)
  return rewards.score(sources, ['q'] * n, completions, [{'answer': gold}] * n)


def test_math_reward_seed_examples(warm_worker):
  result = _math(['Each box holds 12, so 5 boxes hold \\boxed{60}',
                  'Each box holds 11, so 5 boxes hold \\boxed{55}'], '60')
  np.testing.assert_array_equal(result.per_source['math'], [1.0, 0.0])
  np.testing.assert_array_equal(result.total, [1.0, 0.0])


def test_math_reward_answers_and_stats(warm_worker):
  result = _math(['...\n#### 1,234', 'it is 1234 dollars.', 'I do not know', '#### 1233'],
                 '1234', fallback='none')
  np.testing.assert_array_equal(result.per_source['math'], [1.0, 0.0, 0.0, 0.0])
  metrics = result.metrics()
  assert metrics['reward/math/accuracy'] == 0.25
  assert metrics['reward/math/no_answer'] == 0.5
  assert metrics['reward/math/failures'] == 0


def test_math_reward_reads_the_configured_column(warm_worker):
  sources = rewards.build({'math': {'answer_key': 'target'}})
  result = rewards.score(sources, ['q', 'q'], ['#### 3', '#### 3'], [{'target': 3}, {}])
  assert result.per_source['math'][0] == 1.0
  assert result.failures['math']['raised'] == 1
  assert "no 'target' column" in result.errors['math']


def test_hostile_tower_times_out_and_the_worker_recovers(warm_worker):
  kills = equivalence._WORKER.kills
  start = time.perf_counter()
  result = _math(['\\boxed{9^{9^{9^{9}}}}', '\\boxed{60}'], '60', verify_timeout=1.0)
  assert time.perf_counter() - start < 1.0 + 2.0
  assert result.failures['math']['timeout'] == 1
  assert np.isnan(result.per_source['math'][0]) and result.per_source['math'][1] == 1.0
  np.testing.assert_array_equal(result.total, [0.0, 1.0])
  assert equivalence._WORKER.kills == kills + 1
  assert rewards.is_equivalent('\\sqrt{9}', '3')  # a fresh worker answers


def test_a_huge_exponent_is_scored_without_holding_the_process(warm_worker):
  start = time.perf_counter()
  result = _math(['\\boxed{1e99999999}', 'so\n#### 1e-99999999', '\\boxed{60}'], '60',
                 verify_timeout=1.0)
  assert time.perf_counter() - start < 2.0
  np.testing.assert_array_equal(result.per_source['math'], [0.0, 0.0, 1.0])
  assert sum(result.failures['math'].values()) == 0


def test_is_equivalent_raises_verify_timeout(warm_worker):
  with pytest.raises(rewards.VerifyTimeout):
    rewards.is_equivalent('9^{9^{9^{9}}}', '1', timeout=0.5)


@pytest.mark.parametrize('completion, style, expected', [
    ('so \\boxed{60}', 'boxed', 1.0),
    ('\\boxed{60} or \\boxed{61}', 'boxed', 0.0),
    ('\\boxed{}', 'boxed', 0.0),
    ('#### 60', 'boxed', 0.0),
    ('work\n#### 60', 'hashes', 1.0),
    ('#### 60\n#### 61', 'hashes', 0.0),
    ('####\n', 'hashes', 0.0),
    ('\\boxed{60}\n#### 60', 'hashes', 1.0),
    ('\\boxed{60}\n#### 60', 'any', 0.0),
    ('#### 60', 'any', 1.0),
    ('60', 'any', 0.0),
])
def test_format_reward(completion, style, expected):
  sources = rewards.build({'format': {'style': style}})
  result = rewards.score(sources, ['q'], [completion], [{}])
  assert result.per_source['format'][0] == expected


def test_bad_reward_options_are_config_errors():
  """A reward's own checks of its options reach the command line as one
  line (errors.UserError), not a traceback."""
  from jpost.errors import ConfigError
  for config, message in (({'math': {'fallback': 'first'}}, "reward 'math': math reward: "
                                                            "fallback='first'"),
                          ({'code': {'mode': 'fuzz'}}, "reward 'code': code reward: mode="),
                          ({'math': 3}, "reward 'math': options must be a mapping")):
    with pytest.raises(ConfigError, match=message):
      rewards.build(config)


def test_format_reward_rejects_unknown_style():
  with pytest.raises(ValueError, match="style='latex'"):
    rewards.build({'format': {'style': 'latex'}})
