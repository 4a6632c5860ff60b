"""pass@k, maj@k, accuracy reports and Wilson intervals."""

import fractions
import math

import pytest

from jpost.eval import ground_truth as gt
from jpost.eval import intervals


def _pass_at_k_exact(n, c, k):
  # The definition, with exact big integers: 1 - C(n-c, k) / C(n, k).
  return float(1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k)))


@pytest.mark.parametrize('n', [1, 2, 5, 10])
def test_pass_at_k_matches_binomial_definition(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert gt.pass_at_k(n, c, k) == pytest.approx(_pass_at_k_exact(n, c, k),
                                                    abs=1e-12)


def test_pass_at_k_edge_cases_and_large_n():
  assert gt.pass_at_k(10, 0, 5) == 0.0
  assert gt.pass_at_k(10, 10, 1) == 1.0
  assert gt.pass_at_k(10, 6, 5) == 1.0  # only 4 wrong: any 5 hold a right one
  assert gt.pass_at_k(1000, 1, 1) == pytest.approx(0.001)
  # C(10000, 100) has ~240 digits; the product form never builds it.
  assert gt.pass_at_k(10000, 30, 100) == pytest.approx(
      _pass_at_k_exact(10000, 30, 100), rel=1e-10)


@pytest.mark.parametrize('n, c, k, error', [
    (5, 6, 1, ValueError), (5, -1, 1, ValueError), (5, 2, 6, ValueError),
    (5, 2, 0, ValueError), (5.0, 2, 1, TypeError), (5, True, 1, TypeError)])
def test_pass_at_k_rejects_bad_arguments(n, c, k, error):
  with pytest.raises(error):
    gt.pass_at_k(n, c, k)


@pytest.mark.parametrize('answers, k, gold, expected', [
    (['1', '2', '2', None, '1'], 3, '2', True),  # 2 votes for '2'
    (['1', '2', '2', '1'], 4, '1', True),  # 2-2 tie: '1' came first
    (['1', '2', '2', '1'], 4, '2', False),
    ([None, None, '3'], 3, '3', True),  # None does not vote
    ([None, None, '3'], 2, '3', False),  # no vote at all: wrong
    ([' 7 ', '8'], 2, '7', True),  # default compares stripped text
])
def test_maj_at_k(answers, k, gold, expected):
  assert gt.maj_at_k(answers, gold, k) is expected


def test_maj_at_k_groups_with_the_given_equivalence():
  numeric = lambda a, b: float(a) == float(b)  # noqa: E731
  answers = ['3', '2.0', '2', '3.0', '2.00']
  assert gt.maj_at_k(answers, '2', 5, equivalent=numeric)
  assert not gt.maj_at_k(answers, '2', 5)  # as text, '3' leads (first of ties)


def test_maj_at_k_errors():
  with pytest.raises(ValueError, match='only 2 answers'):
    gt.maj_at_k(['1', '2'], '1', 3)
  with pytest.raises(TypeError, match=r'answers\[1\]'):
    gt.maj_at_k(['1', 2], '1', 2)


def test_accuracy_report_hand_computed():
  samples = [[True, False, False, False], [True] * 4, [False] * 4]
  report = gt.accuracy_report(samples, ks=(1, 4, 8))
  assert report['accuracy'] == pytest.approx((0.25 + 1 + 0) / 3)
  assert report['pass@1'] == pytest.approx(report['accuracy'])
  assert report['pass@4'] == pytest.approx(2 / 3)
  assert 'pass@8' not in report  # more than the 4 samples per problem
  low, high = intervals.wilson_interval(1.25, 3)
  assert (report['accuracy_low'], report['accuracy_high']) == pytest.approx(
      (low, high))
  assert report['num_problems'] == 3 and report['num_samples'] == 12


def test_accuracy_report_errors():
  with pytest.raises(ValueError, match='empty'):
    gt.accuracy_report([])
  with pytest.raises(ValueError, match='problem 1 has no samples'):
    gt.accuracy_report([[True], []])
  with pytest.raises(TypeError, match=r'samples\[0\]\[1\]'):
    gt.accuracy_report([[True, 1]])


def test_wilson_interval_textbook_values():
  # 95% Wilson: 5/10 -> (0.2366, 0.7634); 0/10 -> (0, 0.2775).
  assert intervals.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634),
                                                           abs=1e-4)
  assert intervals.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775),
                                                           abs=1e-4)
  assert intervals.wilson_interval(0, 0) == (0.0, 1.0)
  assert intervals.normal_quantile(0.975) == pytest.approx(intervals.Z95)
  with pytest.raises(ValueError):
    intervals.wilson_interval(11, 10)
