"""The online loop shared by GRPO and PPO.

Each step, in order: prompts -> rollout with the sampler -> rewards ->
reference / old log-probs (and values) -> advantages -> `epochs` passes of
clipped updates over `minibatches` slices of the rollout -> metrics and
checkpoint. The policy, its frozen reference (the starting weights) and the
PPO critic share one mesh; rollouts sample from the train state's own
parameters, so nothing is copied out of it.

The per-step pieces (training rows, log-probs, losses, advantages) are in
rl_parts.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jpost import checkpoint, metrics, ops, optim, rewards, sampling, sharding
from jpost.data import pipeline
from jpost.errors import ConfigError
from jpost.losses.policy import AGGREGATIONS
from jpost.models import hf, pretrained
from jpost.models import reward as scalar_models
from jpost.tokenizer import Tokenizer
from jpost.trainers import offline, register, rl_parts, rollout
from jpost.trainers.rl_parts import (critic_loss_fn, critic_normalizer_fn, grpo_advantages,
                                     make_logprobs_fn, make_values_fn, policy_loss_fn,
                                     policy_normalizer_fn, ppo_advantages, training_rows)

KL_PLACEMENT = ('loss', 'reward')
OLD_LOGPROBS = ('sampler', 'recompute')


def validate(config, algorithm: str) -> None:
  """Config errors that must surface before anything is compiled or sampled."""
  rl = config.rl
  if config.total_steps <= 0:
    raise ConfigError(f'config.total_steps={config.total_steps}: must be positive.')
  if config.prompts_per_step <= 0:
    raise ConfigError(f'config.prompts_per_step={config.prompts_per_step}: must be positive.')
  rows = config.prompts_per_step * config.sampling.num_samples
  if rl.minibatches <= 0 or rows % rl.minibatches:
    raise ConfigError(f'config.rl.minibatches={rl.minibatches} must divide the rollout rows '
                     f'(prompts_per_step x num_samples = {rows}).')
  if rl.epochs <= 0:
    raise ConfigError(f'config.rl.epochs={rl.epochs}: must be positive.')
  if rl.aggregation not in AGGREGATIONS:
    raise ConfigError(f'config.rl.aggregation={rl.aggregation!r}; use one of {AGGREGATIONS}.')
  if rl.kl_in not in KL_PLACEMENT:
    raise ConfigError(f'config.rl.kl_in={rl.kl_in!r}; use one of {KL_PLACEMENT}.')
  if rl.kl_estimator not in ops.KL_ESTIMATORS:
    raise ConfigError(f'config.rl.kl_estimator={rl.kl_estimator!r}; use one of '
                     f'{ops.KL_ESTIMATORS}.')
  if rl.old_logprobs not in OLD_LOGPROBS:
    raise ConfigError(f'config.rl.old_logprobs={rl.old_logprobs!r}; use one of {OLD_LOGPROBS}.')
  if rl.beta < 0:
    raise ConfigError(f'config.rl.beta={rl.beta}: must be >= 0 (0 drops the reference).')
  if config.sampling.temperature <= 0:
    raise ConfigError('config.sampling.temperature must be > 0 for RL: greedy rollouts have '
                     'no exploration and no defined log-probs.')
  if algorithm == 'ppo' and rl.kl_in != 'reward':
    raise ConfigError("PPO puts the KL penalty in the per-token reward: set config.rl.kl_in='reward'.")
  if algorithm == 'grpo' and config.sampling.num_samples < 2:
    raise ConfigError('GRPO needs config.sampling.num_samples >= 2 (a group per prompt).')
  optim.validate(config.optim, config.total_steps)


# --- evaluation ---------------------------------------------------------------------


def evaluate(model, tokenizer, dataset, reward_fns, settings, key) -> dict[str, Any]:
  """Greedy answers to every held-out prompt, scored by the rewards."""
  totals, per_source, lengths, truncated, samples = [], {}, [], [], []
  for batch in dataset:
    out = jax.device_get(sampling.generate(model, batch['tokens'], batch['segment_ids'] > 0,
                                           settings, key))
    texts = rollout.completion_texts(tokenizer, out.tokens, out.lengths)
    result = rewards.score(reward_fns, [rollout.prompt_text(p) for p in batch['prompt']],
                           texts, list(batch['extra']))
    totals.append(result.total)
    for name, values in result.per_source.items():
      per_source.setdefault(name, []).append(values)
    lengths.append(out.lengths)
    truncated.append(out.truncated)
    samples += [{'prompt': rollout.prompt_text(p), 'completion': t, 'reward': float(r)}
                for p, t, r in zip(batch['prompt'], texts, result.total)]
  report = {'eval/reward': float(np.mean(np.concatenate(totals))),
            'eval/length': float(np.mean(np.concatenate(lengths))),
            'eval/truncated': float(np.mean(np.concatenate(truncated))),
            'eval/prompts': len(samples)}
  for name, values in per_source.items():
    report[f'eval/{name}'] = float(np.nanmean(np.concatenate(values)))
  return report | {'samples': samples}


# --- the loop -------------------------------------------------------------------------


def _prompt_data(config, tokenizer, sources, *, epochs, batch_size, seed):
  return pipeline.build('prompt', pipeline.resolve_sources(list(sources)), tokenizer,
                        batch_size=batch_size, max_len=config.data.max_prompt_len,
                        num_epochs=epochs, seed=seed, policy=config.data.policy,
                        drop_remainder=epochs is None)


def _jit_step(graphdef, task, tx, schedule, state):
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(offline.make_train_step(graphdef, task, tx, schedule, 1),
                 in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))


def _critic(config, model_dir, mesh):
  """The PPO critic: a scalar head on a trunk from ppo.critic_path (e.g. a
  trained reward model) or, by default, the policy's own checkpoint."""
  path = pretrained.resolve(config.ppo.critic_path) if config.ppo.critic_path else model_dir
  return scalar_models.load(path, mesh=mesh, seed=config.seed, dtype=config.model.dtype,
                            param_dtype=config.model.param_dtype, remat=config.model.remat)


