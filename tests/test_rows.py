"""Row validation: every accepted format, every bad-input case, the policy."""

from __future__ import annotations

import functools
import pickle

import pytest

from jpost.data import rows as rows_lib
from jpost.data.rows import RowError, RowFilter

SYS = {'role': 'system', 'content': 'Be brief.'}
USER = {'role': 'user', 'content': 'What is 2+2?'}
ASST = {'role': 'assistant', 'content': '4'}
USER2 = {'role': 'user', 'content': 'And 3+3?'}
ASST2 = {'role': 'assistant', 'content': '6'}
WRONG = {'role': 'assistant', 'content': '5'}


# --- SFT ------------------------------------------------------------------

@pytest.mark.parametrize('row, expected', [
    ({'messages': [SYS, USER, ASST]},
     {'format': 'chat', 'messages': [SYS, USER, ASST],
      'completion_start': None}),
    ({'messages': [USER, ASST, USER2, ASST2], 'id': 7},
     {'format': 'chat', 'messages': [USER, ASST, USER2, ASST2],
      'completion_start': None}),
    ({'prompt': [SYS, USER], 'completion': [ASST]},
     {'format': 'chat', 'messages': [SYS, USER, ASST],
      'completion_start': 2}),
    ({'prompt': 'What is 2+2?', 'completion': ' 4'},
     {'format': 'text', 'prompt': 'What is 2+2?', 'completion': ' 4'}),
    ({'prompt': 'What is 2+2?', 'completion': [ASST]},
     {'format': 'chat', 'messages': [USER, ASST], 'completion_start': 1}),
    ({'prompt': [USER], 'completion': '4'},
     {'format': 'chat', 'messages': [USER, ASST], 'completion_start': 1}),
    # Tool messages and extra message keys pass through.
    ({'messages': [USER, {'role': 'tool', 'content': '4', 'name': 'calc'},
                   ASST]},
     {'format': 'chat', 'completion_start': None,
      'messages': [USER, {'role': 'tool', 'content': '4', 'name': 'calc'},
                   ASST]}),
    # The location tag that sources add is not a content column.
    ({'messages': [USER, ASST], '_where': 'x.jsonl:1'},
     {'format': 'chat', 'messages': [USER, ASST], 'completion_start': None}),
])
def test_normalize_sft_formats(row, expected):
  assert rows_lib.normalize_sft(row, where='rows[0]') == expected


def test_normalize_sft_does_not_alias_input():
  row = {'messages': [dict(USER), dict(ASST)]}
  out = rows_lib.normalize_sft(row, where='rows[0]')
  out['messages'][0]['content'] = 'changed'
  assert row['messages'][0]['content'] == 'What is 2+2?'


@pytest.mark.parametrize('row, reason, fragment', [
    (['not', 'a', 'dict'], 'not_an_object', 'list'),
    ({'conversations': [USER, ASST]}, 'missing_key',
     "neither 'messages' nor 'prompt'/'completion' (its keys: "
     "['conversations'])"),
    ({'prompt': 'hi'}, 'missing_key', "'completion'"),
    ({'prompt': None, 'completion': 'x'}, 'missing_key', "'prompt'"),
    ({'messages': [USER, ASST], 'prompt': 'hi'}, 'conflicting_keys',
     "'messages'"),
    ({'messages': 'hello'}, 'bad_type', "'messages' is a str"),
    ({'messages': [USER, 'hi']}, 'bad_type', 'messages[1] is a str'),
    ({'prompt': 3, 'completion': 'x'}, 'bad_type', "'prompt' is a int"),
    ({'messages': [USER, {'content': '4'}]}, 'missing_key',
     "messages[1] has no 'role'"),
    ({'messages': [{'from': 'human', 'value': 'hi'}]}, 'missing_key',
     "messages[0] has no 'role'"),
    ({'messages': [USER, {'role': 'assistant'}]}, 'missing_key',
     "messages[1] has no 'content'"),
    ({'messages': [USER, {'role': 'gpt', 'content': '4'}]}, 'unknown_role',
     "messages[1].role is 'gpt'"),
    ({'messages': [USER, {'role': 'assistant', 'content': ['4']}]},
     'non_string_content', 'messages[1].content is a list'),
    ({'prompt': [USER], 'completion': [{'role': 'assistant', 'content': 4}]},
     'non_string_content', 'completion[0].content is a int'),
    ({'messages': []}, 'empty_conversation', "'messages' is empty"),
    ({'prompt': 'q', 'completion': ''}, 'empty_completion', "'completion'"),
    ({'prompt': 'q', 'completion': ' \n\t'}, 'empty_completion',
     "'completion'"),
    ({'prompt': [USER], 'completion': []}, 'empty_completion',
     "'completion'"),
    ({'prompt': [USER], 'completion': [{'role': 'assistant',
                                        'content': '  '}]},
     'empty_completion', "'completion'"),
])
def test_normalize_sft_errors(row, reason, fragment):
  with pytest.raises(RowError) as info:
    rows_lib.normalize_sft(row, where='data/train.jsonl:12')
  err = info.value
  assert err.reason == reason
  assert err.where == 'data/train.jsonl:12'
  message = str(err)
  assert message.startswith('data/train.jsonl:12: ')
  assert fragment in message
  # Says what to do, in brackets after what was wrong.
  assert message.endswith(')') and ' (' in message


