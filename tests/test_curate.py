"""Data curation: duplicates at the stated threshold, decontamination spans,
each filter's count, the recipe's files, bad input."""

import json
import random
import sys

import pytest

from jpost import trainers
from jpost.data import curate
from jpost.errors import ConfigError, MissingPathError

sys.path.insert(0, 'configs')
import curate as curate_config  # noqa: E402

VOCAB = [f'w{i}' for i in range(400)]


def _text(seed, n=120):
  rng = random.Random(seed)
  return ' '.join(rng.choice(VOCAB) for _ in range(n))


def _replace(text, positions):
  words = text.split()
  for p in positions:
    words[p] = 'changed'
  return ' '.join(words)


def _row(prompt, completion):
  return {'prompt': prompt, 'completion': completion}


def _words(text):
  return len(text.split())


SETTINGS = curate.Settings(min_tokens=3, num_perm=256)


def test_exact_and_near_duplicates_at_the_threshold():
  base = _text(0)
  near = _replace(base, [60])  # one word: 5 of 116 shingles change
  below = _replace(base, [15, 45, 75, 105])  # four words, 20 shingles
  assert round(curate.jaccard(curate.shingles(base, 5), curate.shingles(near, 5)), 3) == 0.917
  assert round(curate.jaccard(curate.shingles(base, 5), curate.shingles(below, 5)), 3) == 0.706
  rows = [_row('Q one', base), _row('q   ONE!', base.upper() + ' .'), _row('Q one', near),
          _row('Q one', below), _row('Q two', _text(1))]
  result = curate.curate(rows, 'sft', _words, SETTINGS)
  assert result.kept == [0, 3, 4]
  assert result.reasons[1][0] == 'exact_duplicate'
  assert result.reasons[2][0] == 'near_duplicate'
  # A stricter threshold keeps the near duplicate too.
  strict = curate.curate(rows, 'sft', _words, curate.Settings(min_tokens=3, num_perm=256,
                                                               near_threshold=0.95))
  assert strict.kept == [0, 2, 3, 4]


def test_a_contaminated_row_is_found_with_its_span():
  leaked = ('natalia sold clips to 48 of her friends in april and then she sold half as many '
            'clips in may')
  eval_texts = [f'Question: {leaked.capitalize()}. How many clips did she sell?']
  rows = [_row('Solve this.', f'As we know, {leaked}; so the answer is 72.'),
          _row('Solve this.', 'natalia sold clips to 48 of her friends in june, nothing more.')]
  result = curate.curate(rows, 'sft', _words, SETTINGS, eval_texts)
  assert result.kept == [1]  # 9 shared words: under the 13-gram bar
  reason, span = result.reasons[0]
  assert reason == 'contaminated' and span == leaked


def test_each_filter_counts_its_rows():
  s = curate.Settings(min_tokens=4, max_tokens=40, min_ratio=0.5, max_ratio=20,
                      num_perm=128)
  rows = [
      _row('What is two plus two?', 'Two plus two is four.'),  # kept
      _row('Hi', 'ok'),  # too_short
      _row('Tell me.', ' '.join(['long'] * 60)),  # too_long
      _row('A rather long question with many words in it?', 'Yes.'),  # ratio 1/10
      _row('List.', 'a\nb\na\na\na'),  # repeated_lines
      _row('Go on.', ' '.join(['the cat sat'] * 10)),  # repeated_ngrams
      {'prompt': 'Empty?', 'completion': '   '},  # invalid
  ]
  result = curate.curate(rows, 'sft', _words, s)
  report = curate.report(result, rows)
  assert result.kept == [0]
  assert report['dropped'] == {'invalid': 1, 'too_short': 1, 'too_long': 1, 'ratio': 1,
                               'repeated_lines': 1, 'repeated_ngrams': 1}
  assert report['examples']['invalid'][0]['detail'].startswith('empty_completion')


def test_preference_rows_equal_after_normalising_and_length_bias():
  rows = [{'prompt': 'Pick one.', 'chosen': 'The answer is 4.', 'rejected': 'the answer is 4'},
          {'prompt': 'Pick two.', 'chosen': ' '.join(['long'] * 5 + ['answer'] * 5),
           'rejected': 'short'},
          {'prompt': 'Pick three.', 'chosen': 'yes it is', 'rejected': 'no it is not'}]
  result = curate.curate(rows, 'preference', _words, curate.Settings(min_tokens=2))
  assert result.reasons[0][0] == 'same_after_normalising' and result.kept == [1, 2]
  bias = result.length_bias
  assert bias['pairs'] == 3 and bias['chosen_over_3x_longer'] == 1
  assert bias['chosen_longer_fraction'] == pytest.approx(1 / 3)


