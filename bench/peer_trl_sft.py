"""The peer on the same SFT setup: TRL's SFTTrainer on SmolLM2-135M-Instruct.

  pip install trl            # not a jpost dependency: the peer's own stack
  python bench/peer_trl_sft.py [--batch 8] [--seq-len 256] [--steps 6] [--dtypes float32,bfloat16]

The same model files, GSM8K rows (prompt/completion, loss on the completion)
and packed rows of --seq-len as `bench/sft_throughput.py`, AdamW at 5e-5 with
clipping; `bfloat16` is TRL's `bf16=True` (autocast, float32 master weights),
its fast CPU setting. Tokens/s counts the tokens the trainer saw (TRL's
`num_input_tokens_seen`) over the median step time after the first step. The
last line is one JSON object like sft_throughput's.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def measure(dtype: str, batch: int, seq_len: int, steps: int) -> dict:
  import datasets
  import torch
  import transformers
  import trl

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from jpost.data import pipeline
  from jpost.models import pretrained

  model_dir = str(pretrained.resolve('smollm2-135m-instruct'))
  rows = [json.loads(line) for line in open(pipeline.resolve_sources(['gsm8k:sft_train'])[0])]
  data = datasets.Dataset.from_list(
      [{'prompt': r['prompt'], 'completion': r['completion']} for r in rows[:4000]])
  times, seen = [], []

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      self.tic = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      times.append(time.perf_counter() - self.tic)
      seen.append(state.num_input_tokens_seen)

  with tempfile.TemporaryDirectory() as out:
    config = trl.SFTConfig(
        output_dir=out, max_length=seq_len, packing=True, per_device_train_batch_size=batch,
        max_steps=steps, learning_rate=5e-5, max_grad_norm=1.0, bf16=dtype == 'bfloat16',
        use_cpu=True, logging_steps=1, report_to=[], save_strategy='no',
        include_num_input_tokens_seen=True, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=config, train_dataset=data,
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Clock()])
    trainer.train()
  tokens = [b - a for a, b in zip([0] + seen, seen)][1:]
  seconds = statistics.median(times[1:])
  return {'peer': f'trl {trl.__version__}', 'torch': torch.__version__, 'dtype': dtype,
          'batch': batch, 'seq_len': seq_len, 'first_step_s': round(times[0], 2),
          'step_s_median': round(seconds, 3), 'tokens_per_step': statistics.median(tokens),
          'tokens_per_s': round(statistics.median(tokens) / seconds, 1),
          'torch_threads': torch.get_num_threads(),
          'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq-len', type=int, default=256)
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: run one dtype
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.one, args.batch, args.seq_len, args.steps)))
    return
  from common import machine
  results = []
  for dtype in args.dtypes.split(','):
    proc = subprocess.run([sys.executable, __file__, '--one', dtype, '--batch', str(args.batch),
                           '--seq-len', str(args.seq_len), '--steps', str(args.steps)],
                          capture_output=True, text=True)
    if proc.returncode:
      sys.exit(f'{dtype} run failed:\n{proc.stderr[-3000:]}')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{dtype}: {result['tokens_per_s']} tokens/s, step {result['step_s_median']}s "
          f"(first {result['first_step_s']}s), peak RSS {result['peak_rss_mb']} MB")
    results.append(result)
  best = max(results, key=lambda r: r['tokens_per_s'])
  print(json.dumps({'machine': machine(), 'tokens_per_s': best['tokens_per_s'],
                    'best_dtype': best['dtype'], 'settings': results}))


if __name__ == '__main__':
  main()
