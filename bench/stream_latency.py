"""Chat streaming on SmolLM2-135M: how long a turn waits for its first token
(compilation included on the first turn of a prompt-length bucket) and how
fast tokens then stream, with the decode step looping or scanning over the
layers, and with the decode weights prepared once for every turn (as the
chat recipe does) or by each turn.

  python bench/stream_latency.py [--dtypes float32,bfloat16] [--decode loop,scan]
      [--weights once,per-turn] [--random-init]

The last line is one JSON object with every setting's figures.
"""

import argparse
import dataclasses
import json
import statistics
import time

import jax

import common
from generate_throughput import prompt_ids
from jpost import sampling


def turn(model, prompt, settings, prepared) -> tuple[float, float]:
  """(seconds to the first token, tokens/s after it) of one streamed reply."""
  tic = time.perf_counter()
  tokens = sampling.stream(model, prompt, settings, jax.random.key(0), prepared=prepared)
  next(tokens)
  first = time.perf_counter() - tic
  tic = time.perf_counter()
  rest = sum(1 for _ in tokens)
  return first, rest / (time.perf_counter() - tic)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--decode', default='loop,scan')
  parser.add_argument('--new-tokens', type=int, default=64)
  parser.add_argument('--turns', type=int, default=3)
  parser.add_argument('--weights', default='once', help='once (as chat does), per-turn, or both')
  parser.add_argument('--random-init', action='store_true')
  args = parser.parse_args()
  if set(args.weights.split(',')) - {'once', 'per-turn'}:
    parser.error(f'--weights takes once, per-turn or both, not {args.weights!r}')
  prompt = prompt_ids(1, args.random_init)[0]
  results = []
  for dtype in args.dtypes.split(','):
    model = common.load_model(random_init=args.random_init, dtype=dtype)
    settings = sampling.SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                                       stop_ids=(model.config.vocab_size,))
    for decode, weights in [(d, w) for d in args.decode.split(',')
                            for w in args.weights.split(',')]:
      layout = dataclasses.replace(settings, scan_layers=decode == 'scan')
      prepared = sampling.prepare(model, layout) if weights == 'once' else None
      cold_first, _ = turn(model, prompt, layout, prepared)
      warm = [turn(model, prompt, layout, prepared) for _ in range(args.turns)]
      result = {'dtype': dtype, 'decode': decode, 'weights': weights,
                'first_turn_first_token_s': round(cold_first, 2),
                'first_token_s': round(statistics.median(w[0] for w in warm), 4),
                'tokens_per_s': round(statistics.median(w[1] for w in warm), 1),
                'device': jax.devices()[0].device_kind}
      results.append(result)
      print(f"{dtype} {decode}, weights prepared {weights}: first turn waits {cold_first:.1f}s (compilation), then "
            f"{result['first_token_s'] * 1e3:.0f} ms to the first token and "
            f"{result['tokens_per_s']} tokens/s", flush=True)
  print(json.dumps({'machine': common.machine(), 'settings': results}))


if __name__ == '__main__':
  main()
