"""The online loop shared by GRPO and PPO, on one process or many.

Each step, in order: this process's prompts -> rollout over the whole mesh
-> rewards of this process's completions -> one jitted "rollout to train
batch" function (rl_parts.make_prepare: old/reference log-probs, values,
advantages, the loss mask) -> `epochs` passes of clipped updates over
`minibatches` slices gathered on device. The policy, its frozen reference
(the starting weights) and the PPO critic share one mesh; rollouts sample
from the train state's own parameters, so nothing is copied out of it.
Checkpoints, SIGTERM, the NaN stop and metrics are the loop library's
(loop.py), as for every recipe.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost import advantages as adv
from jpost import memory, ops, optim, rewards, sampling
from jpost.data import pipeline
from jpost.errors import ConfigError
from jpost.losses.policy import AGGREGATIONS
from jpost.models import hf, lora, pretrained
from jpost.models import reward as scalar_models
from jpost.rewards.runner import FAILURE_KINDS, ScoreResult
from jpost.tokenizer import Tokenizer
from jpost.trainers import loop, register, rl_parts, rollout

KL_PLACEMENT = ('loss', 'reward')
OLD_LOGPROBS = ('sampler', 'recompute')
FILTERS_OFF = {'top_k': 0, 'top_p': 1.0, 'min_p': 0.0}  # sampling filters and their off values


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
  if algorithm == 'grpo' and rl.scale not in adv.SCALES:
    raise ConfigError(f'config.rl.scale={rl.scale!r}; use one of {adv.SCALES}.')
  if not (0 <= rl.clip_low < 1 and rl.clip_high >= 0):
    raise ConfigError(f'config.rl.clip_low={rl.clip_low}, clip_high={rl.clip_high}: the ratio '
                      'is clipped to [1 - clip_low, 1 + clip_high], so 0 <= clip_low < 1 and '
                      'clip_high >= 0.')
  if rl.aggregation not in AGGREGATIONS:
    raise ConfigError(f'config.rl.aggregation={rl.aggregation!r}; use one of {AGGREGATIONS}.')
  if rl.kl_in not in KL_PLACEMENT:
    raise ConfigError(f'config.rl.kl_in={rl.kl_in!r}; use one of {KL_PLACEMENT}.')
  if rl.kl_estimator not in ops.KL_ESTIMATORS:
    raise ConfigError(f'config.rl.kl_estimator={rl.kl_estimator!r}; use one of '
                     f'{ops.KL_ESTIMATORS}.')
  if rl.kl_in == 'reward' and rl.beta > 0 and rl.kl_estimator != 'k1':
    # The reward takes log pi - log ref per token (the policy gradient then
    # carries KL's gradient); an estimator named here would go unused.
    raise ConfigError(
        f"config.rl.kl_in='reward' puts k1 (log pi - log ref) in the reward, so "
        f'config.rl.kl_estimator={rl.kl_estimator!r} would be ignored: set '
        "--config.rl.kl_estimator=k1, or --config.rl.kl_in=loss for a KL term in the loss.")
  if rl.old_logprobs not in OLD_LOGPROBS:
    raise ConfigError(f'config.rl.old_logprobs={rl.old_logprobs!r}; use one of {OLD_LOGPROBS}.')
  # The trainer's log-probs are the unfiltered ones at the rollout temperature;
  # the sampler's, of a filtered distribution, are higher on every kept token.
  filters = [f'{name}={config.sampling.get(name, off)}' for name, off in FILTERS_OFF.items()
             if config.sampling.get(name, off) != off]
  if filters and rl.old_logprobs == 'sampler':
    raise ConfigError(
        f"config.sampling.{' and '.join(filters)} samples a filtered distribution, but the "
        'trainer computes log-probs without the filter: with '
        "config.rl.old_logprobs='sampler' every ratio would start below 1 by the kept "
        'mass, a biased update. Set --config.rl.old_logprobs=recompute (ratios start at 1; '
        'the gap to the sampler is logged as logprob_mismatch/sampler_vs_trainer) or '
        'sample without top_k / top_p / min_p.')
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
  if algorithm == 'ppo':
    optim.validate(config.ppo.critic_optim, config.total_steps, 'config.ppo.critic_optim')


# --- evaluation ---------------------------------------------------------------------


def evaluate(model, tokenizer, dataset, reward_fns, settings, key) -> dict[str, Any]:
  """Greedy answers to every held-out prompt, scored by the rewards. Every
  process runs the whole held-out set (its prompts replicated over the mesh)."""
  totals, per_source, lengths, truncated, samples = [], {}, [], [], []
  failures = 0
  prepared = sampling.prepare(model, settings)  # once for every batch
  for batch in dataset:
    out = loop.fetch(sampling.generate(model, batch['tokens'], batch['segment_ids'] > 0,
                                       settings, key, prepared=prepared))
    texts = rollout.completion_texts(tokenizer, out.tokens, out.lengths)
    result = rewards.score(reward_fns, [rollout.prompt_text(p) for p in batch['prompt']],
                           texts, list(batch['extra']))
    totals.append(result.total)
    failures += result.failed()
    for name, values in result.per_source.items():
      per_source.setdefault(name, []).append(values)
    lengths.append(out.lengths)
    truncated.append(out.truncated)
    samples += [{'prompt': rollout.prompt_text(p), 'completion': t, 'reward': float(r)}
                for p, t, r in zip(batch['prompt'], texts, result.total)]
  # A failed reward counts 0 in the total (as in training) and is left out of
  # its source's mean; how many failed is reported beside them.
  report = {'eval/reward': float(np.mean(np.concatenate(totals))),
            'eval/reward_failures': failures,
            'eval/length': float(np.mean(np.concatenate(lengths))),
            'eval/truncated': float(np.mean(np.concatenate(truncated))),
            'eval/prompts': len(samples)}
  for name, values in per_source.items():
    valid = np.concatenate(values)
    valid = valid[np.isfinite(valid)]
    report[f'eval/{name}'] = float(valid.mean()) if valid.size else math.nan
  return report | {'samples': samples}


# --- one step --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parts:
  """What every online step uses, built once by `run`."""

  config: Any
  algorithm: str
  mesh: Any
  tokenizer: Tokenizer
  reward_fns: list
  settings: sampling.SamplingConfig
  graphdef: Any
  ref_params: Any  # the starting weights, or None without a KL term or with LoRA
  ref_size: int  # parameters held for the reference alone (0 with LoRA: adapters off)
  prepare: Callable  # rl_parts.make_prepare
  policy_update: Callable
  critic_update: Callable | None
  select: Callable  # (train batch, row indices) -> minibatch, on device
  by_rows: Callable  # arrays -> the same, leading axis over the batch axes
  prompts: Any  # this process's prompt iterator
  prompt_stats: Any
  base_key: jax.Array  # raw uint32[2] key data, replicated on the mesh
  failures_total: dict = dataclasses.field(default_factory=dict)  # reward failures so far
  # Shapes compiled so far (rl_parts.reuse_compiled): the rollout's prompt
  # widths, and the update's (prompt width, completion width, packed rows
  # per group) triples.
  compiled: dict = dataclasses.field(default_factory=lambda: {'prompt': set(), 'update': set()})


class _PromptsAndShapes:
  """What a checkpoint keeps of the run besides its state: the prompt
  iterator's position and the shapes compiled so far, so that a resumed run
  picks the widths and packed rows the uninterrupted one would
  (rl_parts.reuse_compiled), and continues exactly."""

  def __init__(self, parts: Parts):
    self.parts = parts

  def get_state(self) -> dict:
    compiled = self.parts.compiled
    return {'prompts': self.parts.prompts.get_state(),
            'compiled': {'prompt': sorted(compiled['prompt']),
                         'update': sorted(map(list, compiled['update']))}}

  def set_state(self, saved: dict) -> None:
    if 'compiled' not in saved:  # a checkpoint of before the shapes were kept
      self.parts.prompts.set_state(saved)
      return
    self.parts.prompts.set_state(saved['prompts'])
    self.parts.compiled['prompt'].update(saved['compiled']['prompt'])
    self.parts.compiled['update'].update(map(tuple, saved['compiled']['update']))


def step(parts: Parts, state: dict, number: int) -> tuple[dict, dict]:
  """One online step: rollout -> rewards -> train batch -> updates -> metrics."""
  config, tic = parts.config, time.perf_counter()
  prompts, completions = _rollout(parts, state, number)
  texts = rollout.completion_texts(parts.tokenizer, loop.local_rows(completions.tokens),
                                   loop.local_rows(completions.lengths))
  rollout_s, tic = time.perf_counter() - tic, time.perf_counter()
  samples = config.sampling.num_samples
  scored = _all_processes(rewards.score(
      parts.reward_fns, [rollout.prompt_text(p) for p in prompts['prompt'] for _ in range(samples)],
      texts, [e for e in prompts['extra'] for _ in range(samples)]))
  reward_s, tic = time.perf_counter() - tic, time.perf_counter()
  own = loop.own_rows(len(scored.total))
  scores = {'scores': scored.total[own]}
  if parts.algorithm == 'ppo':
    scores = _step_rewards(parts, scored, own, completions, scores['scores'])
  scores = loop.place_batch(scores, parts.mesh)
  lengths = loop.fetch(completions.lengths)  # every process's
  plan = _pack_plan(parts, lengths, prompts['placed']['tokens'].shape[1],
                    completions.tokens.shape[1])
  batch, out = parts.prepare(state['policy']['params'], parts.ref_params,
                             state['critic']['params'] if 'critic' in state else None,
                             prompts['placed'], completions, scores['scores'],
                             scores.get('step_rewards'), plan)
  out = jax.device_get(out)
  prep_s, tic = time.perf_counter() - tic, time.perf_counter()
  state, updates = _updates(parts, state, batch, number)
  update_s = time.perf_counter() - tic
  first = updates[0]
  out |= {k: float(np.mean([u[k] for u in updates])) for k in first}
  if config.rl.old_logprobs == 'sampler':  # the first update sees exactly the sampler's tokens
    out['logprob_mismatch/sampler_vs_trainer'] = float(first['logprob_mismatch'])
  out |= scored.metrics()
  for name, counts in scored.failures.items():
    parts.failures_total[name] = parts.failures_total.get(name, 0) + sum(counts.values())
    out[f'failures_total/{name}'] = parts.failures_total[name]
  out |= {'completion/length': float(np.mean(lengths)),
          'completion/truncated': float(np.mean(loop.fetch(completions.truncated))),
          # Widths the rollout and update were compiled for (a new one recompiles).
          'shape/prompt_width': prompts['placed']['tokens'].shape[1],
          'shape/completion_width': completions.tokens.shape[1],
          'shape/update_rows': len(lengths) if plan is None else plan['pack_source'].shape[0],
          'time/rollout_s': rollout_s, 'time/reward_s': reward_s, 'time/prep_s': prep_s,
          'time/update_s': update_s,
          'memory/reference_params': parts.ref_size,
          'time/step_s': rollout_s + reward_s + prep_s + update_s}
  return state, out | {f'data/{k}': v for k, v in parts.prompt_stats.as_dict()['encoded'].items()}


def _pack_plan(parts: Parts, lengths: np.ndarray, prompt_width: int,
               width: int) -> dict | None:
  """The step's rl_parts.pack_plan placed on the mesh (each process places
  its rows' share), or None: rl.pack_completions off, minibatches (which
  draw rows apart), or nothing to save. Notes the update's shape as compiled."""
  config, samples = parts.config, parts.config.sampling.num_samples
  plan = None
  if config.rl.get('pack_completions', True) and config.rl.minibatches == 1:
    seen = tuple(k for p, n, k in parts.compiled['update'] if (p, n) == (prompt_width, width))
    plan = rl_parts.pack_plan(lengths, samples, width,
                              row_multiple=loop.batch_devices(parts.mesh), compiled=seen)
  per_group = samples if plan is None else len(plan['pack_source']) * samples // len(lengths)
  parts.compiled['update'].add((prompt_width, width, per_group))
  if plan is None:
    return None
  return loop.place_batch({k: v[loop.own_rows(len(v))] for k, v in plan.items()}, parts.mesh)


