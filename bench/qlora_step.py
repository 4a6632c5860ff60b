"""An SFT step with LoRA adapters at a real model's shape (random weights):
step time, tokens/s, MFU and peak memory, for a bfloat16, int8 or NF4 base.

  python bench/qlora_step.py [--shape llama3-8b] [--quantize nf4] [--rank 16]
      [--batch 1] [--seq-len 2048] [--steps 4] [--layers N] [--no-remat]

Speed and memory do not depend on the weights' values, so the base is built
in place (quantised codes are zeros) rather than read from a checkpoint;
`--layers` cuts the depth for a quick run on a small machine. Peak memory is
the device's peak bytes in use (the process's peak RSS on CPU). The last
line is one JSON object.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import common
from jpost import host
from jpost.models import shapes

SHAPES = {'llama3-8b': shapes.SHAPES['llama-3.1-8b'], 'smollm2-135m': common.SMOLLM2_135M}


def main():
  host.restart_with_huge_pages('sft')  # as `python -m jpost.main` runs SFT (jpost/host.py)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', default='llama3-8b', choices=sorted(SHAPES))
  parser.add_argument('--quantize', default='nf4', choices=['none', 'int8', 'nf4'])
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--seq-len', type=int, default=2048)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--layers', type=int, default=0, help='0: the shape\'s own depth')
  parser.add_argument('--remat', action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()

  import jax
  from flax import nnx

  from jpost import metrics, sharding
  from jpost.models import lora
  from jpost.models.config import ModelConfig
  from jpost.models.decoder import Decoder
  from jpost.trainers import loop
  from sft_throughput import synthetic_batches

  hf_config = dict(SHAPES[args.shape])
  if args.layers:
    hf_config['num_hidden_layers'] = args.layers
  cfg = ModelConfig.from_hf(hf_config, dtype='bfloat16', remat=args.remat,
                            lora=lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank,
                                                 quantize=args.quantize))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
  step, train_state = common.sft_step(model, mesh, args.steps + 1)
  sizes = loop.state_sizes(train_state)
  print(f'{args.shape} ({cfg.num_layers} layers), base {args.quantize}, rank {args.rank}: '
        f'{sizes}', file=sys.stderr, flush=True)
  batches = synthetic_batches(args.batch, args.seq_len, cfg.vocab_size)
  times = []
  for _ in range(args.steps + 1):
    batch = loop.place_batch(next(batches), mesh)
    tic = time.perf_counter()
    train_state, out = step(train_state, batch)
    float(out['loss'])
    times.append(time.perf_counter() - tic)
  seconds = statistics.median(times[1:])
  tokens = args.batch * args.seq_len
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  flops = metrics.flops_per_token(cfg, args.seq_len) * tokens / seconds
  print(json.dumps({
      'shape': args.shape, 'layers': cfg.num_layers, 'quantize': args.quantize,
      'rank': args.rank, 'batch': args.batch, 'seq_len': args.seq_len, 'remat': args.remat,
      'compile_s': round(times[0], 1), 'step_s': round(seconds, 3),
      'tokens_per_s': round(tokens / seconds, 1),
      'mfu': round(flops / metrics.measured_peak_flops('bfloat16'), 4),
      'peak_device_gb': None if peak is None else round(peak / 2**30, 2),
      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      'params_mb': round(sizes['memory/params_mb'], 1),
      'opt_state_mb': round(sizes['memory/opt_state_mb'], 1),
      'trainable_params': sizes['memory/trainable_params'], 'machine': common.machine()}))


if __name__ == '__main__':
  main()
