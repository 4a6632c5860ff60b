"""The `eval` recipe end to end: saved completions, a tiny model, LLM judges."""

import json
import sys

import numpy as np
import pytest

from jpost.trainers import evaluate
import overrides

sys.path.insert(0, 'configs')
import eval as eval_config  # noqa: E402


def _completions(path, answers):
  rows = [{'prompt': f'Problem {i}', 'extra': {'answer': '60'}, 'truncated': False,
           'greedy': f'So the answer is \\boxed{{{a}}}.',
           'samples': [f'\\boxed{{{a}}}', 'I think 60', f'maybe {a}', 'no idea']}
          for i, a in enumerate(answers)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def _config(models, **changes):
  c = eval_config.get_config('tiny')
  with c.unlocked():
    c.models = models
    overrides.apply(c, changes)
  return c


def test_saved_completions_are_graded_ranked_and_reported(tmp_path):
  # The seed's example: with gold 60, \boxed{60} is correct and \boxed{55} is not.
  good = _completions(tmp_path / 'good.jsonl', ['60'] * 6)
  bad = _completions(tmp_path / 'bad.jsonl', ['55'] * 6)
  mixed = _completions(tmp_path / 'mixed.jsonl', ['60', '55'] * 3)
  out = evaluate.run(_config({'bad': str(bad), 'good': str(good), 'mixed': str(mixed)}),
                     tmp_path / 'report')
  models = out['models']
  assert models['good']['greedy_accuracy'] == 1.0 and models['bad']['greedy_accuracy'] == 0.0
  assert models['mixed']['greedy_accuracy'] == 0.5
  # Samples: 'I think 60' is right by the last-number rule, 'maybe 55' and 'no idea' not.
  assert models['bad']['sampled_accuracy'] == pytest.approx(0.25)
  assert models['good']['pass@4'] == 1.0 and models['good']['maj@4'] == 1.0
  assert models['bad']['maj@4'] == 0.0  # 55, 60, 55: the majority is wrong
  ranking = [row['model'] for row in out['leaderboard']]
  assert ranking == ['good', 'mixed', 'bad']
  report = (tmp_path / 'report' / 'report.md').read_text()
  for text in ('## Ground truth', '## Leaderboard', 'leaderboard.png', 'win_matrix.png'):
    assert text in report
  assert (tmp_path / 'report' / 'report.html').stat().st_size > 10_000  # plots embedded


def test_failed_verifications_count_as_wrong_and_are_reported(tmp_path, capsys):
  # One greedy answer the verifier cannot decide in time (a power tower).
  path = _completions(tmp_path / 'm.jsonl', ['60', '9^{9^{9^{9}}}', '60'])
  config = _config({'m': str(path)}, **{'rewards.math.verify_timeout': 0.5})
  models = evaluate.run(config, tmp_path / 'report')['models']
  # Scoring: the greedy answer and the boxed sample. maj@4's votes over the
  # extracted samples (the tower, '60', '9' from 'maybe 9^...', None): '60'
  # and '9' each against the tower's group, then the winning (first) group
  # against the gold 60. Each counts as no match; the eval goes on.
  assert models['m']['verify_failures'] == 2 + 3
  assert models['m']['greedy_accuracy'] == pytest.approx(2 / 3)
  assert models['m']['maj@4'] == pytest.approx(2 / 3)
  assert 'm: greedy accuracy 0.667 on 3 prompts; 5 verifications failed' in capsys.readouterr().err
  assert 'verify_failures' in (tmp_path / 'report' / 'report.md').read_text()


def _judge(body):
  """Pairwise: always 'A' (pure position bias). Rubric: fixed valid scores."""
  if '"verdict"' in body['messages'][-1]['content']:
    return 200, json.dumps({'verdict': 'A', 'rationale': 'the first one'})
  return 200, json.dumps({'helpfulness': 7, 'factuality': 4, 'clarity': 1,
                          'rationale': 'scripted'})


def test_models_judged_by_an_endpoint(tiny_checkpoint, tmp_path, chat_server):
  endpoint = chat_server(_judge)
  config = _config({'a': str(tiny_checkpoint), 'b': str(tiny_checkpoint)}, **{
      'pairwise.judge': 'endpoint', 'pairwise.endpoint': endpoint,
      'pairwise.model': 'judge', 'rubric.name': 'amazon_summary',
      'rubric.judge': {'endpoint': endpoint, 'model': 'judge'},
      'general.judge': 'endpoint', 'general.endpoint': endpoint, 'general.model': 'judge'})
  out = evaluate.run(config, tmp_path)
  battles = [json.loads(line) for line in (tmp_path / 'battles.jsonl').read_text().splitlines()]
  assert len(battles) == 48  # every held-out arith prompt
  assert {b['winner'] for b in battles} == {'tie'}  # position bias removed by swapping
  # Amazon rubric, weights 0.4/0.4/0.2 on (7, 4, 1) over 1..7: 0.4*1 + 0.4*0.5 + 0 = 0.6.
  assert out['models']['a']['rubric'] == pytest.approx(0.6)
  # The forgetting check: the same weights, so no drift; a random model's NLL
  # on general text is about ln(vocabulary).
  assert out['models']['b']['general_drift_nll'] == 0.0
  assert abs(out['models']['a']['general_nll'] - np.log(49152)) < 0.5
  # Its judged half: b's answers to the 24 built-in instructions against a's,
  # by a judge that always says 'A': swapped orders disagree, every pair a tie.
  answers = (tmp_path / 'general_answers_b.jsonl').read_text().splitlines()
  assert len(answers) == 24
  b = out['models']['b']
  assert (b['general_ties'], b['general_win_rate'], b['general_failures']) == (24, 0.5, 0)
  report = (tmp_path / 'report.md').read_text()
  assert '## General instructions (forgetting check, judged)' in report
  assert '## Forgetting next to task gain' in report
  # The completions file written for 'a' evaluates again without sampling.
  again = evaluate.run(_config({'a': str(tmp_path / 'completions_a.jsonl')},
                               **{'pairwise.judge': 'none'}), tmp_path / 'again')
  assert again['models']['a']['greedy_accuracy'] == out['models']['a']['greedy_accuracy']


def test_completions_are_matched_by_prompt_not_by_row(tmp_path):
  good = _completions(tmp_path / 'good.jsonl', ['60', '55', '60', '60'])
  lines = (tmp_path / 'good.jsonl').read_text().splitlines()
  (tmp_path / 'shuffled.jsonl').write_text('\n'.join(lines[::-1]) + '\n')
  evaluate.run(_config({'a': str(good), 'b': str(tmp_path / 'shuffled.jsonl')}), tmp_path / 'out')
  battles = [json.loads(x) for x in (tmp_path / 'out' / 'battles.jsonl').read_text().splitlines()]
  assert {b['winner'] for b in battles} == {'tie', 'both_bad'}  # same answers, same prompts
  other = _completions(tmp_path / 'other.jsonl', ['60'] * 3)
  with pytest.raises(ValueError, match='answered other prompts'):
    evaluate.run(_config({'a': str(good), 'b': str(other)}), tmp_path / 'out2')


def test_bad_forgetting_judges_are_refused_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="general.judge='oracle'"):
    evaluate.run(_config({'a': 'x'}, **{'general.judge': 'oracle'}), tmp_path)
  with pytest.raises(ValueError, match='needs general.judge_model'):
    evaluate.run(_config({'a': 'x'}, **{'general.judge': 'reward_model'}), tmp_path)
  with pytest.raises(FileNotFoundError, match="'builtin'"):
    evaluate.run(_config({'a': 'x'}, **{'general.instructions': 'nope.jsonl'}), tmp_path)