def _step_rewards(parts: Parts, scored: ScoreResult, own, completions, total) -> dict:
  """PPO with step-scoring sources (a PRM): their rewards move from the last
  token to each step's last token (`step_rewards` [R, N]); the rest of the
  score stays at the end. Where such a source failed it adds nothing."""
  width = completions.tokens.shape[1]
  tokens, lengths = loop.local_rows(completions.tokens), loop.local_rows(completions.lengths)
  dense = np.zeros((len(total), width), np.float32)
  for source in parts.reward_fns:
    if source.name not in scored.steps:
      continue
    values = scored.per_source[source.name][own]
    total = total - source.weight * np.where(np.isfinite(values), values, 0.0)
    dense += source.weight * rl_parts.step_reward_tokens(
        parts.tokenizer, tokens, lengths, scored.steps[source.name], width)
  return {'scores': total.astype(np.float32), 'step_rewards': dense}


def _rollout(parts: Parts, state: dict, number: int):
  """(this process's prompt batch with `placed` global arrays, completions
  sharded over the batch axes like the rows they continue)."""
  config = parts.config
  batch = next(parts.prompts)
  longest = int(loop.gather_rows(np.sum(batch['segment_ids'] > 0, axis=1)).max())
  batch = rl_parts.trim_prompts(batch, config.data.get('prompt_bucket', 0), longest,
                                compiled=tuple(parts.compiled['prompt']))
  prompt_width = batch['tokens'].shape[1]
  parts.compiled['prompt'].add(prompt_width)
  placed = loop.place_batch({'tokens': batch['tokens'], 'segment_ids': batch['segment_ids'],
                             'mask': batch['segment_ids'] > 0}, parts.mesh,
                            replicate_uneven=('tokens', 'segment_ids', 'mask'))
  key = jax.random.fold_in(parts.base_key, loop.replicate(np.uint32(number), parts.mesh))
  policy = nnx.merge(parts.graphdef, state['policy']['params'])
  completions = sampling.generate(policy, placed['tokens'], placed['mask'],
                                  parts.settings, key)
  completions = parts.by_rows(completions)
  longest = int(loop.fetch(completions.lengths).max())  # over every process's rows
  completions = rl_parts.trim_completions(
      completions, config.data.get('completion_bucket', 0), longest,
      compiled=tuple(n for p, n, _ in parts.compiled['update'] if p == prompt_width))
  return batch | {'placed': placed}, completions


