"""Preference pairs from SmolLM2's own samples, ranked by the math verifier.

  python -m jpost.main --config=configs/pairs.py --workdir=runs/pairs
  python -m jpost.main --config=configs/pairs.py:tiny --workdir=runs/pairs_tiny

Samples `sampling.num_samples` answers per prompt, scores them with
`rewards`, keeps (best, worst) when they differ by at least `pairs.min_gap`,
and writes `pairs_train.jsonl` / `pairs_test.jsonl` (preference rows) to the
workdir: the input of configs/reward.py and configs/dpo.py.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'pairs'
  c.seed = 0
  # Processes sample shares of the prompts (README, "Many processes and hosts").
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, heartbeat_timeout_s=100, init_timeout_s=300))
  # 'auto': bfloat16 where the CPU has bfloat16 matmuls (float32 in ':tiny').
  # On a 2-core EPYC the job took 1 min 43 s against 2 min 35 s in float32,
  # for 75 and 31 pairs against 73 and 31 (README, "Preference pairs, reward models and DPO").
  c.model = ml_collections.ConfigDict(dict(
      path='smollm2-135m-instruct', dtype='auto', param_dtype='float32'))
  c.data = ml_collections.ConfigDict(dict(
      train=('arith:train',), eval=('arith:test',), max_prompt_len=96, policy='error'))
  c.batch_size = 16  # prompts per sampler call
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=64, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, num_samples=8,
      scan_layers=config_dict.placeholder(bool)))  # None: see SamplingConfig
  c.rewards = ml_collections.ConfigDict({'math': {'weight': 1.0}})
  c.pairs = ml_collections.ConfigDict(dict(
      min_gap=0.5,  # keep (best, worst) only with at least this reward gap
      max_prompts=160,  # per split; 0: all
      best_min_score=1.0))  # best-of-n SFT rows: the best answer must score this
  if arg == 'tiny':
    c.model.dtype = 'float32'
    c.batch_size = 4
    c.sampling.max_new_tokens = 16
    c.sampling.num_samples = 4
    c.pairs.min_gap = 0.0  # random tiny models rarely answer right: keep every distinct pair
    c.pairs.best_min_score = 0.0
    c.pairs.max_prompts = 8
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
