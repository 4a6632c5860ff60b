"""Near-duplicate detection throughput (MinHash + LSH, jpost.data.curate) on
synthetic rows.

  python bench/dedup_throughput.py [--rows 1000000] [--words 60] [--dup-share 0.1]

Rows are random sequences over a 50,000-word vocabulary; `--dup-share` of them
copy an earlier row with one word changed (Jaccard 0.84-1.0 over 5-word
shingles for 60 words, 0.84 when the word is inside), which the finder
should report at its 0.8 threshold. Copies are made of original rows only,
so each has one source at a known similarity. Prints rows/s, the duplicates found
against those planted, and peak RSS; the last line is one JSON object.
"""

import argparse
import json
import resource
import time

import numpy as np

from jpost.data import curate


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', type=int, default=1_000_000)
  parser.add_argument('--words', type=int, default=60)
  parser.add_argument('--dup-share', type=float, default=0.1)
  parser.add_argument('--threshold', type=float, default=0.8)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  finder = curate.NearDuplicates(args.threshold)
  planted = found = 0
  rows = []
  tic = time.perf_counter()
  for i in range(args.rows):
    if rows and rng.random() < args.dup_share:
      words = list(rows[rng.integers(len(rows))])
      words[rng.integers(len(words))] = 'changed'
      planted += 1
    else:
      words = [f'w{k}' for k in rng.integers(0, 50_000, args.words)]
      if len(rows) < 10_000:  # sources of the planted copies: original rows only
        rows.append(words)
    found += finder.seen(i, ' '.join(words)) is not None
    if (i + 1) % 100_000 == 0:
      print(f'{i + 1} rows, {(i + 1) / (time.perf_counter() - tic):.0f} rows/s', flush=True)
  seconds = time.perf_counter() - tic
  print(json.dumps({'rows': args.rows, 'words': args.words, 'seconds': round(seconds, 1),
                    'rows_per_s': round(args.rows / seconds), 'planted': planted,
                    'found': found, 'peak_rss_gb': round(
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == '__main__':
  main()
