"""GRPO / PPO building blocks: rollout -> training rows, log-probs and values
of the completion positions, the loss wiring, and advantages.

Layout: `tokens`, `positions`, `segment_ids` are [R, T] with T = P + N (the
left-padded prompt of width P, then N = max_new_tokens completion slots).
Everything per token (`completion_mask`, log-probs, values, advantages) is
[R, N], index j being completion token j: it is predicted from position
P - 1 + j, so only those N positions go through the LM head (the prompt's
logits are never computed). `completion_mask` is 1 up to and including the
stop token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost import advantages as adv
from jpost import ops, sharding
from jpost.losses.policy import policy_loss, value_loss
from jpost.models import lora


# --- rollout -> training rows ---------------------------------------------------


def reuse_compiled(size: int, compiled, slack: int) -> int:
  """`size`, or the smallest of the sizes already `compiled` that is at
  least `size` and at most `size + slack`. A step whose prompts, completions
  or packed rows take a shape not seen before compiles its programs again
  (on the 2-core CPU: ~6 s for the rollout, ~4 s for the update, against a
  warm step of ~12 s); one bucket wider, it runs the program it has, over
  slots that are masked."""
  fits = [c for c in compiled if size <= c <= size + slack]
  return min(fits) if fits else size


def trim_prompts(batch: dict, bucket: int, longest: int | None = None,
                 compiled: tuple[int, ...] = ()) -> dict:
  """Drops left-padding columns no prompt uses (`longest`: the longest prompt
  of every process's batch; by default this batch's), keeping the width a
  multiple of `bucket` (0: no trimming) so only a few shapes compile, or a
  width `compiled` already, up to one bucket wider (`reuse_compiled`)."""
  if longest is None:
    longest = int(np.max(np.sum(batch['segment_ids'] > 0, axis=1)))
  width = batch['tokens'].shape[1]
  if bucket <= 0 or longest >= width:
    return batch
  keep = min(width, reuse_compiled(-(-longest // bucket) * bucket, compiled, bucket))
  return batch | {k: batch[k][:, width - keep:] for k in ('tokens', 'positions', 'segment_ids')}


def trim_completions(completions, bucket: int, longest: int | None = None,
                     compiled: tuple[int, ...] = ()):
  """Drops completion slots after the longest completion of the rollout
  (`longest`; by default from these rows), keeping the width a multiple of
  `bucket` (0: no trimming), so the update does not run over slots every
  row left empty; or a width `compiled` already, up to one bucket wider.
  Device arrays are sliced where they are."""
  if longest is None:
    longest = int(np.max(completions.lengths))
  width = completions.tokens.shape[1]
  keep = width if bucket <= 0 else min(
      width, reuse_compiled(max(bucket, -(-longest // bucket) * bucket), compiled, bucket))
  if keep == width:
    return completions
  return dataclasses.replace(
      completions, **{k: getattr(completions, k)[:, :keep]
                      for k in ('tokens', 'mask', 'logprobs', 'sampling_logprobs')})


def training_rows(prompts: dict, completions, num_samples: int) -> dict[str, jax.Array]:
  """The rollout as training rows, in two layouts (pure; runs under jit).

  Shared-prompt (what the policy trains on): the G left-padded prompts
  `prompt_tokens` / `prompt_positions` / `prompt_segment_ids` [G, P] once,
  and `completion_tokens` / `completion_positions` [R, N], row r continuing
  prompt r // num_samples. Full rows (each with its own copy of its prompt;
  what the shared layout is checked against): `tokens`, `positions`,
  `segment_ids` [R, P + N]. Both with `completion_mask` and the sampler's
  log-probs [R, N] (0 outside the mask).
  """
  prompt_tokens = jnp.asarray(prompts['tokens'], jnp.int32)
  prompt_real = jnp.asarray(prompts['segment_ids']) > 0
  comp_mask = jnp.asarray(completions.mask) > 0
  comp_tokens = jnp.asarray(completions.tokens, jnp.int32)
  positions = lambda real: jnp.where(real, jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)
  prompt_lengths = jnp.repeat(prompt_real.sum(axis=1), num_samples)
  full_real = jnp.concatenate([jnp.repeat(prompt_real, num_samples, axis=0), comp_mask], axis=1)
  return {'prompt_tokens': prompt_tokens, 'prompt_positions': positions(prompt_real),
          'prompt_segment_ids': prompt_real.astype(jnp.int32),
          'completion_tokens': comp_tokens,
          'completion_positions': (prompt_lengths[:, None] + jnp.arange(
              comp_tokens.shape[1])[None]).astype(jnp.int32),
          'tokens': jnp.concatenate([jnp.repeat(prompt_tokens, num_samples, axis=0),
                                     comp_tokens], axis=1),
          'positions': positions(full_real), 'segment_ids': full_real.astype(jnp.int32),
          'completion_mask': comp_mask.astype(jnp.float32),
          'sampler_logprobs': jnp.where(comp_mask, completions.sampling_logprobs,
                                        0.0).astype(jnp.float32)}


def pack_plan(lengths, num_samples: int, width: int, row_multiple: int = 1,
              compiled: tuple[int, ...] = ()) -> dict | None:
  """Where each completion goes when a group's completions share rows (pure,
  host-side): each group's n completions of `lengths` tokens are packed
  first-fit, longest first, into k rows of `width` slots, k the most any
  group needs (rounded up so G * k divides over `row_multiple` devices), or
  a k `compiled` already, up to one such step more (`reuse_compiled`; n:
  unpacked). The update and the reference forward then run G * k rows
  instead of G * n, without the slots after each completion's end. None
  when that saves no row.

  Returns int32 arrays: `pack_source` [G * k, width], the flat index r * N + j
  of the completion token (row r, slot j of the [R, N] layout, N = width) in
  each packed slot, -1 where empty; `pack_segment` [G * k, width], 1, 2, ...
  for the completions of a packed row, 0 where empty; `pack_target` [R, N],
  the flat index of completion token (r, j) in the packed layout, -1 after
  the completion's end.
  """
  lengths = np.asarray(lengths, np.int64).reshape(-1, num_samples)
  groups = []  # per group, per packed row: its samples in order
  for group in lengths:
    rows, free = [], []
    for sample in np.argsort(-group, kind='stable'):
      if group[sample] <= 0:
        continue
      row = next((i for i, space in enumerate(free) if space >= group[sample]), len(rows))
      if row == len(rows):
        rows.append([])
        free.append(width)
      rows[row].append(int(sample))
      free[row] -= group[sample]
    groups.append(rows)
  num_groups = len(groups)
  step = row_multiple // np.gcd(num_groups, row_multiple)
  per_group = max(1, max(len(rows) for rows in groups))
  per_group = reuse_compiled(-(-per_group // step) * step, compiled, step)
  if per_group >= num_samples:
    return None
  source = np.full((num_groups * per_group, width), -1, np.int32)
  segment = np.zeros((num_groups * per_group, width), np.int32)
  target = np.full((num_groups * num_samples, width), -1, np.int32)
  for g, rows in enumerate(groups):
    for i, samples in enumerate(rows):
      packed, start = g * per_group + i, 0
      for s, sample in enumerate(samples):
        r, n = g * num_samples + sample, int(lengths[g, sample])
        source[packed, start:start + n] = r * width + np.arange(n)
        segment[packed, start:start + n] = s + 1
        target[r, :n] = packed * width + start + np.arange(n)
        start += n
  return {'pack_source': source, 'pack_segment': segment, 'pack_target': target}


POLICY_KEYS = ('prompt_tokens', 'prompt_positions', 'prompt_segment_ids', 'completion_tokens',
               'completion_positions', 'completion_mask')
PROMPT_KEYS = ('prompt_tokens', 'prompt_positions', 'prompt_segment_ids')
PACK_KEYS = ('pack_source', 'pack_segment', 'pack_target')


def select_rows(rows: dict, picked: np.ndarray, num_samples: int) -> dict:
  """The rows `picked` (indices into R) of a training batch; each picked row
  gets its own copy of its prompt (a minibatch mixes groups)."""
  return {k: v[picked // num_samples] if k in PROMPT_KEYS else v[picked] for k, v in rows.items()}


def completion_hidden(model, batch):
  """(hidden states [R', N, D], the tokens they predict [R', N]): token j is
  predicted from the hidden state before it, the prompt's last for j = 0.
  R' = R rows as given, or the packed rows of `pack_plan` when the batch
  has its PACK_KEYS (each packed completion restarting from the prompt)."""
  tokens, positions = batch['completion_tokens'], batch['completion_positions']
  segments = batch['completion_mask']
  if 'pack_source' in batch:
    source = batch['pack_source']
    take = lambda a: jnp.take(a.reshape(-1), jnp.maximum(source, 0))
    tokens, positions, segments = take(tokens), take(positions), batch['pack_segment']
  prompt_hidden, comp_hidden = model.shared_prompt_hidden_states(
      batch['prompt_tokens'], batch['prompt_positions'], batch['prompt_segment_ids'],
      tokens, positions, segments)
  rows_per_prompt = comp_hidden.shape[0] // prompt_hidden.shape[0]
  # Prompts are left-padded, so column -1 is each prompt's last real token.
  last_prompt = jnp.repeat(prompt_hidden[:, -1:], rows_per_prompt, axis=0)
  hidden = jnp.concatenate([last_prompt, comp_hidden[:, :-1]], axis=1)
  if 'pack_source' in batch:  # a completion's first token follows the prompt
    starts = batch['pack_source'] % batch['completion_tokens'].shape[1] == 0
    hidden = jnp.where(starts[..., None], last_prompt, hidden)
  return hidden, tokens


def completion_logprobs(model, batch, temperature: float, entropy: str = 'none'):
  """log p(completion token j) [R, N] at the rollout temperature (the
  distribution the sampler drew from); with `entropy` ('metric' or 'loss'),
  also each position's entropy [R, N] (ops.head_logprobs). Packed rows are
  unpacked: 0 after each completion's end.

  The LM head runs on the completion tokens alone (`target_logprobs` with a
  mask): a group's packed rows leave a third to two thirds of their slots
  empty (ops.head_masked_logprobs)."""
  hidden, targets = completion_hidden(model, batch)
  mask = batch['pack_segment'] > 0 if 'pack_source' in batch else batch['completion_mask'] > 0
  out = model.target_logprobs(hidden, targets, temperature=temperature, entropy=entropy,
                              mask=mask)
  return jax.tree.map(lambda a: _unpacked(a, batch), out)


def _unpacked(a, batch):
  """a [R', N] of the rows as `completion_hidden` laid them out, back in the
  [R, N] layout: as it is, or from packed rows (0 after each completion's end)."""
  if 'pack_target' not in batch:
    return a
  target = batch['pack_target']
  return jnp.where(target >= 0, jnp.take(a.reshape(-1), jnp.maximum(target, 0)), 0.0)


def make_logprobs_fn(graphdef, temperature: float):
  """Jitted (params, rows) -> log-probs [R, N] of the completion tokens."""
  @jax.jit
  def logprobs(params, batch):
    model = nnx.merge(graphdef, params)
    return completion_logprobs(model, batch, temperature)
  return logprobs


def completion_values(critic, batch):
  """The critic's value [R, N] of the state before each completion token,
  from the policy's layout (`completion_hidden`): each prompt through the
  trunk once for its samples, the completions packed where the batch has a
  plan (0 after each completion's end), not every row's own copy of its
  prompt and padding (at 52-token prompts x 4 samples, a third of the
  tokens)."""
  hidden, _ = completion_hidden(critic.decoder, batch)
  return _unpacked(jnp.einsum('btd,d->bt', hidden.astype(jnp.float32),
                              critic.score[...].astype(jnp.float32)), batch)


# --- losses ----------------------------------------------------------------------


def policy_loss_fn(model, batch, normalizer, *, rl, temperature, max_new_tokens, kl_coef):
  # Without an entropy bonus the entropy is only a metric: its gradient
  # (times 0) would cost a backward pass over [R, N, vocab] (0.4-0.6 s of a
  # 15 s SmolLM2 update on the 2-core CPU).
  logprobs, entropy = completion_logprobs(model, batch, temperature,
                                          entropy='loss' if rl.entropy_coef else 'metric')
  weights = batch['completion_mask']
  loss, out = policy_loss(
      logprobs, batch['old_logprobs'], batch['advantages'], weights,
      clip_low=rl.clip_low, clip_high=rl.clip_high, aggregation=rl.aggregation,
      max_tokens=max_new_tokens, normalizer=normalizer, ref_logprobs=batch.get('ref_logprobs'),
      kl_coef=kl_coef, kl_estimator=rl.kl_estimator, entropy=entropy,
      entropy_coef=rl.entropy_coef)
  out['logprob_mismatch'] = ops.masked_mean(
      jnp.abs(logprobs - batch['old_logprobs']), weights)
  return loss, out


def policy_normalizer_fn(batch, *, aggregation, max_new_tokens):
  weights = batch['completion_mask']
  if aggregation == 'token':
    return jnp.sum(weights)
  sequences = jnp.sum(jnp.any(weights > 0, axis=-1))
  return sequences * (max_new_tokens if aggregation == 'constant' else 1)


def critic_loss_fn(critic, batch, normalizer, *, clip_range):
  return value_loss(completion_values(critic, batch), batch['old_values'], batch['returns'],
                    batch['completion_mask'],
                    clip_range=clip_range, normalizer=normalizer)


def critic_normalizer_fn(batch):
  return jnp.sum(batch['completion_mask'])


# --- advantages --------------------------------------------------------------------


def grpo_advantages(scores, mask, *, rl, num_samples: int) -> tuple[jax.Array, jax.Array, dict]:
  """(advantages [R], completion mask [R, N], metrics): group-relative
  advantages; zero-variance groups are counted and, with
  rl.filter_zero_variance, dropped from the returned mask."""
  flat = adv.zero_variance_groups(scores, num_samples)
  advantages = adv.group_advantages(scores, num_samples, scale=rl.scale)
  if rl.filter_zero_variance:
    mask = mask * ~flat[:, None]
  return (advantages.astype(jnp.float32), mask,
          {'groups/zero_variance_fraction': jnp.mean(flat.astype(jnp.float32))})


def ppo_advantages(scores, values, old_lp, ref_lp, weights, *, rl, step_rewards=None) -> dict:
  """Per-token rewards (-beta * k1 on every token, the score on the last,
  `step_rewards` [R, N] where steps end), then GAE and optional whitening:
  the seed's objective E[r] - beta KL."""
  token_rewards = jnp.zeros_like(weights)
  if step_rewards is not None:
    token_rewards += step_rewards * weights
  if ref_lp is not None and rl.beta > 0:
    token_rewards -= rl.beta * (old_lp - ref_lp) * weights
  last = weights.shape[1] - 1 - jnp.argmax(weights[:, ::-1], axis=1)
  has = weights.sum(axis=1) > 0
  token_rewards = token_rewards.at[jnp.arange(scores.shape[0]), last].add(
      jnp.where(has, scores, 0.0))
  advantages, returns = adv.gae(token_rewards, values, weights, gamma=rl.gamma, lam=rl.lam)
  if rl.whiten_advantages:
    advantages = ops.whiten(advantages, weights)
  return {'advantages': advantages.astype(jnp.float32), 'returns': returns.astype(jnp.float32)}


def step_reward_tokens(tokenizer, tokens, lengths, steps, width: int) -> np.ndarray:
  """Step rewards [R, width] on completion tokens: `steps[r]` is (character
  offsets where row r's steps end in its decoded text, a reward per step);
  each reward lands on the first token whose decoded prefix reaches its
  offset, i.e. the step's last token (a token spanning the separator too
  carries it)."""
  out = np.zeros((len(steps), width), np.float32)
  stops = set(tokenizer.stop_ids)
  for r, (ends, rewards) in enumerate(steps):
    ids = [int(t) for t in np.asarray(tokens[r])[:int(lengths[r])]]
    if ids and ids[-1] in stops:
      ids = ids[:-1]
    for end, reward in zip(ends, rewards):
      lo, hi = 0, max(len(ids) - 1, 0)
      while lo < hi:  # the smallest j with len(decode(ids[:j + 1])) >= end
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid + 1])) >= end:
          hi = mid
        else:
          lo = mid + 1
      out[r, min(lo, width - 1)] += reward
  return out


