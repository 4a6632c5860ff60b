"""Process rewards: step splitting, aggregates and their per-step increments,
step rewards placed on tokens for PPO, best-of-n reranking, and the
multi-step arithmetic data the PRM recipes use."""

import json
import math
import re
import sys

import numpy as np
import pytest

from conftest import write_char_tokenizer
from jpost import rewards
from jpost.data import arith
from jpost.eval import rerank
from jpost.models import pretrained
from jpost.rewards import process
from jpost.tokenizer import Tokenizer
from jpost import trainers
from jpost.trainers import evaluate, online, prm, prm_labels, rl_parts
import overrides

sys.path.insert(0, 'configs')
import eval as eval_config  # noqa: E402
import grpo  # noqa: E402
import ppo  # noqa: E402
import prm as prm_config  # noqa: E402
import prm_labels as prm_labels_config  # noqa: E402


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


@pytest.mark.parametrize('values, steps, kind', [
    (np.zeros(2), [([1], [0.5])], 'bad_type'),  # steps for one completion of two
    (np.zeros(3), [([1], [0.5])] * 2, 'bad_type'),  # values for three
])
def test_runner_counts_step_scores_of_the_wrong_length_as_a_failure(values, steps, kind):
  rewards.register_factory('test_short', batched=True)(
      lambda: lambda prompts, completions: rewards.StepScored(values, steps=steps))
  try:
    result = rewards.score(rewards.build({'test_short': {}}), ['q', 'q'], ['a', 'b'],
                           [{}, {}])
  finally:
    rewards.unregister('test_short')
  assert result.failures['test_short'][kind] == 2
  assert 'test_short' not in result.steps  # nothing to place on tokens


def test_runner_drops_the_step_rewards_of_a_nan_value():
  rewards.register_factory('test_nan', batched=True)(
      lambda: lambda prompts, completions: rewards.StepScored(
          np.array([0.5, np.nan]), steps=[([1], [0.5]), ([1], [0.25])]))
  try:
    result = rewards.score(rewards.build({'test_nan': {}}), ['q', 'q'], ['a', 'b'], [{}, {}])
  finally:
    rewards.unregister('test_nan')
  assert result.failures['test_nan']['nan'] == 1
  assert result.steps['test_nan'] == [([1], [0.5]), ([], [])]


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
  rl = ppo.get_config().rl
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


def test_outcome_pairs_put_each_right_answer_over_a_wrong_one():
  row = lambda prompt, text, ok: {'prompt': [{'role': 'user', 'content': prompt}],
                                  'solution': text, 'correct': ok}
  rows = [row('p', 'a1', True), row('p', 'b1', False), row('q', 'c1', False),
          row('p', 'a2', True), row('p', 'b2', False), row('p', 'a3', True)]
  pairs = prm_labels.outcome_pairs(rows)
  assert [(p['chosen'], p['rejected']) for p in pairs] == [
      ('a1', 'b1'), ('a1', 'b2'), ('a2', 'b1'), ('a2', 'b2'), ('a3', 'b1'), ('a3', 'b2')]
  assert pairs[0]['prompt'] == rows[0]['prompt']  # q has no right answer: no pair


