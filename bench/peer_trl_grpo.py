"""The peer on the same GRPO setup: TRL's GRPOTrainer on SmolLM2-135M-Instruct.

  pip install -e '.[bench]'  # trl: not a jpost dependency, the peer's own stack
  python bench/peer_trl_grpo.py [--steps 5] [--prompts 2] [--samples 8] [--max-new 128]
                                [--beta 0.04] [--dtypes float32,bfloat16] [--remat | --no-remat]
                                [--data gsm8k:rl_train] [--threads 2]

The defaults are `bench/grpo_step.py`'s (configs/grpo.py with its overrides):
the same model files, the same prompt rows (gsm8k:rl_train: the user message
with the '#### <number>' instruction, rendered by the model's own chat
template; the token ids are the same as jpost's), 2 prompts x 8 samples x up
to 128 new tokens at temperature 1.0 (no top-k / top-p), beta 0.04, one
optimiser step per rollout (TRL's num_iterations=1, steps_per_generation=1 =
jpost's epochs=1, minibatches=1), AdamW at 1.5e-5 decaying linearly to 0 over
--steps (b2 0.99, no weight decay, clip 1.0), PPO clip 0.2 / 0.28, per-token
loss over the batch's tokens (TRL's loss_type='dapo' = jpost's
aggregation='token'), rewards scaled by the group's std (scale_rewards='group'
= scale='std'), remat (TRL's gradient_checkpointing) on, and jpost's own
math verifier as the reward (`rewards.build({'math': ...})`, 1.0 when the
final answer equals the row's 'answer'). Each dtype runs in its own process
with --threads torch threads: `float32`, and `bfloat16` = TRL's `bf16=True`
(autocast with float32 master weights, the policy's and the reference's
forwards, generation included; jpost's bfloat16 is likewise bfloat16 compute
over float32 parameters).

What cannot be matched exactly:
  - Generation is transformers' `generate` (eager, dynamic KV cache grown
    per token, TRL sets `disable_compile=True`); jpost samples with a
    preallocated cache at bucketed widths in one compiled loop.
  - The KL term: TRL uses the k3 estimator (exp(r) - r - 1), jpost's recipe
    k2 (r^2 / 2); same cost, different gradient.
  - The ratio's old log-probs: with one update per rollout TRL uses the
    detached current log-probs (the ratio is 1), jpost's recipe the
    sampler's (old_logprobs='sampler'); neither runs an extra forward.
  - Prompt order: TRL's sampler and jpost's Grain pipeline shuffle
    differently, so the steps see different prompts and completion lengths;
    each step's mean completion length is printed and in the JSON, since the
    rollout's cost follows it. TRL has no prompt-length cap; like jpost
    (max_prompt_len 256, policy 'error') this script refuses longer prompts.
  - TRL also computes per-token entropies in the loss forward (for its
    logs); jpost's recipe does not (entropy_coef 0).

Times: a step runs from the trainer's step begin to its step end (rollout,
reference forward, rewards, loss, backward, optimiser). `rollout_s` is the
time inside the policy's `generate` (timed by wrapping that method of the
model instance; TRL's own profiling timers only reach W&B / MLflow /
Trackio), `reward_s` the reward function, and `update_s` the rest (the
reference log-prob forward and the update, as grpo_step's `update_s`, plus
TRL's tokenising / decoding around them). The first step is reported apart;
the figures are medians over the rest. PyTorch runs eagerly, so every step
after the first is warm (`warm_s_per_step` = `s_per_step`). The last line is
one JSON object shaped like grpo_step's, with the fastest dtype's figures on
top and every dtype's under `settings`.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(dtype: str, args) -> dict:
  import torch
  torch.set_num_threads(args.threads)  # before any work, so every op uses this many
  import datasets
  import transformers
  import trl

  sys.path.insert(0, ROOT)
  from jpost import rewards
  from jpost.data import pipeline
  from jpost.models import pretrained
  from jpost.trainers import rollout

  model_dir = str(pretrained.resolve('smollm2-135m-instruct'))
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  rows = [json.loads(line) for line in open(pipeline.resolve_sources([args.data])[0])]
  for row in rows:  # jpost's pipeline raises on a prompt over max_prompt_len
    ids = tokenizer.apply_chat_template(row['prompt'], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)['input_ids']
    if len(ids) > args.max_prompt_len:
      sys.exit(f'row {row.get("id")}: {len(ids)} prompt tokens > --max-prompt-len '
               f'{args.max_prompt_len} (jpost would refuse it too)')
  # The reward reads only 'answer' (TRL passes the dataset's columns to it).
  data = datasets.Dataset.from_list([{'prompt': r['prompt'], 'answer': r['answer']} for r in rows])

  # Per step: seconds inside generate and inside the reward, reset at step begin.
  current = {'rollout': 0.0, 'reward': 0.0}
  steps, step_logs = [], []
  fns = rewards.build({'math': {'weight': 1.0}})  # the recipe's reward

  def math_reward(prompts, completions, answer, **kwargs):
    tic = time.perf_counter()
    # As jpost scores: the last user message, the reply's text, the row's extras.
    texts = [c[-1]['content'] if isinstance(c, list) else c for c in completions]
    total = rewards.score(fns, [rollout.prompt_text(p) for p in prompts], texts,
                          [{'answer': a} for a in answer]).total
    current['reward'] += time.perf_counter() - tic
    return [float(x) for x in total]

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
      current.update(rollout=0.0, reward=0.0)
      self.tic = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      seconds = time.perf_counter() - self.tic
      steps.append({'step_s': seconds, 'rollout_s': current['rollout'],
                    'reward_s': current['reward'],
                    'update_s': seconds - current['rollout'] - current['reward']})

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and 'completions/mean_length' in logs:  # one per step: logging_steps=1
        step_logs.append(logs)

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  generate = model.generate

  def timed_generate(*a, **kw):
    tic = time.perf_counter()
    try:
      return generate(*a, **kw)
    finally:
      current['rollout'] += time.perf_counter() - tic

  # An instance attribute shadows the method; TRL calls model.generate on this
  # very object (nothing wraps it on one CPU process).
  model.generate = timed_generate

  with tempfile.TemporaryDirectory() as out:
    config = trl.GRPOConfig(
        output_dir=out, max_steps=args.steps, seed=0, use_cpu=True, report_to=[],
        save_strategy='no', logging_steps=1, dataloader_num_workers=0,
        bf16=dtype == 'bfloat16', fp16=False,  # GRPOConfig's default is bf16=True
        gradient_checkpointing=args.remat,
        # One rollout of prompts x samples completions, one optimiser step on it.
        per_device_train_batch_size=args.prompts * args.samples, num_generations=args.samples,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.max_new, temperature=1.0, top_k=0, top_p=1.0,
        # configs/grpo.py's rl and optim blocks.
        beta=args.beta, epsilon=0.2, epsilon_high=0.28, loss_type='dapo', scale_rewards='group',
        learning_rate=1.5e-5, lr_scheduler_type='linear', warmup_steps=0, adam_beta1=0.9,
        adam_beta2=0.99, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=math_reward, args=config,
                              train_dataset=data, processing_class=tokenizer,
                              callbacks=[Clock()])
    trainer.train()

  for record, log in zip(steps, step_logs):
    record.update(completion_length=log['completions/mean_length'],
                  truncated=log['completions/clipped_ratio'], reward=log['reward'])
  rest = steps[1:] or steps
  median = lambda key: statistics.median(r[key] for r in rest)
  return {'peer': f'trl {trl.__version__}', 'torch': torch.__version__,
          'transformers': transformers.__version__, 'dtype': dtype,
          's_per_step': round(median('step_s'), 2), 'rollout_s': round(median('rollout_s'), 2),
          'update_s': round(median('update_s'), 2), 'reward_s': round(median('reward_s'), 3),
          'first_step_s': round(steps[0]['step_s'], 1), 'steps_measured': len(rest),
          'completion_length': round(median('completion_length'), 1) if step_logs else None,
          'torch_threads': torch.get_num_threads(),
          'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          'steps': [{k: round(v, 3) for k, v in r.items()} for r in steps]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--prompts', type=int, default=2)
  parser.add_argument('--samples', type=int, default=8)
  parser.add_argument('--max-new', type=int, default=128)
  parser.add_argument('--max-prompt-len', type=int, default=256)
  parser.add_argument('--beta', type=float, default=0.04)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--data', default='gsm8k:rl_train')
  parser.add_argument('--remat', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: run one dtype
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.one, args)))
    return
  settings = ['--steps', str(args.steps), '--prompts', str(args.prompts), '--samples',
              str(args.samples), '--max-new', str(args.max_new), '--max-prompt-len',
              str(args.max_prompt_len), '--beta', str(args.beta), '--data', args.data,
              '--threads', str(args.threads), '--remat' if args.remat else '--no-remat']
  results = []
  for dtype in args.dtypes.split(','):
    # A process per dtype: its own peak RSS, and no state shared between runs.
    proc = subprocess.run([sys.executable, __file__, '--one', dtype, *settings],
                          capture_output=True, text=True)
    if proc.returncode:
      sys.exit(f'{dtype} run failed:\n{proc.stderr[-3000:]}')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for i, r in enumerate(result['steps']):
      print(f"{dtype} step {i + 1}: {r['step_s']:.1f} s (rollout {r['rollout_s']:.1f}, "
            f"reward {r['reward_s']:.2f}, update {r['update_s']:.1f}); completion length "
            f"{r.get('completion_length', float('nan')):.0f}, "
            f"truncated {r.get('truncated', float('nan')):.2f}")
    print(f"{dtype}: {result['s_per_step']} s/step (rollout {result['rollout_s']}, update "
          f"{result['update_s']}; first {result['first_step_s']} s), peak RSS "
          f"{result['peak_rss_mb']} MB")
    results.append(result)
  from common import machine  # after the runs: it times a JAX matmul
  best = min(results, key=lambda r: r['s_per_step'])
  print(json.dumps({
      'machine': machine(), 'peer': best['peer'],
      'setup': f'{args.prompts} prompts x {args.samples} samples x <= {args.max_new} new tokens, '
               f'beta {args.beta}, {best["dtype"]}, 1 minibatch(es), remat {args.remat}, '
               f'{args.data}',
      's_per_step': best['s_per_step'],
      'warm_s_per_step': best['s_per_step'],  # eager PyTorch: no step compiles again
      'warm_steps': best['steps_measured'],
      'rollout_s': best['rollout_s'], 'update_s': best['update_s'], 'reward_s': best['reward_s'],
      'first_step_s': best['first_step_s'], 'steps_measured': best['steps_measured'],
      'peak_rss_mb': best['peak_rss_mb'], 'best_dtype': best['dtype'],
      'settings': [{k: v for k, v in r.items() if k != 'steps'} for r in results]}))


if __name__ == '__main__':
  main()
