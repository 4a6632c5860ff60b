"""SFT train-step throughput: tokens/s, MFU and peak memory for SmolLM2-135M
or a real model shape with random weights (jpost.models.shapes).

  python bench/sft_throughput.py [--batch 8] [--seq-len 256] [--steps 6] [--dtypes bfloat16]
      [--remat full,dots,none | --no-remat] [--attention auto,xla,blockwise,cpu,pallas,cudnn]
      [--shape llama-3.2-1b] [--logits-chunk 32] [--attention-block 512] [--pad N]
      [--padding-free auto,on,off]
      (defaults: configs/sft.py's: dtype auto, remat dots, attention auto, block 512,
      chunk 32, padding-free auto)

Each (dtype, attention, remat, padding-free) setting runs in its own process (float32 master
weights, AdamW, clipping, full packed batches of GSM8K answers, or with
--random-init synthetic packed rows) so peak memory is its own: the device's
peak bytes in use where it reports them (GPU), else the process's peak RSS.
The first step (compilation) is reported apart; tokens/s is the median of the
rest. `--batch` rows of `--seq-len` tokens: padding-free (where the recipe
would pack so, jpost.trainers.sft.packing) the same samples' worth as one
row. MFU's attention term counts what each token attends to, its sample's
length (`metrics.attended_length`), not the packed row's. A setting that
fails (out of memory) is reported and the others still run. The last line
is one JSON object: the best setting's `tokens_per_s`, its `mfu` and
`peak_rss_mb`, plus every setting and the failed ones.
"""

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys


def synthetic_batches(batch: int, seq_len: int, vocab: int, pad: int = 0):
  """Packed rows of random tokens: two samples per row, targets on the second
  half of each, then `pad` tokens of padding (segment 0)."""
  import numpy as np
  rng = np.random.RandomState(0)
  real = seq_len - pad
  half = real // 2
  segments = np.repeat(np.array([1, 2, 0], np.int32), [half, real - half, pad])
  positions = np.concatenate([np.arange(half), np.arange(real - half), np.zeros(pad, int)])
  mask = (segments > 0) & (positions >= half // 2)
  while True:
    yield {'tokens': rng.randint(0, vocab, (batch, seq_len)).astype(np.int32),
           'positions': positions[None].repeat(batch, 0).astype(np.int32),
           'segment_ids': segments[None].repeat(batch, 0),
           'loss_mask': mask[None].repeat(batch, 0).astype(np.int32)}


def gsm8k_batches(batch: int, seq_len: int, max_segments: int, row_len: int):
  """GSM8K's SFT training rows (configs/sft.py's `data.train`, which
  peer_trl_sft.py reads too), packed as that recipe packs them into
  [batch, seq_len], or padding-free into [batch * seq_len / row_len, row_len]."""
  from jpost.data import pipeline
  from jpost.models import pretrained
  from jpost.tokenizer import Tokenizer
  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  data, _ = pipeline.build('sft', pipeline.resolve_sources('gsm8k:sft_train'), tokenizer,
                           batch_size=batch, max_len=seq_len, truncation='truncate_left',
                           max_segments=max_segments, row_len=row_len)
  return iter(data)


def measure(dtype: str, batch: int, seq_len: int, steps: int, remat: str,
            random_init: bool, attention: str = 'auto', shape: str = 'smollm2-135m',
            logits_chunk: int = 32, pad: int = 0, attention_block: int = 512,
            padding_free: str = 'auto') -> dict:
  import jax

  from jpost.models.config import resolve_dtype
  dtype = resolve_dtype(dtype)

  from jpost import metrics, sharding

  import common

  mesh = sharding.make_mesh()
  random_init = random_init or shape != 'smollm2-135m'
  model = common.load_model(random_init=random_init, mesh=mesh, shape=shape, dtype=dtype,
                            remat=remat, attention=attention, logits_chunk=logits_chunk,
                            attention_block=attention_block)
  step, state = common.sft_step(model, mesh, steps, max_len=seq_len)
  if random_init:
    batches = synthetic_batches(batch, seq_len, model.config.vocab_size, pad)
    packing = {'row_len': seq_len}
  else:
    packing = recipe_packing(model.config, batch, seq_len, padding_free)
    batches = gsm8k_batches(batch, seq_len, **packing)
  out, times, tokens, contexts = common.time_steps(step, state, batches, mesh, steps + 1)
  compile_s, run_times = times[0], times[1:]
  seconds = statistics.median(run_times)
  tokens_per_step = statistics.median(tokens[1:])
  peak = metrics.measured_peak_flops(dtype)
  # Model FLOPs a step, attention counted over what each token attends to.
  flops = statistics.median(n * metrics.flops_per_token(model.config, context)
                            for n, context in zip(tokens[1:], contexts[1:]))
  from jpost.models import attention as attn
  chosen = attn.choose(attention, key_len=seq_len, block=model.config.attention_block,
                       sliding_window=model.config.sliding_window, dtype=dtype)
  return {'shape': shape, 'dtype': dtype, 'random_init': random_init, 'batch': batch,
          'seq_len': seq_len, 'row_len': packing['row_len'], 'remat': remat,
          'attention': f'{attention} ({chosen})',
          'attention_block': attention_block, 'logits_chunk': logits_chunk,
          'params': model.config.num_params(),
          'device': jax.devices()[0].device_kind, 'first_step_s': round(compile_s, 2),
          'step_s_median': round(seconds, 3), 'tokens_per_step': tokens_per_step,
          'tokens_per_s': round(tokens_per_step / seconds, 1),
          'mfu': round(flops / seconds / peak, 4), 'peak_flops_measured': peak,
          'attended_length': round(statistics.median(contexts[1:]), 1),
          'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          'peak_device_mb': _device_peak_mb(),
          'final_loss': float(out['loss'])}


def recipe_packing(model_config, batch: int, seq_len: int, padding_free: str) -> dict:
  """configs/sft.py's packing (jpost.trainers.sft.packing) at this batch,
  row length and padding-free setting, on one device."""
  import common
  from jpost.trainers import sft
  config = common.recipe_config('sft')
  with config.unlocked():
    config.batch_size, config.accum_steps, config.data.max_len = batch, 1, seq_len
    config.data.padding_free = {'auto': 'auto', 'on': 'true', 'off': 'false'}[padding_free]
  return sft.packing(config, model_config, 1)


def _device_peak_mb():
  """Peak bytes the device allocator held (GPU; None where not reported)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else round(peak / 2**20)


def main():
  # With huge pages, as `python -m jpost.main` runs configs/sft.py
  # (jpost/host.py); jpost.host imports no JAX.
  from jpost import host
  host.restart_with_huge_pages('sft')
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq-len', type=int, default=256)
  parser.add_argument('--steps', type=int, default=6)
  # The defaults are configs/sft.py's: 'auto' compute (bfloat16 where the
  # machine has 16-bit matmul hardware, else float32; float32 master weights)
  # with remat. `--dtypes float32,bfloat16 --no-remat` compares.
  parser.add_argument('--dtypes', default='auto')
  parser.add_argument('--remat', nargs='?', const='full', default='dots',
                      help='comma-separated: full, dots, none (one process each)')
  parser.add_argument('--no-remat', dest='remat', action='store_const', const='none')
  parser.add_argument('--attention', default='auto',
                      help='comma-separated: auto, xla, blockwise, pallas, cudnn (one process each)')
  parser.add_argument('--shape', default='smollm2-135m')
  parser.add_argument('--logits-chunk', type=int, default=32)
  parser.add_argument('--attention-block', type=int, default=512)
  parser.add_argument('--random-init', action='store_true',
                      help='random weights of SmolLM2-135M shape and synthetic batches')
  parser.add_argument('--pad', type=int, default=0,
                      help='synthetic rows: end each with this many padding tokens')
  parser.add_argument('--padding-free', default='auto',
                      help='comma-separated: auto, on, off (one process each)')
  parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: run one dtype
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.one, args.batch, args.seq_len, args.steps, args.remat,
                             args.random_init, args.attention, args.shape, args.logits_chunk,
                             args.pad, args.attention_block, args.padding_free)))
    return
  policies = args.remat.split(',')
  if not set(policies) <= {'full', 'dots', 'none'}:
    parser.error(f'--remat {args.remat}: use full, dots or none (comma-separated).')
  results, failed = [], []
  if not set(args.padding_free.split(',')) <= {'auto', 'on', 'off'}:
    parser.error(f'--padding-free {args.padding_free}: use auto, on or off (comma-separated).')
  settings = itertools.product(args.dtypes.split(','), args.attention.split(','), policies,
                               args.padding_free.split(','))
  for dtype, attention, remat, padding_free in settings:
    cmd = [sys.executable, __file__, '--one', dtype, '--batch', str(args.batch),
           '--seq-len', str(args.seq_len), '--steps', str(args.steps), '--remat', remat,
           '--attention', attention, '--shape', args.shape,
           '--logits-chunk', str(args.logits_chunk), '--pad', str(args.pad),
           '--attention-block', str(args.attention_block), '--padding-free', padding_free
           ] + ['--random-init'] * args.random_init
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:  # e.g. out of memory: say so, and measure the other settings
      print(f'{args.shape} {dtype} attention {attention} remat {remat} padding-free '
            f'{padding_free}: failed '
            f'(exit {proc.returncode}):\n{proc.stderr[-3000:]}', flush=True)
      failed.append(f'{dtype}/{attention}/{remat}/{padding_free}')
      continue
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    results.append(result)
    device_peak = (f", device peak {result['peak_device_mb']} MB"
                   if result['peak_device_mb'] is not None else '')
    rows = f"{args.batch * args.seq_len // result['row_len']} x {result['row_len']}"
    print(f"{args.shape} {dtype} attention {result['attention']} remat {remat} rows {rows}: "
          f"{result['tokens_per_s']} tokens/s, step {result['step_s_median']}s (first step {result['first_step_s']}s), "
          f"MFU {100 * result['mfu']:.1f}%, peak RSS {result['peak_rss_mb']} MB{device_peak} "
          f"on {result['device']}", flush=True)
  if not results:
    sys.exit(f'every setting failed: {", ".join(failed)}')
  best = max(results, key=lambda r: r['tokens_per_s'])
  import common  # here, after the runs: this process stayed free of JAX while they ran
  print(json.dumps({'machine': common.machine(), 'tokens_per_s': best['tokens_per_s'],
                    'mfu': best['mfu'],
                    'peak_rss_mb': best['peak_rss_mb'], 'best_dtype': best['dtype'],
                    'settings': results, 'failed': failed}))


if __name__ == '__main__':
  main()
