"""Memory and speed planner for an SFT step: what a model shape, batch and
length need per device, predicted by formula, against XLA's compiled program
(and, with --run, a measured run). With --grpo, the same for a GRPO policy
update (configs/grpo.py's: shared prompts, the KL term; formula and compiled).

  python bench/plan.py --shape llama-3.2-1b --batch 8 --seq-len 4096 \\
      [--dtype bfloat16] [--remat full] [--attention auto] [--logits-chunk 32] \\
      [--layers N] [--fsdp D] [--compile] [--run --steps 4]
  python bench/plan.py --shape ... --grpo PROMPTS,SAMPLES,PROMPT_LEN,NEW_TOKENS [--compile]
      (LM-head chunk: the recipe's, 64 positions per row)

The prediction is jpost.memory's (its docstring lists the parts); `--compile`
compares it with XLA's buffer assignment for the step (argument + temporaries +
outputs not aliased to arguments: the peak the program asks for; no memory
is allocated, so any shape can be checked on a small machine), `--run` runs
the step and reports the device's peak bytes in use (GPU) or RSS (CPU) and
the step time, next to the time the measured matmul peak predicts.
"""

import argparse
import json
import statistics

import common
from jpost import memory


def _abstract_state(cfg, mesh):
  """(graphdef, abstract train state on `mesh`, AdamW): what an update reads."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from jpost import optim, sharding
  from jpost.models.decoder import Decoder
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = jax.tree.map(place, params, sharding.state_shardings(params, mesh))
  tx, schedule = optim.build(ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-5, warmup_steps=0, schedule='constant', end_lr_ratio=1.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)), 10)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_state = optax.tree_map_params(
      tx, place, abstract_opt, jax.tree.map(lambda x: x.sharding, params),
      transform_non_params=lambda x: place(x, replicated))
  state = {'params': params, 'opt_state': opt_state,
           'step': place(jax.ShapeDtypeStruct((), jnp.int32), replicated),
           'rng': place(jax.ShapeDtypeStruct((2,), jnp.uint32), replicated)}
  return graphdef, state, tx, schedule


def _assignment(step, *args) -> dict:
  """XLA's buffer assignment of `step` compiled for abstract `args`."""
  m = step.lower(*args).compile().memory_analysis()
  peak = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  return {'arguments': m.argument_size_in_bytes, 'temporaries': m.temp_size_in_bytes,
          'outputs_not_aliased': m.output_size_in_bytes - m.alias_size_in_bytes, 'peak': peak}


def compiled_peak(cfg, batch: int, seq_len: int) -> dict:
  """XLA's buffer assignment for the SFT step on abstract inputs (no allocation)."""
  import functools

  import jax
  import jax.numpy as jnp

  from jpost import sharding
  from jpost.trainers import loop, sft
  mesh = sharding.make_mesh()
  graphdef, state, tx, schedule = _abstract_state(cfg, mesh)
  step = loop.make_update(graphdef, functools.partial(sft.loss_fn, normalization='token'),
                          functools.partial(sft.normalizer_fn, normalization='token'), tx,
                          schedule, accum_steps=1, mesh=mesh, state=state)
  row = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  return _assignment(step, state, {'tokens': row, 'positions': row, 'segment_ids': row,
                                   'loss_mask': row})


def grpo_recipe():
  """configs/grpo.py's config."""
  return common.recipe_config('grpo')