def _print_memory_plan(config, model_config, ref_params, mesh, state,
                       critic_config=None) -> None:
  """What the rollout and the update add to the train state, before anything
  runs: the KV cache at its largest (prompts cut to their longest only shrink
  it) and the reference's copy of the weights (global sizes, over every
  device), then the policy update's activations per device, predicted for a
  minibatch at the longest prompts and completions (jpost.memory), and
  PPO's critic update's (the same layout through its trunk, a scalar head
  instead of the LM head)."""
  rows = config.prompts_per_step * config.sampling.num_samples
  prompt_len, new_tokens = config.data.max_prompt_len, config.sampling.max_new_tokens
  cache_mb = sampling.rollout_cache_bytes(model_config, config.prompts_per_step, prompt_len,
                                          config.sampling.num_samples, new_tokens) / 2**20
  if jax.process_index() == 0:
    print(f'rollout KV cache up to {cache_mb:.1f} MB ({config.prompts_per_step} prompts x '
          f'{prompt_len} slots, shared by {rows} rows x {new_tokens} slots); '
          f'reference copy {loop.tree_mb(ref_params):.1f} MB', file=sys.stderr)
  # One minibatch keeps each prompt once for its samples; smaller ones give
  # every row its own copy (_updates).
  prompts, samples = ((config.prompts_per_step, config.sampling.num_samples)
                      if config.rl.minibatches == 1 else (rows / config.rl.minibatches, 1))
  update = lambda cfg: memory.rl_update_activations(
      cfg, prompts / loop.batch_devices(mesh), samples, config.data.max_prompt_len,
      config.sampling.max_new_tokens)
  trainable = lambda part: lora.trainable(state[part]['params'])[0]
  loop.print_activations(update(model_config), 'policy update', trainable('policy'))
  if critic_config is not None:
    loop.print_activations(update(critic_config) | {'lm_head': 0}, 'critic update',
                           trainable('critic'))


