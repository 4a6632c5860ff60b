"""configs/grpo.py rewarded by the share of digits in each completion.

A config file is Python, so it can register the rewards it names: this one is
how the multi-process tests give `python -m jpost.main` a reward that moves
for a random model (configs/grpo.py's `math` is 0 for every random answer).
"""

import importlib.util
import pathlib

from jpost import rewards

_spec = importlib.util.spec_from_file_location(
    'jpost_configs_grpo', pathlib.Path(__file__).parent.parent / 'configs' / 'grpo.py')
grpo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grpo)

if 'digit_share' not in rewards.names():
  @rewards.register('digit_share')
  def digit_share(prompt, completion, row):
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def get_config(arg: str | None = None):
  c = grpo.get_config(arg).unlock()
  c.rewards = {'digit_share': {'weight': 1.0}}
  c.optim.lr = 1e-3
  c.data.max_prompt_len = 80
  c.sampling.max_new_tokens = 16
  c.sampling.temperature = 1.0
  return c.lock()