def compiled_peak_grpo(cfg, prompts: int, samples: int, prompt_len: int, new_tokens: int,
                       beta: float = 0.04) -> dict:
  """XLA's buffer assignment for configs/grpo.py's policy update (shared
  prompts, token aggregation, the KL term when beta > 0) on abstract inputs."""
  import functools

  import jax
  import jax.numpy as jnp

  from jpost import sharding
  from jpost.trainers import loop, rl_parts
  rl = grpo_recipe().rl
  mesh = sharding.make_mesh()
  graphdef, state, tx, schedule = _abstract_state(cfg, mesh)
  step = loop.make_update(
      graphdef, functools.partial(rl_parts.policy_loss_fn, rl=rl, temperature=1.0,
                                  max_new_tokens=new_tokens, kl_coef=beta),
      functools.partial(rl_parts.policy_normalizer_fn, aggregation=rl.aggregation,
                        max_new_tokens=new_tokens),
      tx, schedule, accum_steps=1, mesh=mesh, state=state)
  rows = prompts * samples
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  floats = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  batch = {'prompt_tokens': ints(prompts, prompt_len), 'prompt_positions': ints(prompts, prompt_len),
           'prompt_segment_ids': ints(prompts, prompt_len),
           'completion_tokens': ints(rows, new_tokens),
           'completion_positions': ints(rows, new_tokens),
           'completion_mask': floats(rows, new_tokens), 'old_logprobs': floats(rows, new_tokens),
           'advantages': floats(rows)}
  if beta:
    batch['ref_logprobs'] = floats(rows, new_tokens)
  return _assignment(step, state, batch)


