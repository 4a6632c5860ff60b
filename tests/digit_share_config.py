"""Tiny recipe configs rewarded by the share of digits in each completion.

    --config=tests/digit_share_config.py:grpo   (configs/grpo.py:tiny)
    --config=tests/digit_share_config.py:pairs  (configs/pairs.py:tiny)

A config file is Python, so it can register the rewards it names: this is how
the multi-process tests give `python -m jpost.main` a reward that moves for a
random model (`math` is 0 for every random answer).
"""

import importlib.util
import pathlib

from jpost import rewards

if 'digit_share' not in rewards.names():
  @rewards.register('digit_share')
  def digit_share(prompt, completion, row):
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def recipe(name: str):
  """The module configs/{name}.py, loaded from its file (configs/ is not a
  package)."""
  spec = importlib.util.spec_from_file_location(
      f'jpost_configs_{name}', pathlib.Path(__file__).parent.parent / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str):
  c = recipe(arg).get_config('tiny').unlock()
  c.rewards = {'digit_share': {'weight': 1.0}}
  c.data.max_prompt_len = 80
  if arg == 'grpo':
    c.optim.lr = 1e-3
    c.sampling.max_new_tokens = 16
    c.sampling.temperature = 1.0
  elif arg == 'pairs':
    c.pairs.min_gap = 0.01
    c.pairs.best_min_score = 0.05
  else:
    raise ValueError(f'unknown recipe {arg!r}; use grpo or pairs.')
  return c.lock()