@pytest.mark.parametrize('row, reason', [
    ({'messages': [SYS, USER]}, 'no_assistant_turn'),
    ({'prompt': [SYS], 'completion': [USER]}, 'no_assistant_turn'),
    ({'messages': [USER, {'role': 'assistant', 'content': ' '}]},
     'empty_completion'),
])
def test_require_assistant(row, reason):
  # Fine for whole-sequence masks ...
  assert rows_lib.normalize_sft(row, where='rows[4]')['format'] == 'chat'
  # ... an error for the assistant-only ones.
  with pytest.raises(RowError, match=r'^rows\[4\]: ') as info:
    rows_lib.normalize_sft(row, where='rows[4]', require_assistant=True)
  assert info.value.reason == reason


# --- preference -----------------------------------------------------------

@pytest.mark.parametrize('row, expected', [
    ({'prompt': 'Q', 'chosen': 'good', 'rejected': 'bad'},
     {'format': 'text', 'prompt': 'Q', 'chosen': 'good', 'rejected': 'bad'}),
    ({'prompt': [SYS, USER], 'chosen': [ASST], 'rejected': [WRONG]},
     {'format': 'chat', 'prompt': [SYS, USER], 'chosen': [ASST],
      'rejected': [WRONG]}),
    # Mixed: text prompt -> user message, text responses -> assistant.
    ({'prompt': 'What is 2+2?', 'chosen': [ASST], 'rejected': '5'},
     {'format': 'chat', 'prompt': [USER], 'chosen': [ASST],
      'rejected': [WRONG]}),
    # Implicit prompt: the longest common prefix of the conversations.
    ({'chosen': [SYS, USER, ASST], 'rejected': [SYS, USER, WRONG]},
     {'format': 'chat', 'prompt': [SYS, USER], 'chosen': [ASST],
      'rejected': [WRONG]}),
    ({'chosen': [USER, ASST, USER2, ASST2],
      'rejected': [USER, ASST, USER2, WRONG]},
     {'format': 'chat', 'prompt': [USER, ASST, USER2], 'chosen': [ASST2],
      'rejected': [WRONG]}),
    # Multi-turn responses that differ from the first assistant turn on.
    ({'chosen': [USER, ASST, USER2, ASST2], 'rejected': [USER, WRONG]},
     {'format': 'chat', 'prompt': [USER], 'chosen': [ASST, USER2, ASST2],
      'rejected': [WRONG]}),
])
def test_normalize_preference_formats(row, expected):
  assert rows_lib.normalize_preference(row, where='rows[0]') == expected | {'margin': 0.0}


@pytest.mark.parametrize('margin', [0.5, 2, -1.0])
def test_a_preference_rows_margin_is_kept(margin):
  row = {'prompt': 'Q', 'chosen': 'good', 'rejected': 'bad', 'margin': margin}
  assert rows_lib.normalize_preference(row, where='rows[0]')['margin'] == float(margin)