def test_reranking_one_sample_is_refused(tmp_path):
  path = _completions(tmp_path / 'm.jsonl', ['60'])
  with pytest.raises(ValueError, match=r'rerank picks the best of sampling.num_samples answers, '
                                       r'which is 1'):
    evaluate.run(_config({'m': str(path)}, **{'rerank.reward_model': 'runs/rm/hf',
                                               'sampling.num_samples': 1}), tmp_path / 'out')


def test_the_gold_column_is_one_for_the_verifier_and_maj_at_k(tmp_path):
  path = _completions(tmp_path / 'm.jsonl', ['60'])
  with pytest.raises(ValueError, match=r"answer_key='solution' but config.rewards.math."
                                       r"answer_key='answer'"):
    evaluate.run(_config({'m': str(path)}, answer_key='solution'), tmp_path / 'out')


def test_bad_completions_file_names_the_line(tmp_path):
  path = tmp_path / 'broken.jsonl'
  path.write_text(json.dumps({'prompt': 'p', 'greedy': 'g'}) + '\n')
  with pytest.raises(ValueError, match='broken.jsonl:1'):
    evaluate.run(_config({'x': str(path)}), tmp_path / 'out')


def test_reward_model_judge_prefers_the_higher_score(tiny_checkpoint, tmp_path):
  from jpost.models import reward
  from jpost.tokenizer import Tokenizer
  judge_dir = reward.save(reward.load(tiny_checkpoint, seed=1, init_std=0.5), tmp_path / 'rm',
                          tokenizer=Tokenizer.from_dir(tiny_checkpoint))
  config = _config({'a': 'x'}, **{'general.judge': 'reward_model',
                                  'general.judge_model': str(judge_dir)})
  judge, what = evaluate.instruction_judge(config, 'a')
  scores = reward.load_scorer(judge_dir)(['Name a colour.'] * 2, ['Blue.', 'A banana.'])
  assert scores[0] != scores[1] and 'reward model' in what
  want = 'win' if scores[0] > scores[1] else 'loss'
  assert judge('Name a colour.', 'Blue.', 'A banana.') == want
  assert judge('Name a colour.', 'Blue.', 'Blue.') == 'tie'


