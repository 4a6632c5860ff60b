"""Full fine-tuning against LoRA and QLoRA: the SFT recipe on SmolLM2-135M.

  python bench/lora_memory.py [--steps 24] [--rank 16] [--lora-lr 1e-3]
      [--settings full,lora,int8,nf4]

Each setting is `python -m jpost.main --config=configs/sft.py` in its own
process (one device), so its peak RSS is its own; the held-out loss is
measured before the first and after the last step. Also printed: the
quantise-dequantise error of SmolLM2's kernels (relative Frobenius norm) for
int8 and NF4. The last line is one JSON object with every figure.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

SETTINGS = {
    'full': [],
    'lora': ['--config.lora.rank={rank}'],
    'int8': ['--config.lora.rank={rank}', '--config.lora.quantize=int8'],
    'nf4': ['--config.lora.rank={rank}', '--config.lora.quantize=nf4'],
}


def run(setting: str, steps: int, rank: int, lora_lr: float) -> dict:
  # The full setting's checkpoints take 1.6 GB: the folder goes with the run.
  with tempfile.TemporaryDirectory(prefix=f'lora_{setting}_') as workdir:
    return _run_in(workdir, setting, steps, rank, lora_lr)


def _run_in(workdir: str, setting: str, steps: int, rank: int, lora_lr: float) -> dict:
  flags = [f.format(rank=rank) for f in SETTINGS[setting]]
  if setting != 'full':
    flags += [f'--config.lora.alpha={2 * rank}', f'--config.optim.lr={lora_lr}']
  command = [sys.executable, '-m', 'jpost.main', '--config=configs/sft.py',
             f'--workdir={workdir}', f'--config.total_steps={steps}',
             f'--config.eval_every={steps}', '--config.checkpoint.every=100000',
             '--config.export_hf=False', *flags]
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  with tempfile.TemporaryFile('w+') as stderr:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
      stderr.seek(0)
      raise SystemExit(f'{setting} failed:\n{stderr.read()[-3000:]}')
  records = [json.loads(line) for line in
             (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  evals = [r['eval_loss'] for r in records if 'eval_loss' in r]
  first = next(r for r in records if r['step'] == 1)
  speeds = [r['tokens_per_s'] for r in records if r['step'] > 1 and 'tokens_per_s' in r]
  return {'setting': setting, 'eval_loss_before': evals[0], 'eval_loss_after': evals[-1],
          'trainable_params': first['memory/trainable_params'],
          'params_mb': round(first['memory/params_mb'], 1),
          'opt_state_mb': round(first['memory/opt_state_mb'], 1),
          'tokens_per_s': round(statistics.median(speeds), 1),
          'peak_rss_mb': round(usage.ru_maxrss / 1024)}


def quantisation_errors() -> dict:
  import numpy as np

  import jax.numpy as jnp

  from jpost.models import hf, pretrained, quant
  path = pretrained.resolve('smollm2-135m-instruct')
  model = hf.load(path)
  out = {}
  for kind in quant.KINDS:
    num = den = 0.0
    for name in ('q', 'k', 'v', 'o', 'gate', 'up', 'down'):
      w = np.asarray(getattr(model.layers, name)[...], np.float32)
      codes, scales = quant.quantize(w, kind, 64)
      back = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(scales), kind,
                                         jnp.float32))
      num += float(np.sum((back - w) ** 2))
      den += float(np.sum(w ** 2))
    out[kind] = round((num / den) ** 0.5, 4)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=24)
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--lora-lr', type=float, default=1e-3)
  parser.add_argument('--settings', default='full,lora,int8,nf4')
  args = parser.parse_args()
  errors = quantisation_errors()
  print(f'quantise-dequantise error of the kernels (relative): {errors}', flush=True)
  rows = []
  for setting in args.settings.split(','):
    row = run(setting, args.steps, args.rank, args.lora_lr)
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(json.dumps({'steps': args.steps, 'rank': args.rank, 'lora_lr': args.lora_lr,
                    'quantisation_error': errors, 'settings': rows}))


if __name__ == '__main__':
  main()