# --- rollout -> train batch, in one jitted function -----------------------------------


def make_prepare(policy_graphdef, critic_graphdef, *, algorithm: str, rl, num_samples: int,
                 temperature: float, kl_coef: float, mesh, reference: str = 'params'):
  """Jitted (params, ref_params, critic_params, prompts, completions, scores,
  step_rewards=None, plan=None) -> (train batch, metrics): the training
  rows, old log-probs (the sampler's or recomputed), reference log-probs,
  values, advantages and the mask the loss uses, all on device; with a
  `pack_plan` the policy's forward passes run on packed rows (and the batch
  carries the plan for the update). ref_params / critic_params may be None.
  reference='adapters_off': the reference is the policy's params with its
  LoRA adapters switched off (ref_params unused)."""
  def logprobs(params, rows):
    model = nnx.merge(policy_graphdef, params)
    return completion_logprobs(model, rows, temperature)

  def prepare(params, ref_params, critic_params, prompts, completions, scores,
              step_rewards=None, plan=None):
    with sharding.activation_rules(mesh):
      rows = training_rows(prompts, completions, num_samples) | (plan or {})
      weights = rows['completion_mask']
      out = {}
      old_lp = rows['sampler_logprobs']
      if rl.old_logprobs == 'recompute':
        old_lp = logprobs(params, rows)
        out['logprob_mismatch/sampler_vs_trainer'] = ops.masked_mean(
            jnp.abs(old_lp - rows['sampler_logprobs']), weights)
      if reference == 'adapters_off':
        ref_params = lora.adapters_off(params)
      ref_lp = None if ref_params is None else logprobs(ref_params, rows)
      keys = POLICY_KEYS + (PACK_KEYS if plan else ())
      if algorithm == 'grpo':
        if ref_lp is not None and rl.kl_in == 'reward':  # k1 per sequence, in the reward
          scores = scores - rl.beta * jnp.sum((old_lp - ref_lp) * weights, axis=1)
        advantages, mask, extra = grpo_advantages(scores, weights, rl=rl,
                                                  num_samples=num_samples)
        batch, out = {'advantages': advantages}, out | extra
      else:
        values = completion_values(nnx.merge(critic_graphdef, critic_params), rows)
        batch = ppo_advantages(scores, values, old_lp, ref_lp, weights, rl=rl,
                               step_rewards=step_rewards)
        batch, mask = batch | {'old_values': values}, weights
      batch |= {k: rows[k] for k in keys} | {'completion_mask': mask, 'old_logprobs': old_lp}
      if kl_coef:
        batch['ref_logprobs'] = ref_lp
    return batch, out
  return jax.jit(prepare)