def test_likelihood_judge_decides_by_the_position_free_margin(tiny_checkpoint):
  from jpost.eval import local_judge
  from jpost.models import hf
  from jpost.tokenizer import Tokenizer
  config = _config({'a': str(tiny_checkpoint)}, **{'general.margin': 0.0})
  judge, what = evaluate.instruction_judge(config, 'a')  # judge_model '': the anchor judges
  margin = local_judge.preference_margin(hf.load(tiny_checkpoint),
                                         Tokenizer.from_dir(tiny_checkpoint),
                                         'Name a colour.', 'Blue.', 'A banana.')
  assert margin != 0 and 'position bias cancelled' in what
  assert judge('Name a colour.', 'Blue.', 'A banana.') == ('win' if margin > 0 else 'loss')
  assert judge('Name a colour.', 'A banana.', 'Blue.') == ('loss' if margin > 0 else 'win')
  assert judge('Name a colour.', 'Blue.', 'Blue.') == 'tie'


@pytest.mark.parametrize('changes, message', [
    ({'rewards.math.weight': 0.5}, r'rewards.math.weight=0.5: the eval reads the verifier'),
    ({'rewards.format': {'weight': 0.6}}, r"config.rewards has \['format', 'math'\]"),
])
def test_correct_is_the_verifiers_verdict_not_a_weighted_sum(tmp_path, changes, message):
  """Correctness was total > 0.5: a math weight of 0.5 made every right answer
  wrong, a format reward of 0.6 every wrong one right, while maj@k ignored both."""
  path = _completions(tmp_path / 'm.jsonl', ['60'] * 3)
  config = _config({'m': str(path)})
  with config.unlocked():
    overrides.apply(config, changes)
  with pytest.raises(ValueError, match=message):
    evaluate.run(config, tmp_path / 'out')


def test_a_prompt_given_twice_is_aligned_row_by_row(tmp_path):
  rows = _completions(tmp_path / 'a.jsonl', ['60', '55']).read_text().splitlines()
  same_prompt = [json.dumps(dict(json.loads(r), prompt='Problem 0')) for r in rows]
  (tmp_path / 'a.jsonl').write_text('\n'.join(same_prompt) + '\n')
  (tmp_path / 'b.jsonl').write_text('\n'.join(same_prompt) + '\n')
  out = evaluate.run(_config({'a': str(tmp_path / 'a.jsonl'), 'b': str(tmp_path / 'b.jsonl')}),
                     tmp_path / 'out')
  assert out['models']['b']['greedy_accuracy'] == 0.5
  battles = [json.loads(x) for x in (tmp_path / 'out' / 'battles.jsonl').read_text().splitlines()]
  assert [b['winner'] for b in battles] == ['tie', 'both_bad']  # each row met its own twin


def test_bad_completions_files_are_one_line_errors(tmp_path):
  good = _completions(tmp_path / 'good.jsonl', ['60', '55']).read_text()
  cases = {
      'empty': ('', r'empty.jsonl: no completions rows'),
      'blank_then_bad': (good + '\n{not json\n', r'blank_then_bad.jsonl:4: not a JSON object'),
      'ragged': (good + json.dumps(dict(json.loads(good.splitlines()[0]), prompt='x',
                                        samples=['1', '2'])) + '\n',
                 r'ragged.jsonl:3: 2 samples where .*ragged.jsonl:1 has 4'),
  }
  for name, (text, message) in cases.items():
    (tmp_path / f'{name}.jsonl').write_text(text)
    with pytest.raises(ValueError, match=message):
      evaluate.run(_config({'m': str(tmp_path / f'{name}.jsonl')}), tmp_path / 'out')
  (tmp_path / 'blank.jsonl').write_text(good.replace('\n', '\n\n'))  # blank lines are skipped
  assert evaluate.load_completions(tmp_path / 'blank.jsonl') == evaluate.load_completions(
      tmp_path / 'good.jsonl')
