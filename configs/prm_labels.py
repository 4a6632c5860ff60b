"""Step labels for a process reward model, from the policy's own rollouts.

  python -m jpost.main --config=configs/prm_labels.py --workdir=runs/prm_labels
  python -m jpost.main --config=configs/prm_labels.py:tiny --workdir=runs/prm_labels_tiny

For each prompt of each split, `labels.solutions` sampled answers are split
into steps at `labels.separator`; every step prefix is continued
`labels.rollouts` times and labelled by the share of continuations the
verifier accepts ('soft') or by whether one does ('hard'). Writes
`workdir/steps_{split}.jsonl` (the `prm` recipe's input) and
`workdir/labels_stats.json`, and `workdir/pairs_{split}.jsonl` (right over
wrong answers to a prompt, for an outcome reward model on the same samples).
The default data are multi-step word problems
('arith:multi_train' / 'arith:multi_test', 2-4 calculations each).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'prm_labels'
  c.seed = 0
  # 'auto': bfloat16 where the CPU has bfloat16 matmuls (float32 in ':tiny').
  # On a 2-core EPYC, 16 + 16 prompts of the README's SFT'd multi-step policy
  # took 1 min 58 s against 2 min 41 s in float32, with 54 against 58 of 128
  # sampled answers right and mean labels 0.43-0.44 against 0.44-0.45
  # (README, "Process reward models").
  c.model = ml_collections.ConfigDict(dict(
      path='smollm2-135m-instruct', dtype='auto', param_dtype='float32'))
  c.splits = ml_collections.ConfigDict({'train': ('arith:multi_train',),
                                        'test': ('arith:multi_test',)})
  # Prompts labelled per split (0 or no entry: all of them).
  c.max_prompts = ml_collections.ConfigDict({'train': 64, 'test': 48})
  c.max_prompt_len = 128
  c.labels = ml_collections.ConfigDict(dict(
      kind='soft', solutions=4, rollouts=4, separator='\n', max_steps=8))
  c.batch_size = 16  # prompts (or step prefixes) per generate call
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=128, temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, num_samples=1,
      scan_layers=config_dict.placeholder(bool)))  # None: see SamplingConfig
  c.rewards = ml_collections.ConfigDict({'math': {'weight': 1.0}})  # the verifier
  c.answer_key = 'answer'
  if arg == 'tiny':
    c.model.dtype = 'float32'
    c.max_prompts = ml_collections.ConfigDict({'train': 4, 'test': 2})
    c.labels.solutions = 2
    c.labels.rollouts = 2
    c.batch_size = 4
    c.sampling.max_new_tokens = 16
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