def run_steps(cfg, batch: int, seq_len: int, steps: int) -> dict:
  """Runs the step: median step time and the peak memory actually used."""
  import resource

  import jax

  from jpost import sharding
  from jpost.models import shapes
  from sft_throughput import synthetic_batches
  mesh = sharding.make_mesh()
  step, state = common.sft_step(shapes.init(cfg, mesh=mesh), mesh, steps)
  _, times, *_ = common.time_steps(step, state,
                                   synthetic_batches(batch, seq_len, cfg.vocab_size), mesh,
                                   steps + 1)
  stats = jax.devices()[0].memory_stats() or {}
  return {'step_s': statistics.median(times[1:]), 'first_step_s': times[0],
          'device_peak': stats.get('peak_bytes_in_use'),
          'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def print_grpo(cfg, args, prompts, samples, prompt_len, new_tokens):
  plan = memory.with_state(cfg, memory.rl_update_activations(cfg, prompts, samples, prompt_len,
                                                             new_tokens))
  print(f'{args.shape} ({cfg.num_layers} layers), GRPO update of {prompts} prompts x {samples} '
        f'samples, prompts of {prompt_len} tokens, {new_tokens} new tokens, {args.dtype}, remat '
        f'{args.remat}, attention {args.attention}, LM-head chunk {args.logits_chunk}')
  width = max(map(len, plan))
  for name, value in plan.items():
    print(f'  {name:<{width}} {value / 2**30:8.3f} GB')
  out = {'shape': args.shape, 'layers': cfg.num_layers, 'grpo': args.grpo, 'dtype': args.dtype,
         'remat': args.remat, 'attention': args.attention, 'logits_chunk': args.logits_chunk,
         'predicted_gb': {k: round(v / 2**30, 3) for k, v in plan.items()}}
  if args.compile:
    comp = compiled_peak_grpo(cfg, prompts, samples, prompt_len, new_tokens)
    out['compiled_gb'] = {k: round(v / 2**30, 3) for k, v in comp.items()}
    out['predicted_over_compiled'] = round(plan['total'] / comp['peak'], 3)
    print(f"  XLA's assignment: {comp['peak'] / 2**30:.3f} GB (arguments "
          f"{comp['arguments'] / 2**30:.3f}, temporaries {comp['temporaries'] / 2**30:.3f}); "
          f"predicted / compiled = {out['predicted_over_compiled']}")
  out['machine'] = common.machine()
  print(json.dumps(out))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', default='smollm2-135m')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq-len', type=int, default=4096)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--remat', default='full', choices=['full', 'dots', 'none'])
  parser.add_argument('--attention', default='auto')
  parser.add_argument('--logits-chunk', type=int,
                      help="LM-head positions per chunk: the recipe's (SFT 32, GRPO 8)")
  parser.add_argument('--max-segments', type=int,
                      help="attention_max_segments (cuDNN's workspace grows with it)")
  parser.add_argument('--layers', type=int, help='fewer layers than the shape (a quick check)')
  parser.add_argument('--fsdp', type=int, default=1, help='devices the state is sharded over')
  parser.add_argument('--compile', action='store_true', help="compare with XLA's assignment")
  parser.add_argument('--run', action='store_true', help='run the step and measure')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--grpo', metavar='PROMPTS,SAMPLES,PROMPT_LEN,NEW_TOKENS',
                      help="instead: XLA's assignment for a GRPO policy update of this size")
  args = parser.parse_args()
  from jpost import metrics
  from jpost.models import shapes
  if args.logits_chunk is None:
    args.logits_chunk = grpo_recipe().model.logits_chunk if args.grpo else 32
  overrides = dict(dtype=args.dtype, remat=args.remat, attention=args.attention,
                   logits_chunk=args.logits_chunk)
  if args.layers:
    overrides['num_layers'] = args.layers
  if args.max_segments:
    overrides['attention_max_segments'] = args.max_segments
  cfg = shapes.config(args.shape, **overrides)
  if args.grpo:
    return print_grpo(cfg, args, *map(int, args.grpo.split(',')))
  plan = memory.with_state(cfg, memory.step_activations(cfg, args.batch / args.fsdp,
                                                       args.seq_len), args.fsdp)
  tokens = args.batch * args.seq_len
  flops = metrics.flops_per_token(cfg, args.seq_len) * tokens / args.fsdp
  peak = metrics.measured_peak_flops(args.dtype) / len(__import__('jax').devices())
  out = {'shape': args.shape, 'layers': cfg.num_layers, 'params': cfg.num_params(),
         'batch': args.batch, 'seq_len': args.seq_len, 'dtype': args.dtype,
         'remat': args.remat, 'attention': args.attention, 'logits_chunk': args.logits_chunk,
         'fsdp': args.fsdp, 'max_segments': cfg.attention_max_segments,
         'predicted_gb': {k: round(v / 2**30, 3) for k, v in plan.items()},
         'step_flops': flops, 'roofline_step_s': round(flops / peak, 3)}
  width = max(map(len, plan))
  print(f"{args.shape} ({cfg.num_layers} layers, {cfg.num_params() / 1e9:.2f}B params), "
        f"{args.batch} x {args.seq_len}, {args.dtype}, remat {args.remat}, attention "
        f"{args.attention}, LM-head chunk {args.logits_chunk}, fsdp {args.fsdp}")
  for name, value in plan.items():
    print(f'  {name:<{width}} {value / 2**30:8.3f} GB')
  print(f'  step at the measured matmul peak ({peak / 1e12:.3g} TFLOP/s per device): '
        f"{out['roofline_step_s']} s")
  if args.compile:
    comp = compiled_peak(cfg, args.batch, args.seq_len)
    out['compiled_gb'] = {k: round(v / 2**30, 3) for k, v in comp.items()}
    out['predicted_over_compiled'] = round(plan['total'] / comp['peak'], 3)
    print(f"  XLA's assignment: {comp['peak'] / 2**30:.3f} GB (arguments "
          f"{comp['arguments'] / 2**30:.3f}, temporaries {comp['temporaries'] / 2**30:.3f}); "
          f"predicted / compiled = {out['predicted_over_compiled']}")
  if args.run:
    measured = run_steps(cfg, args.batch, args.seq_len, args.steps)
    out['measured'] = measured
    out['mfu'] = round(flops / measured['step_s'] / peak, 4)
    used = measured['device_peak'] or measured['peak_rss']
    print(f"  measured: step {measured['step_s']:.3f} s (MFU {100 * out['mfu']:.1f}%), "
          f"peak {'device' if measured['device_peak'] else 'RSS'} {used / 2**30:.3f} GB")
  out['machine'] = common.machine()
  print(json.dumps(out))


if __name__ == '__main__':
  main()
