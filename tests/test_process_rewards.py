"""Process rewards: step splitting, aggregates and their per-step increments,
step rewards placed on tokens for PPO, best-of-n reranking, and the
multi-step arithmetic data the PRM recipes use."""

import math
import re

import numpy as np
import pytest

from conftest import write_char_tokenizer
from jpost import rewards
from jpost.data import arith
from jpost.eval import rerank
from jpost.models import pretrained
from jpost.rewards import process
from jpost.tokenizer import Tokenizer
from jpost.trainers import rl_parts

import configs.grpo as grpo


def test_split_steps_drops_blank_pieces_and_gives_each_steps_end():
  text = ' 3 + 4 = 7 \n\n7 * 2 = 14\n  \nThe answer is 14.'
  steps, ends = process.split_steps(text)
  assert steps == ['3 + 4 = 7', '7 * 2 = 14', 'The answer is 14.']
  # ' 3 + 4 = 7 ' ends (its last non-blank char) at 10; '\n\n' puts the next at 13.
  assert ends == [10, 23, len(text)]
  assert [text[e - 1] for e in ends] == ['7', '4', '.']
  steps, ends = process.split_steps('a ки b ки ', ' ки ')
  assert (steps, ends) == (['a', 'b'], [1, 6])
  assert process.split_steps('  \n ') == ([], [])


@pytest.mark.parametrize('how, value, increments', [
    ('min', 0.4, [0.9, -0.5, 0.0]),
    ('last', 0.7, [0.9, -0.5, 0.3]),
    ('mean', 2.0 / 3, [0.9, 0.65 - 0.9, 2.0 / 3 - 0.65]),
    ('product', 0.252, [0.9, 0.36 - 0.9, 0.252 - 0.36]),
])
def test_aggregates_and_their_step_increments_by_hand(how, value, increments):
  scores = [0.9, 0.4, 0.7]
  assert process.aggregate(scores, how) == pytest.approx(value)
  got = process.step_increments(scores, how)
  np.testing.assert_allclose(got, increments, atol=1e-12)
  assert got.sum() == pytest.approx(value)  # the step rewards add up to the reward
  assert process.aggregate([], how) == 0.0


def test_unknown_aggregate_is_a_config_error():
  with pytest.raises(Exception, match="aggregate 'median' is unknown"):
    process.aggregate([0.5], 'median')


def test_score_completions_aligns_steps_offsets_and_stats():
  seen = {}

  def step_scorer(prompts, steps):
    seen['steps'] = steps
    return [np.linspace(0.9, 0.5, len(s)) for s in steps]

  out = process.score_completions(step_scorer, ['p1', 'p2', 'p3'],
                                  ['a\nb\nc', '', 'x'], aggregate_by='min')
  assert seen['steps'] == [['a', 'b', 'c'], ['x']]  # no call for an answer without steps
  np.testing.assert_allclose(out.values, [0.5, 0.0, 0.9], rtol=1e-6)
  assert out.steps[0][0] == [1, 3, 5] and out.steps[1] == ([], [])
  np.testing.assert_allclose(out.steps[0][1], [0.9, -0.2, -0.2], atol=1e-12)
  assert out.stats['no_steps'] == pytest.approx(1 / 3)
  assert out.stats['steps'] == pytest.approx(4 / 3)
  assert out.stats['step_score_p50'] == pytest.approx(0.8)


def test_runner_keeps_step_rewards_and_stats_of_a_step_source():
  def make():
    def fn(prompts, completions):
      return process.score_completions(
          lambda ps, ss: [np.full(len(s), 0.25) for s in ss], prompts, completions)
    return fn
  rewards.register_factory('test_steps', batched=True)(make)
  try:
    result = rewards.score(rewards.build({'test_steps': {}, 'math': {}}), ['q', 'q'],
                           ['1 + 1 = 2\nThe answer is \\boxed{2}', 'no'],
                           [{'answer': '2'}, {'answer': '2'}])
  finally:
    rewards.unregister('test_steps')
  np.testing.assert_allclose(result.per_source['test_steps'], [0.25, 0.25])
  np.testing.assert_allclose(result.total, [1.25, 0.25])
  assert result.steps['test_steps'][0] == ([9, 33], [0.25, 0.0])
  assert 'math' not in result.steps
  assert result.metrics()['reward/test_steps/steps'] == 1.5


def test_runner_counts_step_scores_of_the_wrong_length_as_a_failure():
  def make():
    return lambda prompts, completions: rewards.StepScored(np.zeros(2), steps=[([], [])])
  rewards.register_factory('test_short', batched=True)(make)
  try:
    result = rewards.score(rewards.build({'test_short': {}}), ['q', 'q'], ['a', 'b'],
                           [{}, {}])
  finally:
    rewards.unregister('test_short')
  assert result.failures['test_short']['bad_type'] == 2
  assert 'test_short' not in result.steps