def _read(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize('limit', [-1, 2.5, True])
def test_a_bad_prompt_limit_is_a_clear_error(limit):
  config = overrides.apply(prm_labels_config.get_config('tiny').unlock(),
                           {'max_prompts': {'train': limit}})
  with pytest.raises(ValueError, match=r'config.max_prompts.train=.*: a number of prompts >= 0'):
    prm_labels._validate(config)


def test_a_failed_verification_labels_0_and_is_counted():
  from jpost import rewards
  from jpost.trainers import prm_labels
  counts = {'verify_failures': 0}
  verifier = rewards.build({'math': {'verify_timeout': 0.5}})
  ok = prm_labels.verified(verifier, 'p', ['\\boxed{9^{9^{9^{9}}}}', 'so \\boxed{5}'],
                           {'answer': '5'}, counts)
  np.testing.assert_array_equal(ok, [0.0, 1.0])
  assert counts == {'verify_failures': 1}


def test_prm_pipeline_labels_train_rerank_and_rl(tiny_checkpoint, tmp_path, one_device):
  """Labels from rollouts -> a PRM -> best-of-n in eval -> the 'prm' reward in
  GRPO and PPO: every stage reads what the one before wrote."""
  prompts = tmp_path / 'multi.jsonl'
  prompts.write_text(''.join(json.dumps(r) + '\n' for r in arith.rows('multi_test')[:3]))

  labels = overrides.apply(prm_labels_config.get_config('tiny').unlock(), {
      'model.path': str(tiny_checkpoint), 'splits': {'train': (str(prompts),)},
      'max_prompts': {'train': 3}, 'labels.solutions': 2, 'labels.rollouts': 3,
      # A random model seldom writes a newline: its words are the steps here.
      'labels.separator': ' ', 'labels.max_steps': 16, 'sampling.max_new_tokens': 8,
      'sampling.temperature': 1.0})
  stats = trainers.get('prm_labels')(labels.lock(), str(tmp_path / 'labels'))['train']
  rows = _read(tmp_path / 'labels' / 'steps_train.jsonl')
  assert stats['solutions'] == len(rows) == 6 - stats['no_steps'] - stats['too_many_steps']
  assert stats['rollouts'] == 3 * sum(len(r['steps']) - 1 for r in rows) > 0
  assert stats['verify_failures'] == 0
  for row in rows:
    assert len(row['labels']) == len(row['steps']) >= 1
    assert row['labels'][-1] == float(row['correct'])  # the answer labels its last step
    assert all(label in (0, 1 / 3, 2 / 3, 1) for label in row['labels'])  # 3 rollouts
  assert len(prm.load_examples([str(tmp_path / 'labels' / 'steps_train.jsonl')], 'error')) == len(rows)
  pairs = _read(tmp_path / 'labels' / 'pairs_train.jsonl')
  assert len(pairs) == stats['outcome_pairs'] <= stats['correct_solutions'] * 2

  steps_file = str(tmp_path / 'labels' / 'steps_train.jsonl')
  train = overrides.apply(prm_config.get_config('tiny').unlock(), {
      'model.path': str(tiny_checkpoint), 'data.train': (steps_file,), 'data.eval': (),
      'data.max_len': 128, 'total_steps': 2, 'checkpoint.every': 2})
  trainers.get('prm')(train.lock(), str(tmp_path / 'prm'))
  prm_dir = str(tmp_path / 'prm' / 'hf')

  # Best-of-n on saved completions: two prompts, four multi-line samples each.
  saved = tmp_path / 'completions.jsonl'
  saved.write_text(''.join(json.dumps({
      'prompt': f'Sam has {a} coins. How many?', 'extra': {'answer': str(a + 1)},
      'greedy': f'{a} + 1 = {a + 1}\n\\boxed{{{a + 1}}}', 'truncated': False,
      'samples': [f'{a} + 1 = {a + 1}\n\\boxed{{{a + 1}}}', f'{a} + 2 = {a + 2}\n\\boxed{{{a + 2}}}',
                  f'{a} - 1\nso\n\\boxed{{{a - 1}}}', 'no idea']}) + '\n' for a in (3, 8)))
  report = evaluate.run(overrides.apply(eval_config.get_config('tiny').unlock(), {
      'models': {'saved': str(saved)}, 'rerank.prm': prm_dir,
      'rerank.reward_model': prm_dir}).lock(), tmp_path / 'eval')
  result = report['models']['saved']
  assert result['best_of_n_random'] == 0.25 and result['best_of_n_pass'] == 1.0
  for key in ('prm_min', 'prm_last', 'prm_mean', 'prm_product', 'reward_model'):
    assert 0.0 <= result[f'best_of_n_{key}'] <= 1.0, key
  assert '## Best-of-n reranking' in (tmp_path / 'eval' / 'report.md').read_text()

  for recipe, name in ((grpo, 'grpo'), (ppo, 'ppo')):
    config = overrides.apply(recipe.get_config('tiny').unlock(), {
        'model.path': str(tiny_checkpoint), 'data.train': (str(prompts),),
        'data.eval': (str(prompts),), 'data.max_prompt_len': 128, 'total_steps': 1,
        'sampling.max_new_tokens': 16, 'sampling.temperature': 1.0,
        'rewards': {'prm': {'path': prm_dir, 'aggregate': 'min'}, 'math': {'weight': 1.0}}})
    online.run(config.lock(), tmp_path / name, name)
    records = _read(tmp_path / name / 'metrics.jsonl')
    assert [r['step'] for r in records] == [1], name
    for r in records:  # the per-step score distribution is logged every step
      assert 0 <= r['reward/prm/step_score_p10'] <= r['reward/prm/step_score_p90'] <= 1, name
      assert r['reward/prm/failures'] == 0 and r['reward/prm/steps'] >= 1, name
