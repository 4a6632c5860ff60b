"""Chat with a model, streaming its answers.

  python -m jpost.main --config=configs/chat.py                      # interactive
  python -m jpost.main --config=configs/chat.py --config.prompt="Hi!"  # one shot
  python -m jpost.main --config=configs/chat.py --config.model.path=runs/sft/hf
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'chat'
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      path='smollm2-135m-instruct', dtype='float32', param_dtype='float32'))
  c.system_prompt = ''
  c.prompt = ''  # non-empty: answer this one message and exit
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=256, temperature=0.7, top_k=0, top_p=0.9, min_p=0.0,
      scan_layers=config_dict.placeholder(bool)))  # None: see SamplingConfig
  if arg == 'greedy':
    c.sampling.temperature = 0.0
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "greedy" or nothing.')
  return c.lock()