def _all_processes(result: ScoreResult) -> ScoreResult:
  """Every process's scores, in row order; failures summed (stats, steps
  and errors stay this process's)."""
  if jax.process_count() == 1:
    return result
  counts = lambda name: loop.gather_rows(np.array(
      [[result.failures[name].get(k, 0) for k in FAILURE_KINDS]])).sum(axis=0)
  return dataclasses.replace(
      result, total=loop.gather_rows(result.total),
      per_source={k: loop.gather_rows(v) for k, v in result.per_source.items()},
      failures={name: dict(zip(FAILURE_KINDS, map(int, counts(name))))
                for name in sorted(result.failures)},
      seconds=float(loop.gather_rows(np.array([result.seconds])).max()))


def _updates(parts: Parts, state: dict, batch: dict, number: int) -> tuple[dict, list]:
  """`epochs` passes over `minibatches` slices of the train batch (one
  minibatch keeps the G shared prompts; smaller ones give each row its own)."""
  rl, rows = parts.config.rl, batch['completion_mask'].shape[0]
  order_rng = np.random.default_rng([parts.config.seed, number])
  size, updates = rows // rl.minibatches, []
  for _ in range(rl.epochs):
    order = order_rng.permutation(rows)
    for m in range(rl.minibatches):
      mini = batch if rl.minibatches == 1 else parts.select(
          batch, loop.replicate(order[m * size:(m + 1) * size].astype(np.int32), parts.mesh))
      policy, out = parts.policy_update(state['policy'], mini)
      state = state | {'policy': policy}
      if parts.critic_update is not None:
        critic, critic_out = parts.critic_update(state['critic'], mini)
        state, out = state | {'critic': critic}, out | {
            f'critic/{k}': v for k, v in critic_out.items()}
      updates.append(jax.device_get(out))
  return state, updates


