"""The peer on the same generation setup: transformers' `generate` on SmolLM2-135M-Instruct.

  python bench/peer_hf_generate.py [--batches 32] [--new-tokens 128] [--dtypes float32,bfloat16]
                                   [--repeats 3] [--threads 2]

`bench/generate_throughput.py`'s setting, for the peer: the same model files,
the same chat prompts (its PROMPTS, each rendered by the model's chat
template and encoded by jpost's tokenizer, so the token ids are the same),
left-padded into one batch; every row samples exactly --new-tokens tokens
(`min_new_tokens` = `max_new_tokens`: no row stops early, as jpost's bench
samples with a stop id outside the vocabulary) at temperature 1 with no
top-k or top-p (transformers' `generate` would otherwise apply its default
top_k=50). transformers runs eagerly with its dynamic KV cache, `do_sample`,
`torch.inference_mode`, --threads torch threads. `float32` loads the weights
in float32; `bfloat16` loads them in bfloat16 (PyTorch's bfloat16 CPU
kernels; jpost's bfloat16 decodes bfloat16 weights too). The first call is
reported apart; tokens/s is the median of the --repeats timed calls. The
last line is one JSON object shaped like generate_throughput's: the fastest
dtype's `tokens_per_s` at the largest batch on top, every run under
`settings`.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(model, torch, batch: int, dtype: str, args) -> dict:
  from generate_throughput import prompt_ids
  rows = prompt_ids(batch, random_init=False)
  width = max(len(r) for r in rows)
  pad = model.generation_config.pad_token_id or 0
  ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
  mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

  def call(seed: int) -> int:
    torch.manual_seed(seed)
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, pad_token_id=pad)
    return int((out.shape[1] - width) * batch)

  tic = time.perf_counter()
  call(0)
  first = time.perf_counter() - tic
  times, new = [], 0
  for r in range(args.repeats):
    tic = time.perf_counter()
    new = call(r + 1)
    times.append(time.perf_counter() - tic)
  seconds = statistics.median(times)
  result = {'dtype': dtype, 'batch': batch, 'new_tokens': args.new_tokens, 'generated': new,
            'seconds_median': round(seconds, 3), 'first_call_s': round(first, 2),
            'tokens_per_s': round(new / seconds, 1)}
  print(f"transformers {dtype} batch {batch}: {result['tokens_per_s']} tokens/s "
        f"({new} tokens in {seconds:.2f}s; first call {first:.1f}s)", flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', default='32')
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2)
  args = parser.parse_args()
  import torch
  torch.set_num_threads(args.threads)  # before any work, so every op uses this many
  import transformers

  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import common
  from jpost.models import pretrained
  path = pretrained.resolve('smollm2-135m-instruct')
  results = []
  for dtype in args.dtypes.split(','):
    if dtype not in ('float32', 'bfloat16'):
      parser.error(f'--dtypes {dtype!r}: expected float32 or bfloat16')
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).eval()
    for batch in map(int, args.batches.split(',')):
      results.append(measure(model, torch, batch, dtype, args))
  largest = max(r['batch'] for r in results)
  best = max((r for r in results if r['batch'] == largest), key=lambda r: r['tokens_per_s'])
  print(json.dumps({'machine': common.machine(), 'peer': f'transformers {transformers.__version__}',
                    'torch': torch.__version__, 'threads': args.threads,
                    'tokens_per_s': best['tokens_per_s'], 'batch': largest,
                    'best_dtype': best['dtype'], 'settings': results}))


if __name__ == '__main__':
  main()