def test_curate_recipe_writes_rows_report_and_plot(tiny_checkpoint, tmp_path):
  train = tmp_path / 'train.jsonl'
  rows = [_row(f'Question {i}?', _text(i, 30)) for i in range(6)]
  rows += [rows[0], _row('Question 0?', _replace(rows[1]['completion'], [29])),
           _row('Leak?', 'the ' + _text(100, 20))]
  train.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{broken\n')
  test = tmp_path / 'test.jsonl'
  test.write_text(json.dumps({'prompt': 'x', 'answer': _text(100, 20)}) + '\n')
  config = curate_config.get_config()
  with config.unlocked():
    config.model.path = str(tiny_checkpoint)
    config.data.train, config.data.eval = (str(train),), (str(test),)
  report = trainers.get('curate')(config, str(tmp_path / 'out'))
  assert report['rows_in'] == 9 and report['rows_kept'] == 6
  assert report['dropped'] == {'exact_duplicate': 1, 'near_duplicate': 1, 'contaminated': 1}
  assert report['unreadable']['skipped'] == 1
  kept = [json.loads(line) for line in (tmp_path / 'out' / 'curated.jsonl').read_text()
          .splitlines()]
  assert kept == rows[:6]
  assert json.loads((tmp_path / 'out' / 'curate_report.json').read_text()) == report
  assert (tmp_path / 'out' / 'curate_lengths.png').read_bytes()[:4] == b'\x89PNG'


def test_bad_curate_input_is_a_clear_error(tiny_checkpoint, tmp_path):
  for threshold in (0.0, 1.5):
    with pytest.raises(ConfigError, match='near_threshold'):
      curate.Settings(near_threshold=threshold)
  config = curate_config.get_config()
  with config.unlocked():
    config.model.path = str(tiny_checkpoint)
    config.data.eval = (str(tmp_path / 'missing.jsonl'),)
  with pytest.raises(MissingPathError, match='missing.jsonl'):
    trainers.get('curate')(config, str(tmp_path / 'out'))


def test_math_symbols_make_texts_different():
  rows = [{'prompt': 'What is 9 + 8? Put the answer in \\boxed{}.'},
          {'prompt': 'What is 9 * 8? Put the answer in \\boxed{}.'},
          {'prompt': 'what is 9+8?  put the answer in boxed'}]
  result = curate.curate(rows, 'prompt', _words, curate.Settings(min_tokens=1))
  assert result.kept == [0, 1] and result.reasons[2][0] == 'exact_duplicate'
  # A short eval question (under 13 words) copied whole is contamination.
  found = curate.curate(rows[:2], 'prompt', _words, curate.Settings(min_tokens=1),
                        ['What is 9 * 8? Put the answer in \\boxed{}.'])
  assert found.kept == [0] and found.reasons[1] == ('contaminated',
                                                    'what is 9 * 8 put the answer in boxed')


def test_copies_of_a_short_eval_row_and_of_a_dropped_row_are_contaminated():
  """An eval row whose strings are each under 13 words, copied whole into an
  SFT row, was kept (its strings matched only whole texts, the training row
  is prompt and answer joined); a copy of a contaminated row was counted as a
  duplicate of a row that was not kept."""
  from jpost.trainers.curate import _eval_texts
  eval_row = {'prompt': 'What is 17 * 23? Answer with a number.',
              'completion': '17 * 23 = 391. The answer is 391.'}
  chat_row = {'messages': [{'role': 'user', 'content': 'What is 7 * 8 exactly?'},
                           {'role': 'assistant', 'content': '7 * 8 = 56.'}]}
  eval_texts = _eval_texts(eval_row) + _eval_texts(chat_row)
  settings = curate.Settings(min_tokens=1, num_perm=256)
  rows = [_row(eval_row['prompt'], eval_row['completion']),
          _row(eval_row['prompt'], eval_row['completion']),  # an exact copy of the leak
          {'messages': chat_row['messages']},
          _row('What is 6 * 9?', '6 * 9 = 54.')]
  result = curate.curate(rows, 'sft', _words, settings, eval_texts)
  assert result.kept == [3]
  assert [result.reasons[i][0] for i in range(3)] == ['contaminated'] * 3