@pytest.mark.parametrize('row, reason, fragment', [
    ('chosen', 'not_an_object', 'str'),
    ({'prompt': 'Q', 'chosen': 'a'}, 'missing_key', "'rejected'"),
    ({'prompt': 'Q', 'rejected': 'a'}, 'missing_key', "'chosen'"),
    ({'chosen': 'a', 'rejected': 'b'}, 'missing_key', "no 'prompt'"),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': 'a'},
     'chosen_equals_rejected', 'identical'),
    ({'prompt': [USER], 'chosen': [ASST], 'rejected': '4'},
     'chosen_equals_rejected', 'identical'),
    ({'chosen': [USER, ASST], 'rejected': [USER, ASST]},
     'chosen_equals_rejected', 'identical'),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': '  '}, 'empty_completion',
     "'rejected'"),
    ({'prompt': 'Q', 'chosen': [], 'rejected': 'b'}, 'empty_completion',
     "'chosen'"),
    ({'chosen': [USER, ASST], 'rejected': [USER, ASST, USER2, ASST2]},
     'empty_completion', "'chosen' adds no messages"),
    ({'chosen': [USER, ASST], 'rejected': [USER2, ASST]},
     'no_common_prompt', "chosen[0] is a 'user' message"),
    ({'prompt': 'Q', 'chosen': {'a': 1}, 'rejected': 'b'}, 'bad_type',
     "'chosen' is a dict"),
    ({'prompt': 'Q', 'chosen': [ASST], 'rejected': [{'role': 'bot',
                                                    'content': 'x'}]},
     'unknown_role', "rejected[0].role is 'bot'"),
    ({'chosen': [USER, ASST], 'rejected': [USER, {'role': 'assistant',
                                                  'content': None}]},
     'missing_key', "rejected[1] has no 'content'"),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': 'b', 'margin': 'high'}, 'bad_margin',
     "'margin' is 'high', not a finite number"),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': 'b', 'margin': float('nan')}, 'bad_margin',
     "'margin' is nan"),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': 'b', 'margin': True}, 'bad_margin',
     "'margin' is True"),
])
def test_normalize_preference_errors(row, reason, fragment):
  with pytest.raises(RowError) as info:
    rows_lib.normalize_preference(row, where='prefs.jsonl:3')
  assert info.value.reason == reason
  assert str(info.value).startswith('prefs.jsonl:3: ')
  assert fragment in str(info.value)


# --- RL prompts -----------------------------------------------------------

@pytest.mark.parametrize('row, expected', [
    ({'prompt': 'Q', 'answer': '72', 'tests': [{'in': 1}]},
     {'format': 'text', 'prompt': 'Q',
      'extra': {'answer': '72', 'tests': [{'in': 1}]}}),
    ({'prompt': [SYS, USER], 'rubric': 'be right', '_where': 'f.jsonl:1'},
     {'format': 'chat', 'prompt': [SYS, USER],
      'extra': {'rubric': 'be right'}}),
    ({'prompt': [USER]}, {'format': 'chat', 'prompt': [USER], 'extra': {}}),
])
def test_normalize_prompt_formats(row, expected):
  assert rows_lib.normalize_prompt(row, where='rows[0]') == expected


@pytest.mark.parametrize('row, reason, fragment', [
    ({'question': 'Q', 'answer': '1'}, 'missing_key', "no 'prompt'"),
    ({'prompt': ''}, 'empty_prompt', "'prompt' is empty"),
    ({'prompt': []}, 'empty_prompt', "'prompt' is empty"),
    ({'prompt': [{'role': 'human', 'content': 'Q'}]}, 'unknown_role',
     "prompt[0].role is 'human'"),
    ({'prompt': [{'role': 'user', 'content': {'text': 'Q'}}]},
     'non_string_content', 'prompt[0].content is a dict'),
    ({'prompt': 42}, 'bad_type', "'prompt' is a int"),
])
def test_normalize_prompt_errors(row, reason, fragment):
  with pytest.raises(RowError) as info:
    rows_lib.normalize_prompt(row, where='rl.parquet[9]')
  assert info.value.reason == reason
  assert str(info.value).startswith('rl.parquet[9]: ')
  assert fragment in str(info.value)


# --- RowError and RowFilter -----------------------------------------------