def run(config, workdir: str | None, algorithm: str) -> dict[str, Any]:
  """Trains for config.total_steps online steps, resuming from workdir."""
  # --- setup ----------------------------------------------------------------------
  validate(config, algorithm)
  if workdir is None:
    raise ConfigError('--workdir is required for training (checkpoints and metrics go there).')
  workdir = pathlib.Path(workdir)
  rl, num_samples = config.rl, config.sampling.num_samples
  rows_per_step = config.prompts_per_step * num_samples
  mesh = sharding.make_mesh(dict(config.mesh))
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  if (rows_per_step // rl.minibatches) % data_parallel:
    raise ConfigError(f'a minibatch of {rows_per_step // rl.minibatches} rows does not split '
                     f'over the mesh data x fsdp = {data_parallel}; change prompts_per_step, '
                     'sampling.num_samples, rl.minibatches or config.mesh.')
  reward_fns = rewards.build(config.rewards)

  # --- models -------------------------------------------------------------------------
  model_dir = pretrained.resolve(config.model.path)
  tokenizer = Tokenizer.from_dir(model_dir)
  model = hf.load(model_dir, mesh=mesh, dtype=config.model.dtype,
                  param_dtype=config.model.param_dtype, remat=config.model.remat)
  temperature = config.sampling.temperature
  settings = rollout.sampling_config(config.sampling, tokenizer)
  greedy = dataclasses.replace(settings, num_samples=1, temperature=0.0)
  tx, schedule = optim.build(config.optim, config.total_steps)
  graphdef, policy_state = offline.init_state(model, tx, config.seed, mesh)
  logprobs_fn = make_logprobs_fn(graphdef, temperature)
  use_ref = rl.beta > 0
  # The reference is the starting weights, copied before the first update
  # donates (and overwrites) the train state's buffers.
  ref_params = jax.tree.map(jnp.copy, policy_state['params']) if use_ref else None
  kl_coef = rl.beta if (use_ref and rl.kl_in == 'loss' and algorithm == 'grpo') else 0.0
  policy_task = offline.Task(
      loss_fn=lambda m, b, n: policy_loss_fn(m, b, n, rl=rl, temperature=temperature,
                                             max_new_tokens=config.sampling.max_new_tokens,
                                             kl_coef=kl_coef),
      normalizer_fn=lambda b: policy_normalizer_fn(
          b, aggregation=rl.aggregation, max_new_tokens=config.sampling.max_new_tokens),
      train_data=None)
  policy_step = _jit_step(graphdef, policy_task, tx, schedule, policy_state)
  state = {'policy': policy_state}
  if algorithm == 'ppo':
    critic_tx, critic_schedule = optim.build(config.ppo.critic_optim, config.total_steps)
    critic_graphdef, state['critic'] = offline.init_state(
        _critic(config, model_dir, mesh), critic_tx, config.seed, mesh)
    values_fn = make_values_fn(critic_graphdef)
    critic_step = _jit_step(
        critic_graphdef, offline.Task(
            loss_fn=lambda m, b, n: critic_loss_fn(m, b, n, clip_range=config.ppo.value_clip),
            normalizer_fn=critic_normalizer_fn, train_data=None),
        critic_tx, critic_schedule, state['critic'])

  # --- data and checkpoint --------------------------------------------------------------
  prompts, prompt_stats = _prompt_data(config, tokenizer, config.data.train, epochs=None,
                                       batch_size=config.prompts_per_step, seed=config.seed)
  prompt_iter = iter(prompts)
  ckpt = checkpoint.Checkpointer(workdir, every=config.checkpoint.every,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state = ckpt.restore(start, state)
    prompt_iter.set_state(data_state)
    print(f'resumed from step {start} of {ckpt.directory}', file=sys.stderr)
  writer = metrics.MetricsWriter(workdir, tensorboard=config.tensorboard, resume_step=start)

  def held_out(step):
    if not config.data.eval:
      return {}
    data, eval_stats = _prompt_data(config, tokenizer, config.data.eval, epochs=1,
                                    batch_size=config.eval_batch_size, seed=0)
    data = list(data)
    if not data:
      raise ConfigError(f'no held-out prompts left in {list(config.data.eval)}: '
                       f'{eval_stats.as_dict()}. Raise config.data.max_prompt_len if they '
                       'were dropped as too long.')
    report = evaluate(nnx.merge(graphdef, state['policy']['params']), tokenizer, data,
                      reward_fns, greedy, jax.random.key(0))
    samples = report.pop('samples')
    (workdir / f'eval_samples_{step}.jsonl').write_text(
        ''.join(json.dumps(s) + '\n' for s in samples))
    return report

  results = {}
  if start == 0 and config.eval_every:
    results['before'] = held_out(0)
    writer.write(0, results['before'])
    metrics.console_line(0, config.total_steps, results['before'])

  stop = {'requested': False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
  failures_total: dict[str, int] = {}
  step, last = start, {}
  # --- loop ------------------------------------------------------------------------------
  try:
    while step < config.total_steps:
      tic = time.perf_counter()
      key = jax.random.fold_in(jax.random.key(config.seed), step)
      batch = rl_parts.trim_prompts(next(prompt_iter), config.data.get('prompt_bucket', 0))
      policy_model = nnx.merge(graphdef, state['policy']['params'])
      completions = jax.device_get(sampling.generate(
          policy_model, batch['tokens'], batch['segment_ids'] > 0, settings, key))
      completions = rl_parts.trim_completions(completions, config.data.get('completion_bucket', 0))
      texts = rollout.completion_texts(tokenizer, completions.tokens, completions.lengths)
      rollout_s = time.perf_counter() - tic

      tic = time.perf_counter()
      prompts_text = [rollout.prompt_text(p) for p in batch['prompt'] for _ in range(num_samples)]
      extras = [e for e in batch['extra'] for _ in range(num_samples)]
      result = rewards.score(reward_fns, prompts_text, texts, extras)
      reward_s = time.perf_counter() - tic

      tic = time.perf_counter()
      rows = training_rows(batch, completions, num_samples)
      weights = rows['completion_mask']
      row_keys = rl_parts.POLICY_KEYS + (rl_parts.CRITIC_KEYS if algorithm == 'ppo' else ())
      place = functools.partial(offline.place_batch, mesh=mesh,
                                replicate_uneven=rl_parts.PROMPT_KEYS)
      placed = place({k: rows[k] for k in row_keys})
      out: dict[str, Any] = {}
      if rl.old_logprobs == 'recompute':
        old_lp = np.asarray(logprobs_fn(state['policy']['params'], placed))
        out['logprob_mismatch/sampler_vs_trainer'] = float(
            np.sum(np.abs(old_lp - rows['sampler_logprobs']) * weights) / max(weights.sum(), 1))
      else:
        old_lp = rows['sampler_logprobs']
      ref_lp = np.asarray(logprobs_fn(ref_params, placed)) if use_ref else None
      scores = result.total.astype(np.float32)
      if algorithm == 'grpo':
        if use_ref and rl.kl_in == 'reward':  # k1 per sequence, in the reward
          scores = scores - rl.beta * np.sum((old_lp - ref_lp) * weights, axis=1)
        advantages, extra = grpo_advantages(scores, rows, rl=rl, num_samples=num_samples)
        out |= extra
        train_rows = {'advantages': advantages}
      else:
        old_values = np.asarray(values_fn(state['critic']['params'], placed))
        train_rows = ppo_advantages(scores, old_values, old_lp, ref_lp, weights, rl=rl)
        train_rows['old_values'] = old_values
      train_rows |= {k: rows[k] for k in row_keys}
      train_rows['old_logprobs'] = old_lp
      if kl_coef:
        train_rows['ref_logprobs'] = ref_lp
      prep_s = time.perf_counter() - tic

      tic = time.perf_counter()
      updates = []
      order_rng = np.random.default_rng([config.seed, step])
      size = rows_per_step // rl.minibatches
      for epoch in range(rl.epochs):
        order = order_rng.permutation(rows_per_step)
        for m in range(rl.minibatches):
          # One minibatch keeps the G shared prompts (the loss does not depend
          # on row order); smaller ones give each row its own prompt.
          mini = place(train_rows if rl.minibatches == 1 else rl_parts.select_rows(
              train_rows, order[m * size:(m + 1) * size], num_samples))
          state['policy'], policy_out = policy_step(state['policy'], mini)
          if algorithm == 'ppo':
            state['critic'], critic_out = critic_step(state['critic'], mini)
            policy_out |= {f'critic/{k}': v for k, v in critic_out.items()}
          updates.append(jax.device_get(policy_out))
      update_s = time.perf_counter() - tic
      step += 1

      first = updates[0]
      if not all(math.isfinite(float(u['loss'])) for u in updates):
        raise FloatingPointError(
            f'loss is not finite at step {step}; stopping without saving. The last good '
            f'checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept. Lower '
            'config.optim.lr or check the rewards.')
      out |= {k: float(np.mean([u[k] for u in updates])) for k in first}
      if rl.old_logprobs == 'sampler':  # the first update sees exactly the sampler's tokens
        out['logprob_mismatch/sampler_vs_trainer'] = float(first['logprob_mismatch'])
      out |= result.metrics()
      for name, counts in result.failures.items():
        failures_total[name] = failures_total.get(name, 0) + sum(counts.values())
        out[f'failures_total/{name}'] = failures_total[name]
      out |= {'completion/length': float(np.mean(completions.lengths)),
              'completion/truncated': float(np.mean(completions.truncated)),
              # Widths the rollout and update were compiled for (a new one recompiles).
              'shape/prompt_width': batch['tokens'].shape[1],
              'shape/completion_width': completions.tokens.shape[1],
              'time/rollout_s': rollout_s, 'time/reward_s': reward_s, 'time/prep_s': prep_s,
              'time/update_s': update_s,
              'time/step_s': rollout_s + reward_s + prep_s + update_s}
      out |= {f'data/{k}': v for k, v in prompt_stats.as_dict()['encoded'].items()}
      if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
        out |= held_out(step)
      writer.write(step, out)
      if step % config.log_every == 0 or step == config.total_steps:
        metrics.console_line(step, config.total_steps, out)
      last = out
      if ckpt.due(step) or step == config.total_steps or stop['requested']:
        ckpt.save(step, state, prompt_iter.get_state())
      if stop['requested']:
        raise offline.StopRequested
  except offline.StopRequested:
    logging.warning('SIGTERM: saved step %d to %s and stopped.', step, ckpt.directory)
  finally:
    signal.signal(signal.SIGTERM, previous)
    ckpt.close()
    writer.close()

  results['after'] = {k: v for k, v in last.items() if k.startswith('eval/')}
  if 'before' in results and results['after']:
    print('held-out ' + ', '.join(
        f'{k[5:]} {results["before"][k]:.3f} -> {results["after"][k]:.3f}'
        for k in results['after'] if k in results['before'] and k != 'eval/prompts'),
        file=sys.stderr)
  if step >= config.total_steps and config.export_hf and jax.process_index() == 0:
    export = hf.save(nnx.merge(graphdef, state['policy']['params']), workdir / 'hf',
                     tokenizer=tokenizer)
    print(f'exported HF checkpoint to {export}', file=sys.stderr)
  return {'step': step, 'last': last, **results}


@register('grpo')
def run_grpo(config, workdir):
  return run(config, workdir, 'grpo')


@register('ppo')
def run_ppo(config, workdir):
  return run(config, workdir, 'ppo')