# --- the run ---------------------------------------------------------------------------


def _prompt_data(config, tokenizer, sources, *, epochs, batch_size, seed, shard=(0, 1)):
  return pipeline.build('prompt', pipeline.resolve_sources(list(sources)), tokenizer,
                        batch_size=batch_size, max_len=config.data.max_prompt_len,
                        num_epochs=epochs, seed=seed, policy=config.data.policy,
                        drop_remainder=epochs is None, shard_index=shard[0],
                        shard_count=shard[1])


def _critic(config, model_dir, mesh):
  """The PPO critic: a scalar head on a trunk from ppo.critic_path (e.g. a
  trained reward model, whose head it keeps) or, by default, the policy's own
  checkpoint with a fresh head drawn with std `ppo.critic_init_std` (None:
  the reward models' 1/sqrt(D + 1))."""
  path = pretrained.resolve(config.ppo.critic_path) if config.ppo.critic_path else model_dir
  adapters = lora.load_options(config) if config.ppo.get('critic_lora', True) else {}
  return scalar_models.load(path, mesh=mesh, **hf.compute_options(config),
                            init_std=config.ppo.get('critic_init_std', None),
                            **({'seed': config.seed} | adapters))


def _update_fns(config, algorithm, model_dir, mesh, model, kl_coef):
  """(graphdef, state, policy update, critic update or None, critic graphdef)."""
  rl, sampling_cfg = config.rl, config.sampling
  updates = rl.epochs * rl.minibatches  # optimiser updates per rollout step (_updates)
  tx, schedule = optim.build(config.optim, config.total_steps, updates_per_step=updates)
  graphdef, policy = loop.init_state(model, tx, config.seed, mesh)
  policy_update = loop.make_update(
      graphdef, functools.partial(
          rl_parts.policy_loss_fn, rl=rl, temperature=sampling_cfg.temperature,
          max_new_tokens=sampling_cfg.max_new_tokens, kl_coef=kl_coef),
      functools.partial(rl_parts.policy_normalizer_fn, aggregation=rl.aggregation,
                        max_new_tokens=sampling_cfg.max_new_tokens),
      tx, schedule, accum_steps=1, mesh=mesh, state=policy)
  if algorithm != 'ppo':
    return graphdef, {'policy': policy}, policy_update, None, None
  critic_tx, critic_schedule = optim.build(config.ppo.critic_optim, config.total_steps,
                                           updates_per_step=updates,
                                           where='config.ppo.critic_optim')
  critic_graphdef, critic = loop.init_state(_critic(config, model_dir, mesh), critic_tx,
                                            config.seed, mesh)
  critic_update = loop.make_update(
      critic_graphdef, functools.partial(rl_parts.critic_loss_fn, clip_range=config.ppo.value_clip),
      rl_parts.critic_normalizer_fn, critic_tx, critic_schedule, accum_steps=1, mesh=mesh,
      state=critic)
  return graphdef, {'policy': policy, 'critic': critic}, policy_update, critic_update, \
      critic_graphdef