def test_row_error_message_and_pickle():
  err = RowError('too_long', 'a.jsonl:3', 'row is 5000 tokens, max_len 4096',
                 'raise max_len or truncate')
  assert str(err) == ('a.jsonl:3: row is 5000 tokens, max_len 4096 '
                      '(raise max_len or truncate)')
  assert isinstance(err, ValueError)
  back = pickle.loads(pickle.dumps(err))
  assert (back.reason, back.where, str(back)) == (
      err.reason, err.where, str(err))


@pytest.mark.parametrize('kwargs, fragment', [
    ({'policy': 'drop'}, "'drop'"),
    ({'max_examples': -1}, 'max_examples=-1'),
])
def test_row_filter_validates(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    RowFilter(**kwargs)


BAD_SFT_ROWS = [
    {'messages': [USER, ASST]},                             # ok
    {'messages': [USER, {'role': 'bot', 'content': 'x'}]},  # unknown_role
    {'prompt': 'q', 'completion': ''},                      # empty_completion
    {'prompt': 'q', 'completion': 'a'},                     # ok
    {'messages': [USER, {'role': 'robot', 'content': 'x'}]},  # unknown_role
    {'text': 'hello'},                                      # missing_key
    {'messages': [USER, {'role': 'user', 'content': 3}]},   # non_string
    {'messages': [USER, {'role': 'tool', 'content': 1}]},   # non_string
    {'messages': [USER, {'role': 'x', 'content': 'y'}]},    # unknown_role
]


def _run(row_filter, fn=rows_lib.normalize_sft, rows=BAD_SFT_ROWS):
  out = []
  for i, row in enumerate(rows):
    where = f'rows[{i}]'
    out.append(row_filter.apply(functools.partial(fn, where=where), row,
                                where))
  return out


def test_row_filter_error_policy_raises_first_bad_row():
  with pytest.raises(RowError,
                     match=r"^rows\[1\]: messages\[1\]\.role is 'bot'"):
    _run(RowFilter(policy='error'))


def test_row_filter_skip_policy_counts_by_reason():
  row_filter = RowFilter(policy='skip')
  out = _run(row_filter)
  kept = [r for r in out if r is not None]
  assert [out.index(r) for r in kept] == [0, 3]
  assert out[1] is None
  stats = row_filter.stats()
  assert stats['policy'] == 'skip'
  assert (stats['seen'], stats['kept'], stats['skipped']) == (9, 2, 7)
  assert stats['skipped_by_reason'] == {
      'empty_completion': 1, 'missing_key': 1, 'non_string_content': 2,
      'unknown_role': 3}
  # The first five examples are kept, in order, with their messages.
  examples = stats['examples']
  assert [e['where'] for e in examples] == [
      'rows[1]', 'rows[2]', 'rows[4]', 'rows[5]', 'rows[6]']
  assert examples[0]['reason'] == 'unknown_role'
  assert examples[0]['message'].startswith(
      "rows[1]: messages[1].role is 'bot'")
  assert "'completion' is empty" in examples[1]['message']


def test_row_filter_record_and_pickle():
  row_filter = RowFilter(policy='error', max_examples=1)
  _run(row_filter, rows=[BAD_SFT_ROWS[0], BAD_SFT_ROWS[3]])
  # Drops decided later (too long once tokenised) count even under the
  # error policy, and move the row from kept to skipped.
  row_filter.record('too_long', 'rows[0]', 'rows[0]: 9000 tokens (...)')
  row_filter.record('too_long', 'rows[1]', 'rows[1]: 9001 tokens (...)')
  clone = pickle.loads(pickle.dumps(row_filter))
  for f in (row_filter, clone):
    stats = f.stats()
    assert (stats['seen'], stats['kept'], stats['skipped']) == (2, 0, 2)
    assert stats['skipped_by_reason'] == {'too_long': 2}
    assert [e['where'] for e in stats['examples']] == ['rows[0]']


def test_row_filter_notes_location_of_unexpected_errors():
  def broken(row):
    raise KeyError('oops')
  with pytest.raises(KeyError) as info:
    RowFilter(policy='skip').apply(broken, {}, 'data.jsonl:5')
  assert any('data.jsonl:5' in note for note in info.value.__notes__)
