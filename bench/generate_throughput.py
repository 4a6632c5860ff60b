"""Generation throughput of jpost's KV-cache sampler on SmolLM2-135M.

  python bench/generate_throughput.py [--batches 1,8,32] [--new-tokens 128] [--dtypes float32,bfloat16]
      [--decode default,loop:float32,scan:model] [--decode-kernels auto,xla]
      [--shape llama-3.2-1b] [--temperature 1.0]

Every row generates exactly --new-tokens tokens (no early stop), sampling at
--temperature (1 by default; the RL recipes sample at 0.7, 0 is greedy) from
left-padded chat prompts. The first call of each shape
(compilation included) is reported apart; tokens/s is the median of the
timed calls. The last line is one JSON object whose `tokens_per_s` is the
best dtype at the largest batch.

--decode compares decode steps: `loop` or `scan` over the layers, with the
KV cache stored in float32 or in the `model`'s dtype as such (`default` = what the
backend uses; see sampling.scan_layers_by_default and decoder.cache_storage_dtype).
--decode-kernels compares the decode step's matmuls and attention
(ModelConfig.decode_kernels): `auto` runs them on jpost's CPU kernels where
they apply (bfloat16 on one CPU with AVX512-BF16: models/cpu_decode.py),
`xla` on XLA's own operations.
"""

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np

import common
from jpost import sampling

PROMPTS = ['What is the capital of France?', 'Write a haiku about the sea.',
           'Explain gradient descent in two sentences.', 'What is 12 * 7?',
           'Give me three tips for writing clear code.', 'Translate "good morning" to Spanish.',
           'Why is the sky blue?', 'Name a prime number larger than 100.']


def prompt_ids(batch: int, random_init: bool) -> list[list[int]]:
  if random_init:
    rng = np.random.RandomState(0)
    return [list(rng.randint(3, 49152, 20 + 3 * (i % 8))) for i in range(batch)]
  from jpost.models import pretrained
  from jpost.tokenizer import Tokenizer
  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  return [tokenizer.encode_chat([{'role': 'user', 'content': PROMPTS[i % len(PROMPTS)]}],
                                add_generation_prompt=True).ids for i in range(batch)]


def decode_options(decode: str, dtype: str, settings):
  """'loop:float32' -> (settings with scan_layers, generate()'s keywords)."""
  if decode == 'default':
    return settings, {}
  loop, _, cache = decode.partition(':')
  if loop not in ('loop', 'scan') or cache not in ('float32', 'model'):
    raise ValueError(f'--decode {decode!r}: expected default or (loop|scan):(float32|model).')
  return (dataclasses.replace(settings, scan_layers=loop == 'scan'),
          dict(cache_dtype=dtype if cache == 'model' else 'float32'))


def run(model, settings, batch, dtype, decode, kernels, args) -> dict:
  settings, options = decode_options(decode, dtype, settings)
  tokens, mask = sampling.left_pad(prompt_ids(batch, args.random_init), 2)
  tic = time.perf_counter()
  jax.block_until_ready(sampling.generate(model, tokens, mask, settings, jax.random.key(0),
                                          **options))
  first = time.perf_counter() - tic
  times = []
  for r in range(args.repeats):
    tic = time.perf_counter()
    out_mask = jax.block_until_ready(sampling.generate(
        model, tokens, mask, settings, jax.random.key(r + 1), **options)).mask
    times.append(time.perf_counter() - tic)
  new = int(np.asarray(out_mask).sum())
  seconds = statistics.median(times)
  # Decoding reads every weight once per step: 2 x parameters FLOPs per token.
  from jpost import metrics
  mfu = 2 * model.config.num_params() * new / seconds / metrics.measured_peak_flops(dtype)
  result = {'dtype': dtype, 'decode': decode, 'decode_kernels': kernels, 'batch': batch,
            'new_tokens': args.new_tokens, 'generated': new, 'seconds_median': round(seconds, 3),
            'first_call_s': round(first, 2), 'tokens_per_s': round(new / seconds, 1),
            'device': jax.devices()[0].device_kind, 'random_init': args.random_init,
            'shape': args.shape, 'mfu': round(mfu, 4)}
  print(f"{args.shape} {dtype} {decode} kernels {kernels} batch {batch}: "
        f"{result['tokens_per_s']} tokens/s, MFU {100 * mfu:.1f}% "
        f"({new} tokens in {seconds:.2f}s; first call {first:.1f}s with compilation)", flush=True)
  return result


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', default='1,8,32')
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--random-init', action='store_true')
  parser.add_argument('--decode', default='default')
  parser.add_argument('--decode-kernels', default='auto')
  parser.add_argument('--shape', default='smollm2-135m',
                      help='a jpost.models.shapes name; any but SmolLM2 is random')
  parser.add_argument('--temperature', type=float, default=1.0)
  args = parser.parse_args()
  args.random_init = args.random_init or args.shape != 'smollm2-135m'
  results = []
  for dtype in args.dtypes.split(','):
    model = common.load_model(random_init=args.random_init, shape=args.shape, dtype=dtype)
    # An id outside the vocabulary is never sampled: every row runs to the end.
    settings = sampling.SamplingConfig(max_new_tokens=args.new_tokens,
                                       temperature=args.temperature,
                                       stop_ids=(model.config.vocab_size,))
    for kernels in args.decode_kernels.split(','):
      model.config = dataclasses.replace(model.config, decode_kernels=kernels)
      for decode in args.decode.split(','):
        for batch in map(int, args.batches.split(',')):
          results.append(run(model, settings, batch, dtype, decode, kernels, args))
  largest = max(r['batch'] for r in results)
  best = max((r for r in results if r['batch'] == largest), key=lambda r: r['tokens_per_s'])
  print(json.dumps({'machine': common.machine(), 'tokens_per_s': best['tokens_per_s'], 'batch': largest,
                    'best_dtype': best['dtype'], 'best_decode': best['decode'],
                    'best_decode_kernels': best['decode_kernels'],
                    'settings': results}))


if __name__ == '__main__':
  main()