def test_step_rewards_land_on_each_steps_last_token(tmp_path):
  write_char_tokenizer(tmp_path)
  tok = Tokenizer.from_dir(tmp_path)
  text = '1+2=3\n3*2=6\nok'  # one token per character
  ids = tok.encode(text) + [tok.eos_id, 0, 0]
  steps, ends = process.split_steps(text)
  out = rl_parts.step_reward_tokens(tok, np.array([ids]), np.array([len(text) + 1]),
                                    [(ends, [0.5, -0.25, 0.125])], width=len(ids))
  want = np.zeros(len(ids), np.float32)
  want[[4, 10, 13]] = [0.5, -0.25, 0.125]  # the '3', the '6', the 'k'
  np.testing.assert_array_equal(out[0], want)


def test_step_rewards_follow_a_subword_tokenizer():
  tok = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  text = 'First, 12 + 15 = 27.\nThen 27 * 2 = 54.\nThe answer is \\boxed{54}.'
  ids = tok.encode(text)
  steps, ends = process.split_steps(text)
  out = rl_parts.step_reward_tokens(tok, np.array([ids + [tok.eos_id]]),
                                    np.array([len(ids) + 1]), [(ends, [1.0, 2.0, 3.0])],
                                    width=len(ids) + 1)
  for end, reward in zip(ends, (1.0, 2.0, 3.0)):
    j = int(np.flatnonzero(out[0] == reward)[0])
    # The token that completes the step's text: its prefix reaches the end, one less does not.
    assert len(tok.decode(ids[:j + 1])) >= end > len(tok.decode(ids[:j]))


def test_ppo_step_rewards_go_where_steps_end_and_gae_credits_them():
  rl = grpo.get_config().rl
  with rl.unlocked():
    rl.beta, rl.gamma, rl.lam, rl.whiten_advantages = 0.0, 1.0, 1.0, False
  weights = np.array([[1, 1, 1, 1, 0]], np.float32)
  step = np.array([[0, 0.9, 0, -0.5, 0.7]], np.float32)  # the last outside the mask
  out = rl_parts.ppo_advantages(np.array([1.0]), np.zeros_like(weights), weights, weights,
                                weights, rl=rl, step_rewards=step)
  # token rewards (0, 0.9, 0, -0.5 + 1.0, 0); the advantage is the reward-to-go.
  np.testing.assert_allclose(out['advantages'][0], [1.4, 1.4, 0.5, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize('scores, correct, want', [
    ([[0.1, 0.9, 0.5]], [[0, 1, 0]], 1.0),
    ([[0.9, 0.9, 0.5]], [[0, 1, 0]], 0.5),  # a tie between a right and a wrong answer
    ([[np.nan, 0.2, 0.1]], [[1, 0, 1]], 0.0),  # NaN never wins
    ([[np.nan, np.nan]], [[1, 0]], 0.5),  # ...unless all are NaN: a random pick
    ([[1, 2], [3, 2]], [[1, 0], [1, 0]], 0.5),
])
def test_best_of_n_by_hand(scores, correct, want):
  assert rerank.best_of_n(np.array(scores, float), np.array(correct, float)) == want


def test_prm_scores_aggregate_each_sample():
  def step_scorer(prompts, steps):
    return [np.array([0.8, 0.2, 0.6][:len(s)]) for s in steps]
  out = rerank.prm_scores(step_scorer, ['p'], [['a\nb\nc', '', 'a']], ('min', 'last'))
  np.testing.assert_allclose(out['min'], [[0.2, np.nan, 0.8]])
  np.testing.assert_allclose(out['last'], [[0.6, np.nan, 0.8]])


def test_multi_step_problems_have_two_to_four_correct_steps():
  fns = rewards.build({'math': {}})
  for split in ('multi_train', 'multi_test'):
    rows = arith.rows(split)
    assert len(rows) == arith.SIZES[split]
    assert len({r['prompt'][0]['content'] for r in rows}) == len(rows)
    for row in rows:
      *steps, final = row['completion'].split('\n')
      assert 2 <= len(steps) <= 4, row
      for step in steps:  # every reference step is right arithmetic
        a, op, b, c = re.fullmatch(r'(\d+) ([-+*]) (\d+) = (-?\d+)', step).groups()
        assert eval(f'{a} {op} {b}') == int(c) >= 0  # noqa: S307 -- our own digits
      assert steps[-1].endswith(f'= {row["answer"]}')
      assert final == f'The answer is \\boxed{{{row["answer"]}}}.'
    texts = [r['completion'] for r in rows]
    result = rewards.score(fns, ['q'] * len(rows), texts, rows)
    assert result.total.min() == 1.0  # the verifier accepts every worked answer
  train = {r['prompt'][0]['content'] for r in arith.rows('multi_train')}
  assert not train & {r['prompt'][0]['content'] for r in arith.rows('multi_test')}
  assert math.isclose(np.mean([len(r['completion'].split('\n')) - 1
                               for r in arith.rows('multi_test')]), 2.875)
