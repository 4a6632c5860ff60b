"""Greedy answers of a chat model to a few prompts.

  python -m jpost.main --config=configs/generate.py --workdir=runs/generate
  python -m jpost.main --config=configs/generate.py:tiny --config.model.path=/my/hf/checkpoint
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = 'generate'
  config.seed = 0
  # A HF checkpoint dir, a .gguf file or an embedded name (jpost.models.pretrained).
  config.model = ml_collections.ConfigDict(dict(
      path='smollm2-135m-instruct', dtype='float32', param_dtype='float32'))
  config.system_prompt = ''
  config.prompts = [
      'What is the capital of France?',
      'What is 12 * 7?',
      'Write a haiku about the sea.',
      'Give me three tips for writing clear code.',
  ]
  # None: one call, so a scan over the layers, which compiles one of them, not
  # each (on XLA's operations; the CPU decoding kernels loop); False loops,
  # faster per token for many prompts or long answers (sampling.for_one_call).
  config.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=64, temperature=0.0, scan_layers=config_dict.placeholder(bool)))
  if arg == 'tiny':
    config.prompts = config.prompts[:2]
    config.sampling.max_new_tokens = 12
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return config.lock()