def run(config, workdir: str | None, algorithm: str) -> dict[str, Any]:
  """Trains for config.total_steps online steps, resuming from workdir."""
  # --- setup ----------------------------------------------------------------------
  validate(config, algorithm)
  if workdir is None:
    raise ConfigError('--workdir is required for training (checkpoints and metrics go there).')
  workdir, rl = pathlib.Path(workdir), config.rl
  loop.start_processes(config)
  rows_per_step = config.prompts_per_step * config.sampling.num_samples
  mesh = loop.make_mesh(config, rows_per_step // rl.minibatches,
                        f'a minibatch (prompts_per_step x num_samples / rl.minibatches = '
                        f'{rows_per_step} / {rl.minibatches})',
                        'prompts_per_step, sampling.num_samples, rl.minibatches')
  if config.prompts_per_step % jax.process_count():
    raise ConfigError(f'config.prompts_per_step={config.prompts_per_step} does not split over '
                      f'{jax.process_count()} processes.')
  reward_fns = rewards.build(config.rewards)

  # --- models and steps ----------------------------------------------------------------
  model_dir = pretrained.resolve(config.model.path)
  tokenizer = Tokenizer.from_dir(model_dir)
  model = hf.load(model_dir, mesh=mesh, **hf.compute_options(config), **lora.load_options(config))
  kl_coef = rl.beta if rl.beta > 0 and rl.kl_in == 'loss' and algorithm == 'grpo' else 0.0
  graphdef, state, policy_update, critic_update, critic_graphdef = _update_fns(
      config, algorithm, model_dir, mesh, model, kl_coef)
  loop.print_sizes(loop.state_sizes(state['policy']))
  if 'critic' in state:
    loop.print_sizes(loop.state_sizes(state['critic']), label='critic: ')
  # The reference is the starting weights, copied before the first update
  # donates (and overwrites) the train state's buffers; with LoRA it is the
  # policy with its adapters off (make_prepare), and nothing is copied.
  adapters = model.config.lora is not None
  ref_params = (jax.tree.map(jnp.copy, state['policy']['params'])
                if rl.beta > 0 and not adapters else None)
  settings = rollout.sampling_config(config.sampling, tokenizer)
  _print_memory_plan(config, model.config, ref_params, mesh, state, critic_config=nnx.merge(
      critic_graphdef, state['critic']['params']).config if 'critic' in state else None)
  prompts, prompt_stats = _prompt_data(
      config, tokenizer, config.data.train, epochs=None, batch_size=config.prompts_per_step,
      seed=config.seed, shard=(jax.process_index(), jax.process_count()))
  parts = Parts(
      config=config, algorithm=algorithm, mesh=mesh, tokenizer=tokenizer,
      reward_fns=reward_fns, settings=settings, graphdef=graphdef, ref_params=ref_params,
      ref_size=sum(x.size for x in jax.tree.leaves(ref_params)),
      prepare=rl_parts.make_prepare(
          graphdef, critic_graphdef, algorithm=algorithm, rl=rl,
          num_samples=config.sampling.num_samples, temperature=config.sampling.temperature,
          kl_coef=kl_coef, mesh=mesh, reference='adapters_off' if rl.beta > 0 and adapters
          else 'params'),
      policy_update=policy_update, critic_update=critic_update,
      select=jax.jit(functools.partial(rl_parts.select_rows,
                                       num_samples=config.sampling.num_samples)),
      by_rows=jax.jit(lambda tree: tree, out_shardings=loop.batch_sharding(mesh, 1)),
      prompts=iter(prompts), prompt_stats=prompt_stats,
      base_key=loop.replicate(jax.random.key_data(jax.random.key(config.seed)), mesh))

  # --- loop -------------------------------------------------------------------------------
  greedy = dataclasses.replace(settings, num_samples=1, temperature=0.0)
  done = loop.train(config, workdir, state=state, data_iter=_PromptsAndShapes(parts),
                    step_fn=functools.partial(step, parts),
                    evaluate=functools.partial(_held_out, parts, workdir, greedy)
                    if config.data.eval else None)
  after = {k: v for k, v in done.last.items() if k.startswith('eval/')}
  if done.before and after and jax.process_index() == 0:
    print('held-out ' + ', '.join(
        f'{k[5:]} {done.before[k]:.3f} -> {after[k]:.3f}'
        for k in after if k in done.before and k != 'eval/prompts'), file=sys.stderr)
  if done.step >= config.total_steps:
    loop.export(config, workdir, graphdef, done.state['policy']['params'], tokenizer, hf.save)
  return {'step': done.step, 'last': done.last, 'after': after,
          **({'before': done.before} if done.before else {})}


def _held_out(parts: Parts, workdir: pathlib.Path, greedy, state: dict, number: int) -> dict:
  """Greedy held-out rewards; the samples go to eval_samples_<step>.jsonl."""
  config = parts.config
  data, eval_stats = _prompt_data(config, parts.tokenizer, config.data.eval, epochs=1,
                                  batch_size=config.eval_batch_size, seed=0)
  data = list(data)
  if not data:
    raise ConfigError(f'no held-out prompts left in {list(config.data.eval)}: '
                      f'{eval_stats.as_dict()}. Raise config.data.max_prompt_len if they '
                      'were dropped as too long.')
  report = evaluate(nnx.merge(parts.graphdef, state['policy']['params']), parts.tokenizer, data,
                    parts.reward_fns, greedy, jax.random.key(0))
  samples = report.pop('samples')
  if jax.process_index() == 0:
    (workdir / f'eval_samples_{number}.jsonl').write_text(
        ''.join(json.dumps(s) + '\n' for s in samples))
  return report


@register('grpo')
def run_grpo(config, workdir):
  return run(config, workdir, 'grpo')


@register('ppo')
def run_ppo(config, workdir):
  return run(config, workdir, 'ppo')
