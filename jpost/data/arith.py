"""Built-in arithmetic prompts with verifiable answers: 'arith:train', 'arith:test'.

Small sums and products ('What is 7 * 8?') that SmolLM2-135M-Instruct gets
right about half the time when sampling at temperature 0.7: enough reward
signal for RL and for verifier-ranked preference pairs on a CPU. Rows are
prompt rows ({'prompt': [user message], 'answer': '56', 'id': ...}); the
problems come from a fixed seed, so the files are the same everywhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import tempfile

from jpost import assets

INSTRUCTION = 'Put the final answer in \\boxed{}.'
SIZES = {'train': 512, 'test': 48}
# (operator, range of a, range of b): single-digit sums and products, and a
# harder two-digit + one-digit sum.
KINDS = (('+', (2, 9), (2, 9)), ('*', (2, 9), (2, 9)), ('+', (10, 99), (2, 9)))


def problem(rng: random.Random) -> tuple[str, int]:
  op, (a_lo, a_hi), (b_lo, b_hi) = rng.choice(KINDS)
  a, b = rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)
  return f'What is {a} {op} {b}?', a + b if op == '+' else a * b


def rows(split: str, seed: int = 0) -> list[dict]:
  """The rows of a split; no problem appears twice, in either split."""
  rng = random.Random(seed)
  seen, out = set(), {name: [] for name in SIZES}
  for name, size in (('test', SIZES['test']), ('train', SIZES['train'])):
    for _ in range(100 * size):  # bounded: the problem space is finite
      if len(out[name]) == size:
        break
      question, answer = problem(rng)
      if question in seen:
        continue
      seen.add(question)
      out[name].append({'prompt': [{'role': 'user', 'content': f'{question} {INSTRUCTION}'}],
                        'answer': str(answer), 'id': f'{name}-{len(out[name])}'})
  return out[split]


def build(split: str, out_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes the split's JSONL (tiny; rewritten each call) and returns its path."""
  if split not in SIZES:
    raise ValueError(f'data source arith:{split}: unknown split; use arith:train or arith:test.')
  folder = pathlib.Path(out_dir) if out_dir else assets.cache_dir() / 'data' / 'arith'
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f'{split}.jsonl'
  with tempfile.NamedTemporaryFile('w', encoding='utf-8', dir=folder, suffix='.tmp',
                                   delete=False) as f:
    for row in rows(split):
      f.write(json.dumps(row) + '\n')
  os.replace(f.name, path)
  return path
