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
from jpost import ops
from jpost.losses.policy import policy_loss, value_loss


# --- rollout -> training rows ---------------------------------------------------


def trim_prompts(batch: dict, bucket: int) -> dict:
  """Drops left-padding columns no prompt of the batch uses, keeping the width
  a multiple of `bucket` (0: no trimming) so only a few shapes compile."""
  longest = int(np.max(np.sum(batch['segment_ids'] > 0, axis=1)))
  width = batch['tokens'].shape[1]
  if bucket <= 0 or longest >= width:
    return batch
  keep = min(width, -(-longest // bucket) * bucket)
  return batch | {k: batch[k][:, width - keep:] for k in ('tokens', 'positions', 'segment_ids')}


def trim_completions(completions, bucket: int):
  """Drops completion slots after the longest completion of the rollout,
  keeping the width a multiple of `bucket` (0: no trimming), so the update
  does not run over slots every row left empty."""
  longest = int(np.max(completions.lengths))
  width = completions.tokens.shape[1]
  keep = width if bucket <= 0 else min(width, max(bucket, -(-longest // bucket) * bucket))
  if keep == width:
    return completions
  cut = lambda a: np.asarray(a)[:, :keep]
  return dataclasses.replace(completions, tokens=cut(completions.tokens), mask=cut(completions.mask),
                             logprobs=cut(completions.logprobs),
                             sampling_logprobs=cut(completions.sampling_logprobs))


def training_rows(prompts: dict, completions, num_samples: int) -> dict[str, np.ndarray]:
  """The rollout as training rows, in two layouts.

  Shared-prompt (what the policy trains on): the G left-padded prompts
  `prompt_tokens` / `prompt_positions` / `prompt_segment_ids` [G, P] once,
  and `completion_tokens` / `completion_positions` [R, N], row r continuing
  prompt r // num_samples. Full rows (for a critic): `tokens`, `positions`,
  `segment_ids` [R, P + N]. Both with `completion_mask` and the sampler's
  log-probs [R, N] (0 outside the mask).
  """
  prompt_tokens = np.asarray(prompts['tokens'])
  prompt_real = np.asarray(prompts['segment_ids']) > 0
  comp_mask = np.asarray(completions.mask) > 0
  comp_tokens = np.asarray(completions.tokens)
  prompt_positions = np.where(prompt_real, np.cumsum(prompt_real, axis=1) - 1, 0)
  prompt_lengths = np.repeat(prompt_real.sum(axis=1), num_samples)
  comp_positions = prompt_lengths[:, None] + np.arange(comp_tokens.shape[1])[None]
  full_tokens = np.concatenate([np.repeat(prompt_tokens, num_samples, axis=0), comp_tokens], axis=1)
  full_real = np.concatenate([np.repeat(prompt_real, num_samples, axis=0), comp_mask], axis=1)
  full_positions = np.where(full_real, np.cumsum(full_real, axis=1) - 1, 0)
  i32 = lambda a: np.asarray(a, np.int32)
  return {'prompt_tokens': i32(prompt_tokens), 'prompt_positions': i32(prompt_positions),
          'prompt_segment_ids': i32(prompt_real),
          'completion_tokens': i32(comp_tokens), 'completion_positions': i32(comp_positions),
          'tokens': i32(full_tokens), 'positions': i32(full_positions),
          'segment_ids': i32(full_real),
          'completion_mask': comp_mask.astype(np.float32),
          'sampler_logprobs': np.where(comp_mask, completions.sampling_logprobs,
                                       0.0).astype(np.float32)}


POLICY_KEYS = ('prompt_tokens', 'prompt_positions', 'prompt_segment_ids', 'completion_tokens',
               'completion_positions', 'completion_mask')
CRITIC_KEYS = ('tokens', 'positions', 'segment_ids', 'completion_mask')
PROMPT_KEYS = ('prompt_tokens', 'prompt_positions', 'prompt_segment_ids')


def select_rows(rows: dict, picked: np.ndarray, num_samples: int) -> dict:
  """The rows `picked` (indices into R) of a training batch; each picked row
  gets its own copy of its prompt (a minibatch mixes groups)."""
  return {k: v[picked // num_samples] if k in PROMPT_KEYS else v[picked] for k, v in rows.items()}


def completion_logits(model, batch, temperature: float):
  """Logits [R, N, V] predicting each completion token, at the rollout
  temperature (the distribution the sampler drew from). Token j is
  predicted from the hidden state before it: the prompt's last for j = 0."""
  prompt_hidden, comp_hidden = model.shared_prompt_hidden_states(
      batch['prompt_tokens'], batch['prompt_positions'], batch['prompt_segment_ids'],
      batch['completion_tokens'], batch['completion_positions'], batch['completion_mask'])
  samples = comp_hidden.shape[0] // prompt_hidden.shape[0]
  # Prompts are left-padded, so column -1 is each prompt's last real token.
  last_prompt = jnp.repeat(prompt_hidden[:, -1:], samples, axis=0)
  hidden = jnp.concatenate([last_prompt, comp_hidden[:, :-1]], axis=1)
  return model.logits(hidden) / temperature


def completion_logprobs(logits, batch):
  """log p(completion token j) [R, N] from completion_logits."""
  # token_logprobs drops its last position, so pad one: logits[:, j] -> token j.
  padded = jnp.pad(logits, ((0, 0), (0, 1), (0, 0)))
  return ops.token_logprobs(padded, batch['completion_tokens'])


def make_logprobs_fn(graphdef, temperature: float):
  """Jitted (params, rows) -> log-probs [R, N] of the completion tokens."""
  @jax.jit
  def logprobs(params, batch):
    model = nnx.merge(graphdef, params)
    return completion_logprobs(completion_logits(model, batch, temperature), batch)
  return logprobs


def completion_values(critic, batch):
  """The critic's value [R, N] of the state before each completion token."""
  n = batch['completion_mask'].shape[1]
  return critic(batch['tokens'], batch['positions'], batch['segment_ids'])[:, -n - 1:-1]


def make_values_fn(graphdef):
  @jax.jit
  def values(params, batch):
    return completion_values(nnx.merge(graphdef, params), batch)
  return values


# --- losses ----------------------------------------------------------------------


def policy_loss_fn(model, batch, normalizer, *, rl, temperature, max_new_tokens, kl_coef):
  logits = completion_logits(model, batch, temperature)
  logprobs = completion_logprobs(logits, batch)
  weights = batch['completion_mask']
  # token_entropy, like token_logprobs, drops the last position: pad one.
  entropy = ops.token_entropy(jnp.pad(logits, ((0, 0), (0, 1), (0, 0))))
  if not rl.entropy_coef:
    # Only a metric then: its gradient (times 0) would cost a backward pass
    # over [R, N, vocab] (0.4-0.6 s of a 15 s SmolLM2 update on the 2-core CPU).
    entropy = jax.lax.stop_gradient(entropy)
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


def grpo_advantages(scores: np.ndarray, rows: dict, *, rl,
                    num_samples: int) -> tuple[np.ndarray, dict]:
  """Group-relative advantages [R]; zero-variance groups optionally dropped
  from the loss (their completion_mask is zeroed) and always counted."""
  flat = adv.zero_variance_groups(jnp.asarray(scores), num_samples)
  advantages = adv.group_advantages(jnp.asarray(scores), num_samples, scale=rl.scale)
  flat = np.asarray(flat)
  if rl.filter_zero_variance:
    rows['completion_mask'] = rows['completion_mask'] * ~flat[:, None]
  return np.asarray(advantages, np.float32), {'groups/zero_variance_fraction': float(flat.mean())}


def ppo_advantages(scores: np.ndarray, values: np.ndarray, old_lp: np.ndarray,
                   ref_lp: np.ndarray | None, weights: np.ndarray, *, rl) -> dict:
  """Per-token rewards (-beta * k1 on every token, the score on the last),
  then GAE and optional whitening: the seed's objective E[r] - beta KL."""
  token_rewards = np.zeros_like(weights)
  if ref_lp is not None and rl.beta > 0:
    token_rewards -= rl.beta * (old_lp - ref_lp) * weights
  last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1], axis=1)
  has = weights.sum(axis=1) > 0
  token_rewards[np.arange(len(scores))[has], last[has]] += scores[has]
  advantages, returns = adv.gae(jnp.asarray(token_rewards), jnp.asarray(values),
                                jnp.asarray(weights), gamma=rl.gamma, lam=rl.lam)
  if rl.whiten_advantages:
    advantages = ops.whiten(advantages, jnp.asarray(weights))
  return {'advantages': np.asarray(advantages, np.float32),
          'returns': np.asarray(returns, np.float32)}
