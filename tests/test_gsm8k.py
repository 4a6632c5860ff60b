"""The GSM8K builder: 100 problems -> SFT and RL JSONL files, fixed split."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from jpost import assets
from jpost.data import gsm8k
from jpost.data.rows import RowFilter, normalize_prompt, normalize_sft
from jpost.data.sources import load_source

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ('sft', 'sft_train', 'sft_test', 'rl', 'rl_train', 'rl_test')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return gsm8k.build_gsm8k(tmp_path_factory.mktemp('gsm8k'))


@pytest.fixture(scope='module')
def problems():
  return gsm8k.load_problems()


def _rows(path):
  return load_source(path, row_filter=RowFilter(policy='error'))


def test_problems_match_the_asset(problems):
  folder = assets.fetch(gsm8k.ASSET)
  raw = [tomllib.loads(p.read_text()) for p in sorted(folder.glob('*.toml'))]
  assert len(problems) == len(raw) == 100
  assert len({p.id for p in problems}) == 100
  for problem, record in zip(problems, raw):
    final = re.search(r'^####\s*(.+?)\s*$', record['answer'], re.M).group(1)
    assert problem.answer == final.replace(',', '')
    assert problem.id == record['id_orig']
    assert '<<' not in problem.solution and '>>' not in problem.solution
    assert problem.solution.endswith(f'\n#### {problem.answer}')
    # Only the annotations (and blank lines) go: every step is still there.
    steps = re.sub(r'<<[^>]*>>', '', record['answer']).splitlines()
    assert problem.solution.splitlines() == [s for s in steps if s.strip()]


def test_answers_are_numbers(problems):
  assert all(re.fullmatch(r'-?\d+(\.\d+)?', p.answer) for p in problems)
  # All integers but one: GSM8K #410 ends '#### 3.5' (dollars left over).
  assert [(p.id, p.answer) for p in problems
          if not p.answer.lstrip('-').isdigit()] == [(410, '3.5')]


@pytest.mark.parametrize('worked, solution, answer', [
    ('Half of 48 is 48/2 = <<48/2=24>>24.\n#### 24',
     'Half of 48 is 48/2 = 24.\n#### 24', '24'),
    ('a <<1+1=2>>2 and <<2*3=6>>6\n\n#### 1,234\n',
     'a 2 and 6\n#### 1234', '1234'),
    ('Lost 5.\n####   -5', 'Lost 5.\n#### -5', '-5'),
])
def test_parse_problem(worked, solution, answer):
  problem = gsm8k.parse_problem(
      {'question': ' Q? ', 'answer': worked, 'id_orig': 3}, where='x.toml')
  assert problem == gsm8k.Problem(id=3, question='Q?', solution=solution,
                                  answer=answer)


@pytest.mark.parametrize('record, fragment', [
    ({'question': 'Q', 'answer': 'no final line', 'id_orig': 1},
     "0 '####' lines"),
    ({'question': 'Q', 'answer': '#### 1\n#### 2', 'id_orig': 1},
     "2 '####' lines"),
    ({'question': 'Q', 'answer': '#### 1\nmore', 'id_orig': 1},
     "text after the '####' line"),
    ({'question': 'Q', 'answer': '#### twelve', 'id_orig': 1},
     "'twelve' is not a number"),
    ({'question': 'Q', 'answer': 'a <<1+1=2 b\n#### 2', 'id_orig': 1},
     "unbalanced '<<'"),
    ({'question': 'Q', 'answer': '#### 2'}, "no 'id_orig'"),
])
def test_parse_problem_errors_name_the_file(record, fragment):
  with pytest.raises(ValueError, match=r'^sym/0007\.toml: ') as info:
    gsm8k.parse_problem(record, where='sym/0007.toml')
  assert fragment in str(info.value)


def test_files_and_default_location(built):
  assert sorted(built) == sorted(NAMES)
  assert all(path.is_file() for path in built.values())
  default = gsm8k.default_dir()
  assert default.is_relative_to(assets.cache_dir())
  assert not default.resolve().is_relative_to(REPO)


def test_sft_rows(built, problems):
  rows = _rows(built['sft'])
  assert len(rows) == 100
  for row, problem in zip(rows, problems):
    assert row['answer'] == problem.answer and row['id'] == problem.id
    canonical = normalize_sft(row, where=row['_where'],
                              require_assistant=True)
    assert canonical['completion_start'] == 1
    user, assistant = canonical['messages']
    assert user == {'role': 'user', 'content': problem.question}
    assert assistant['role'] == 'assistant'
    assert assistant['content'].splitlines()[-1] == f'#### {row["answer"]}'
    assert '<<' not in assistant['content']


def test_rl_rows(built, problems):
  rows = _rows(built['rl'])
  assert len(rows) == 100
  for row, problem in zip(rows, problems):
    canonical = normalize_prompt(row, where=row['_where'])
    assert canonical['extra'] == {'answer': problem.answer, 'id': problem.id}
    [message] = canonical['prompt']
    assert message['role'] == 'user'
    assert message['content'].startswith(problem.question)
    assert message['content'].endswith(gsm8k.RL_INSTRUCTION)
    assert "'#### <number>'" in message['content']


def test_split_is_fixed_and_disjoint(built, tmp_path):
  ids = {name: [r['id'] for r in _rows(path)] for name, path in built.items()}
  for kind in ('sft', 'rl'):
    assert len(ids[f'{kind}_train']) == 80 and len(ids[f'{kind}_test']) == 20
    assert ids[f'{kind}_train'] + ids[f'{kind}_test'] == ids[kind]
  assert ids['sft_test'] == ids['rl_test']
  # A second build gives byte-identical files.
  again = gsm8k.build_gsm8k(tmp_path)
  for name in NAMES:
    assert again[name].read_bytes() == built[name].read_bytes()


def test_test_size_is_validated(tmp_path):
  with pytest.raises(ValueError, match='test_size=100 must be in 1..99'):
    gsm8k.build_gsm8k(tmp_path, test_size=100)


def test_command_line_prints_paths(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'jpost.data.gsm8k', str(tmp_path)],
      capture_output=True, text=True, check=True, cwd=REPO).stdout
  printed = dict(line.split('\t') for line in out.splitlines())
  assert printed == {name: str(tmp_path / f'{name}.jsonl') for name in NAMES}
