"""GRPO step time for SmolLM2-135M: seconds per step, split into rollout and update.

  python bench/grpo_step.py [--steps 5] [--prompts 2] [--samples 8] [--max-new 128]
                            [--beta 0.04] [--dtype auto] [--remat full|dots | --no-remat]
                            [--data gsm8k:rl_train] [--logits-chunk N] [--attention auto]
                            [--decode-kernels auto|xla]

Runs the real online loop (jpost.trainers.online, configs/grpo.py with these
overrides: GSM8K prompts, 2 prompts x 8 samples x up to 128 new tokens,
beta 0.04, no held-out eval; dtype 'auto' with remat, as the recipe) and reads its per-step timings. The first step
(compilation) is reported apart; the figures are medians over the rest. The
last line is one JSON object with `s_per_step`, `rollout_s`, `update_s`
(`update_s` counts the reference / old log-prob forwards and the update),
`reward_s` and peak RSS. A step with a prompt or completion width not seen
before compiles again; `warm_s_per_step` is the median over the steps that
did not.
"""

import argparse
import json
import pathlib
import resource
import statistics
import tempfile

import common


def grpo_config(args):
  c = common.recipe_config('grpo').unlock()
  c.data.train = (args.data,)
  c.data.eval = ()
  c.data.max_prompt_len = args.max_prompt_len
  c.prompts_per_step = args.prompts
  c.sampling.num_samples = args.samples
  c.sampling.max_new_tokens = args.max_new
  c.sampling.temperature = 1.0
  c.rl.beta = args.beta
  c.model.dtype = args.dtype
  c.model.path = args.model
  c.model.remat = c.model.remat if args.remat == 'recipe' else args.remat
  c.rl.minibatches = args.minibatches
  if args.logits_chunk is not None:
    c.model.logits_chunk = args.logits_chunk
  c.model.attention = args.attention
  c.model.decode_kernels = args.decode_kernels
  c.total_steps = args.steps
  c.eval_every = 0
  c.export_hf = False
  c.checkpoint.every = 10_000
  return c.lock()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--prompts', type=int, default=2)
  parser.add_argument('--samples', type=int, default=8)
  parser.add_argument('--max-new', type=int, default=128)
  parser.add_argument('--max-prompt-len', type=int, default=256)
  parser.add_argument('--beta', type=float, default=0.04)
  parser.add_argument('--dtype', default='auto')  # the recipe's default (resolve_dtype)
  parser.add_argument('--data', default='gsm8k:rl_train')
  parser.add_argument('--model', default='smollm2-135m-instruct')
  parser.add_argument('--remat', nargs='?', const='recipe', default='recipe',
                      help="full, dots or none; by default the recipe's policy")
  parser.add_argument('--no-remat', dest='remat', action='store_const', const='none')
  parser.add_argument('--minibatches', type=int, default=1)
  parser.add_argument('--logits-chunk', type=int, help="LM-head positions per chunk (the recipe's)")
  parser.add_argument('--attention', default='auto', help='auto, xla, blockwise or cpu (the recipe: auto)')
  parser.add_argument('--decode-kernels', default='auto',
                      help="the rollout's matmuls and attention: auto (jpost's CPU kernels where "
                           "they apply) or xla")
  args = parser.parse_args()
  from jpost.models.config import resolve_dtype
  args.dtype = resolve_dtype(args.dtype)

  from jpost.trainers import online
  c = grpo_config(args)
  with tempfile.TemporaryDirectory() as workdir:
    online.run(c, workdir, 'grpo')
    records = [json.loads(line) for line in
               (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  steps = [r for r in records if 'time/step_s' in r]
  # A step whose prompt width (rollout) or prompt + completion widths and
  # update rows (packed completions) were not seen before compiles;
  # `warm_s_per_step` leaves those out.
  seen, warm = set(), []
  for r in steps:
    widths = (r['shape/prompt_width'], r['shape/completion_width'])
    update = widths + (r['shape/update_rows'],)
    compiled = widths[0] not in seen or update not in seen
    seen |= {widths[0], update}
    if not compiled:
      warm.append(r['time/step_s'])
    print(f"step {r['step']}: {r['time/step_s']:.1f} s (rollout {r['time/rollout_s']:.1f}, "
          f"reward {r['time/reward_s']:.2f}, prep {r['time/prep_s']:.1f}, "
          f"update {r['time/update_s']:.1f}); completion length {r['completion/length']:.0f}, "
          f"truncated {r['completion/truncated']:.2f}, widths {widths[0]} + {widths[1]}, "
          f"{r['shape/update_rows']} update rows"
          f"{', compiled' if compiled else ''}")
  rest = steps[1:] or steps
  median = lambda key: statistics.median(r[key] for r in rest)
  result = {
      'machine': common.machine(),
      'setup': f'{args.prompts} prompts x {args.samples} samples x <= {args.max_new} new tokens, '
               f'beta {args.beta}, {args.dtype}, {args.minibatches} minibatch(es), '
               f'remat {c.model.remat}, LM-head chunk {c.model.logits_chunk}, '
               f'attention {args.attention}, decode kernels {args.decode_kernels}, {args.data}',
      's_per_step': round(median('time/step_s'), 2),
      'warm_s_per_step': round(statistics.median(warm), 2) if warm else None,
      'warm_steps': len(warm),
      'rollout_s': round(median('time/rollout_s'), 2),
      'update_s': round(median('time/prep_s') + median('time/update_s'), 2),
      'reward_s': round(median('time/reward_s'), 3),
      'first_step_s': round(steps[0]['time/step_s'], 1),
      'steps_measured': len(rest),
      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
