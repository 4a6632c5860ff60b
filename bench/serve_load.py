"""Load on the OpenAI-compatible server: N concurrent streaming clients with a
fixed request mix against SmolLM2-135M-Instruct, for continuous batching,
static batching and one request at a time (one slot, one client).

  .venv/bin/python bench/serve_load.py [--clients 32] [--requests 64] [--slots 16]

Prints requests/s, output tokens/s, time to first token (TTFT) and
inter-token latency (ITL) percentiles per mode, and the CPU model.
"""

import argparse
import concurrent.futures
import platform
import time

import numpy as np
import openai

from jpost import host
from jpost.serve import api, engine, recipe

QUESTIONS = ['What is the capital of France?', 'Write a haiku about the sea.',
             'Give me three tips for writing clear code.', 'What is 12 * 7?',
             'Explain photosynthesis to a child.', 'Name four planets.',
             'Why do cats purr?', 'Suggest a name for a bakery.']


def cpu_model() -> str:
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def request_mix(count: int):
  """(question, max_tokens) pairs: mixed prompts and answer budgets."""
  return [(QUESTIONS[i % len(QUESTIONS)], (16, 32, 64, 48)[i % 4]) for i in range(count)]


def one_stream(client, question, max_tokens):
  """(TTFT seconds, inter-token gaps, output tokens) of one streamed request."""
  start = time.perf_counter()
  stream = client.chat.completions.create(
      model='smollm2', messages=[{'role': 'user', 'content': question}], max_tokens=max_tokens,
      temperature=0, stream=True, stream_options={'include_usage': True})
  arrivals, tokens = [], 0
  for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
      arrivals.append(time.perf_counter())
    if chunk.usage:
      tokens = chunk.usage.completion_tokens
  return arrivals[0] - start, list(np.diff(arrivals)), tokens


def run_mode(name, slots, mode, clients, mix):
  served = recipe.load_models({'smollm2': 'smollm2-135m-instruct'}, dtype='float32',
                              engine_config=engine.EngineConfig(slots=slots, cache_len=512,
                                                                mode=mode, static_wait_s=0.5))
  served['smollm2'].engine.start()
  background = recipe.Background(recipe.build_app(served, api.ServerConfig()))
  client = openai.OpenAI(base_url=background.url + '/v1', api_key='-', max_retries=0, timeout=600)
  one_stream(client, *mix[0])  # compile the prefill buckets before timing
  one_stream(client, QUESTIONS[2] * 3, 4)
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda item: one_stream(client, *item), mix))
  seconds = time.perf_counter() - start
  background.stop()
  served['smollm2'].engine.stop()
  ttft = [r[0] for r in results]
  gaps = [g for r in results for g in r[1]]
  tokens = sum(r[2] for r in results)
  pct = lambda xs: ' / '.join(f'{np.percentile(xs, q) * 1000:.0f}' for q in (50, 90, 99))
  print(f'{name:>14}: {len(mix) / seconds:5.2f} req/s  {tokens / seconds:6.1f} tok/s  '
        f'TTFT p50/p90/p99 {pct(ttft)} ms  ITL p50/p90/p99 {pct(gaps)} ms  '
        f'({len(mix)} requests, {tokens} tokens, {seconds:.1f} s)', flush=True)
  return tokens / seconds


def main():
  host.restart_with_huge_pages('serve')  # as `python -m jpost.main` serves (jpost/host.py)
  parser = argparse.ArgumentParser()
  parser.add_argument('--clients', type=int, default=32)
  parser.add_argument('--requests', type=int, default=64)
  parser.add_argument('--slots', type=int, default=16)
  args = parser.parse_args()
  print(f'CPU: {cpu_model()}; SmolLM2-135M-Instruct float32, {args.requests} requests, '
        f'{args.clients} clients, {args.slots} slots', flush=True)
  mix = request_mix(args.requests)
  continuous = run_mode('continuous', args.slots, 'continuous', args.clients, mix)
  run_mode('static', args.slots, 'static', args.clients, mix)
  single = run_mode('one at a time', 1, 'continuous', 1, mix)
  print(f'continuous / one at a time: {continuous / single:.1f}x output tokens/s')


if __name__ == '__main__':
  main()
