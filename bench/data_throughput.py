"""Throughput of the SFT data pipeline: read + validate + tokenise + mask + pack + batch.

  python bench/data_throughput.py [--rows 10000] [--max-len 512] [--repeats 3]

Builds a 10k-row JSONL file from the GSM8K worked answers (each problem with
a varied prompt), then times full passes over it on one process, no worker
threads. Prints one line per run and, last, one JSON object with the medians.
"""

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import common
from jpost.data import gsm8k, pipeline
from jpost.models import pretrained
from jpost.tokenizer import Tokenizer


def write_rows(path: pathlib.Path, n: int) -> None:
  problems = gsm8k.load_problems()
  with open(path, 'w') as f:
    for i in range(n):
      row = gsm8k.sft_row(problems[i % len(problems)])
      row['prompt'][0]['content'] = f'Problem {i}: ' + row['prompt'][0]['content']
      f.write(json.dumps(row) + '\n')


def one_pass(path, tokenizer, max_len, batch_size):
  start = time.perf_counter()
  ds, stats = pipeline.build('sft', str(path), tokenizer, batch_size=batch_size,
                             max_len=max_len, num_epochs=1, truncation='truncate_left')
  tokens = batches = 0
  for batch in ds:
    tokens += int((batch['segment_ids'] > 0).sum())
    batches += 1
  seconds = time.perf_counter() - start
  encoded = stats.as_dict()['encoded']
  return seconds, tokens, sum(encoded.values()), batches


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rows', type=int, default=10_000)
  parser.add_argument('--max-len', type=int, default=512)
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'rows.jsonl'
    write_rows(path, args.rows)
    runs = []
    for r in range(args.repeats):
      seconds, tokens, rows, batches = one_pass(path, tokenizer, args.max_len, args.batch_size)
      runs.append((seconds, tokens, rows, batches))
      print(f'run {r}: {rows} rows, {tokens} tokens, {batches} batches in {seconds:.2f}s '
            f'-> {rows / seconds:.0f} rows/s, {tokens / seconds:.0f} tokens/s', flush=True)
  seconds = statistics.median(run[0] for run in runs)
  _, tokens, rows, batches = runs[0]
  print(json.dumps({'machine': common.machine(), 'rows': rows, 'tokens': tokens,
                    'seconds_median': round(seconds, 3),
                    'rows_per_s': round(rows / seconds), 'tokens_per_s': round(tokens / seconds),
                    # share of batch slots holding real tokens
                    'packing_efficiency': round(tokens / (batches * args.batch_size * args.max_len), 3),
                    'max_len': args.max_len}))


if __name__ == '__main__':
  main()
