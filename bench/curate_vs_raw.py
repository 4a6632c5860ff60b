"""SFT on raw against curated data: what duplicates and a test-set leak do to
the held-out figure.

  python bench/curate_vs_raw.py [--steps 24] [--copies 2]

The raw set is GSM8K's 80 SFT training rows, `--copies` more copies of the
first 20 of them, and the 20 held-out test rows themselves (a leak, as
scraped data often holds). `configs/curate.py` cleans it (against the test
rows); `configs/sft.py` as shipped then trains on each set, one process per
run, and the held-out loss on the test rows is measured before and after.
The last line is one JSON object.
"""

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile

from jpost import trainers
from jpost.data import gsm8k

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'configs'))
import curate as curate_config  # noqa: E402


def read(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def sft(train: pathlib.Path, steps: int) -> dict:
  with tempfile.TemporaryDirectory(prefix='sft_') as workdir:
    return _sft_in(workdir, train, steps)


def _sft_in(workdir: str, train: pathlib.Path, steps: int) -> dict:
  proc = subprocess.run(
      [sys.executable, '-m', 'jpost.main', '--config=configs/sft.py', f'--workdir={workdir}',
       f'--config.data.train=("{train}",)', f'--config.total_steps={steps}',
       f'--config.eval_every={steps}', '--config.checkpoint.every=100000',
       '--config.export_hf=False'],
      capture_output=True, text=True,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
  if proc.returncode:
    raise SystemExit(proc.stderr[-3000:])
  evals = [json.loads(line)['eval_loss'] for line in
           (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
           if 'eval_loss' in line]
  return {'eval_loss_before': round(evals[0], 4), 'eval_loss_after': round(evals[-1], 4)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=24)
  parser.add_argument('--copies', type=int, default=2)
  args = parser.parse_args()
  files = gsm8k.build_gsm8k()
  train, test = read(files['sft_train']), read(files['sft_test'])
  rows = train + train[:20] * args.copies + test
  random.Random(0).shuffle(rows)
  folder = pathlib.Path(tempfile.mkdtemp(prefix='curate_vs_raw_'))
  raw = folder / 'raw.jsonl'
  raw.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config = curate_config.get_config()
  with config.unlocked():
    config.data.train, config.data.eval = (str(raw),), ('gsm8k:sft_test',)
  report = trainers.get('curate')(config, str(folder / 'curated'))
  print(json.dumps({'curate': report['dropped'], 'rows_in': report['rows_in'],
                    'rows_kept': report['rows_kept']}), flush=True)
  results = {}
  for name, path in (('raw', raw), ('curated', folder / 'curated' / 'curated.jsonl')):
    results[name] = sft(path, args.steps)
    print(name, json.dumps(results[name]), flush=True)
  print(json.dumps({'steps': args.steps, 'rows_in': report['rows_in'],
                    'dropped': report['dropped'], 'runs': results}))


if __name__ == '__main__':
  main()
