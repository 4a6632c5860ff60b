"""Curate a data set before training: duplicates, filters, decontamination.

  python -m jpost.main --config=configs/curate.py --workdir=runs/curate
  python -m jpost.main --config=configs/curate.py:tiny --workdir=runs/curate_tiny
  python -m jpost.main --config=configs/curate.py --workdir=runs/mine \\
      --config.data.train='("my_sft.jsonl",)' --config.data.eval='("my_test.jsonl",)'

Writes curated.jsonl, curate_report.json and curate_lengths.png in the
workdir; the rows kept are the input rows, unchanged. `data.kind` is the rows'
format: 'sft', 'preference' or 'prompt'.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'curate'
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(path='smollm2-135m-instruct'))  # its tokenizer
  c.data = ml_collections.ConfigDict(dict(
      kind='sft', train=('gsm8k:sft_train',), eval=('gsm8k:sft_test', 'gsm8k:rl_test'),
      max_len=512))
  c.curate = ml_collections.ConfigDict(dict(
      near_threshold=0.8, shingle_words=5, num_perm=128, decontaminate_n=13, min_tokens=8,
      min_ratio=0.0, max_ratio=0.0, max_repeated_lines=0.3, max_top_trigram=0.2,
      long_ratio=3.0))
  if arg == 'tiny':
    c.data.train = ('arith:train',)
    c.data.kind = 'prompt'
    c.data.eval = ('arith:test',)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
