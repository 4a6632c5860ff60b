"""Built-in arithmetic prompts with verifiable answers.

'arith:train', 'arith:test': small sums and products ('What is 7 * 8?') that
SmolLM2-135M-Instruct gets right about half the time when sampling at
temperature 0.7: enough reward signal for RL and for verifier-ranked
preference pairs on a CPU.

'arith:multi_train', 'arith:multi_test': word problems whose answers need 2-4
calculations ('Sam has 7 coins. Sam buys 3 boxes with 4 coins in each box.
...'), for step-level work (process rewards): each row also carries a worked
`completion`, one calculation per line, so the same file is SFT data.

Rows are prompt rows ({'prompt': [user message], 'answer': '56', 'id': ...});
the problems come from a fixed seed, so the files are the same everywhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import tempfile

from jpost import assets
from jpost.errors import ConfigError

INSTRUCTION = 'Put the final answer in \\boxed{}.'
SIZES = {'train': 512, 'test': 48, 'multi_train': 256, 'multi_test': 64}
MULTI_INSTRUCTION = ('Solve it step by step: write one calculation per line, then the final '
                     'answer in \\boxed{}.')
NAMES = ('Sam', 'Mia', 'Leo', 'Ava', 'Tom', 'Zoe', 'Ben', 'Eva')
ITEMS = ('apples', 'marbles', 'stickers', 'books', 'coins', 'cards', 'pencils', 'shells')
# (operator, range of a, range of b): single-digit sums and products, and a
# harder two-digit + one-digit sum.
KINDS = (('+', (2, 9), (2, 9)), ('*', (2, 9), (2, 9)), ('+', (10, 99), (2, 9)))


def problem(rng: random.Random) -> tuple[str, int]:
  op, (a_lo, a_hi), (b_lo, b_hi) = rng.choice(KINDS)
  a, b = rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)
  return f'What is {a} {op} {b}?', a + b if op == '+' else a * b


def multi_step_problem(rng: random.Random) -> tuple[str, int, list[str]]:
  """(question, answer, reference steps): a story of 2-4 calculations on one count."""
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  x = rng.randint(3, 20)
  sentences, steps, want = [f'{name} has {x} {item}.'], [], rng.randint(2, 4)
  while len(steps) < want:
    kind = rng.choice(('gain', 'lose', 'boxes', 'double'))
    if kind == 'gain':
      b = rng.randint(2, 15)
      sentences.append(f'{name} gets {b} more {item}.')
      steps.append(f'{x} + {b} = {x + b}')
      x += b
    elif kind == 'lose' and x >= 4:
      b = rng.randint(1, x - 2)
      sentences.append(f'{name} gives {b} {item} to a friend.')
      steps.append(f'{x} - {b} = {x - b}')
      x -= b
    elif kind == 'boxes' and len(steps) + 2 <= want:
      n, m = rng.randint(2, 5), rng.randint(2, 9)
      sentences.append(f'{name} buys {n} boxes with {m} {item} in each box.')
      steps += [f'{n} * {m} = {n * m}', f'{x} + {n * m} = {x + n * m}']
      x += n * m
    elif kind == 'double' and x <= 50:
      sentences.append(f'Then the number of {item} {name} has doubles.')
      steps.append(f'{x} * 2 = {2 * x}')
      x *= 2
  question = ' '.join(sentences) + f' How many {item} does {name} have now?'
  return question, x, steps


def rows(split: str, seed: int = 0) -> list[dict]:
  """The rows of a split; no problem appears twice, in either split of its family."""
  rng = random.Random(seed)
  multi = split.startswith('multi_')
  names = ('multi_test', 'multi_train') if multi else ('test', 'train')
  seen, out = set(), {name: [] for name in names}
  for name in names:
    size = SIZES[name]
    for _ in range(100 * size):  # bounded: the problem space is finite
      if len(out[name]) == size:
        break
      if multi:
        question, answer, steps = multi_step_problem(rng)
      else:
        (question, answer), steps = problem(rng), None
      if question in seen:
        continue
      seen.add(question)
      instruction = MULTI_INSTRUCTION if multi else INSTRUCTION
      row = {'prompt': [{'role': 'user', 'content': f'{question} {instruction}'}],
             'answer': str(answer), 'id': f'{name}-{len(out[name])}'}
      if multi:  # a worked answer, so the rows also serve as SFT rows
        row['completion'] = '\n'.join(steps + [f'The answer is \\boxed{{{answer}}}.'])
      out[name].append(row)
  return out[split]


def build(split: str, out_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes the split's JSONL (tiny; rewritten each call) and returns its path."""
  if split not in SIZES:
    raise ConfigError(f'data source arith:{split}: unknown split; use one of '
                     f'{", ".join("arith:" + name for name in SIZES)}.')
  folder = pathlib.Path(out_dir) if out_dir else assets.cache_dir() / 'data' / 'arith'
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f'{split}.jsonl'
  with tempfile.NamedTemporaryFile('w', encoding='utf-8', dir=folder, suffix='.tmp',
                                   delete=False) as f:
    for row in rows(split):
      f.write(json.dumps(row) + '\n')
  os.replace(f.name, path)
  return path
