"""Clipped policy-gradient loss (PPO, GRPO, DAPO, Dr. GRPO) and clipped value loss."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jpost import ops

AGGREGATIONS = ('token', 'sequence', 'constant')


def _is_zero(coef):
  return isinstance(coef, (int, float)) and coef == 0


def _aggregate(token_loss, mask, *, aggregation, max_tokens, normalizer):
  """Reduce masked per-token losses [B, T] to a scalar (see `policy_loss`)."""
  if aggregation == 'token':
    return ops.masked_mean(token_loss, mask, normalizer=normalizer)
  num_sequences = jnp.sum(jnp.any(mask > 0, axis=-1))
  if aggregation == 'sequence':
    total = jnp.sum(ops.sequence_mean(token_loss, mask))
    denominator = num_sequences if normalizer is None else normalizer
  else:  # constant
    total = jnp.sum(token_loss * mask)
    denominator = num_sequences * max_tokens if normalizer is None else normalizer
  return total / jnp.maximum(denominator, 1.0)


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.2, aggregation: str = 'token', max_tokens=None,
                normalizer=None, ref_logprobs=None, kl_coef=0.0, kl_estimator: str = 'k2',
                entropy=None, entropy_coef=0.0):
  """Clipped surrogate loss over completion tokens. Returns (loss, metrics).

  logprobs, old_logprobs, mask: [B, T]; mask is 1 on completion tokens,
  including the stop token, and 0 on prompt and padding. advantages: [B] (one
  per sequence, broadcast over tokens) or [B, T]. old_logprobs, advantages and
  ref_logprobs are constants (no gradient flows into them), so an on-policy
  step may pass `old_logprobs=logprobs`.

  Per token, ratio = exp(logprobs - old_logprobs) and the objective is
  min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A); separate
  clip_low / clip_high is DAPO's clip-higher. The per-token loss is
  -objective + kl_coef * kl_estimate(logprobs, ref_logprobs, kl_estimator)
  - entropy_coef * entropy. Use kl_estimator='k2' for a KL term in the loss:
  it is the one whose gradient is that of KL(pi || ref) (see ops.kl_estimate).

  aggregation names how token losses become the scalar; each weighs tokens
  differently, so the choice changes the gradient:
    'token': sum over all masked tokens / number of masked tokens (DAPO).
        Every token weighs the same; long completions count more.
        `normalizer` replaces the token count.
    'sequence': mean over sequences of each sequence's token mean (original
        GRPO). A token of a short completion weighs more than one of a long
        one: short correct answers are pushed up harder, and long wrong
        answers are pushed down more gently, biasing wrong answers to grow
        longer. `normalizer` replaces the sequence count.
    'constant': sum over masked tokens / (num_sequences * max_tokens) (Dr.
        GRPO). Token weights do not depend on length, and unlike 'token' they
        do not depend on the other completions in the batch either.
        max_tokens (the generation budget) is required; `normalizer` replaces
        num_sequences * max_tokens.
  num_sequences counts rows with at least one masked token, so all-padding
  rows never dilute the loss. Under gradient accumulation pass the whole
  batch's count as `normalizer`.

  Metrics (masked means over the tokens given here): 'clip_fraction' (tokens
  whose clipped branch is active, i.e. gradient zero: A > 0 and ratio >
  1 + clip_high, or A < 0 and ratio < 1 - clip_low), 'ratio_mean',
  'ratio_min', 'ratio_max', 'kl' (if ref_logprobs given), 'entropy' (if
  entropy given), 'policy_loss' (the clipped term alone, same aggregation),
  'loss'.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f'aggregation {aggregation!r} unknown; use one of {AGGREGATIONS}.')
  if aggregation == 'constant' and max_tokens is None:
    raise ValueError("aggregation='constant' divides by num_sequences * max_tokens: pass "
                     'max_tokens (the generation budget, e.g. max_new_tokens).')
  if not (0 <= clip_low < 1 and clip_high >= 0):
    raise ValueError(f'clip ranges must satisfy 0 <= clip_low < 1 and clip_high >= 0; got '
                     f'clip_low={clip_low}, clip_high={clip_high}.')
  if kl_estimator not in ops.KL_ESTIMATORS:
    raise ValueError(f'kl_estimator {kl_estimator!r} unknown; use one of {ops.KL_ESTIMATORS}.')
  if ref_logprobs is None and not _is_zero(kl_coef):
    raise ValueError(f'kl_coef={kl_coef} needs ref_logprobs (the reference model\'s log-probs '
                     'of the same tokens); pass them or set kl_coef=0.')
  if entropy is None and not _is_zero(entropy_coef):
    raise ValueError(f'entropy_coef={entropy_coef} needs entropy (per-token entropies [B, T], '
                     'e.g. from ops.token_entropy); pass them or set entropy_coef=0.')
  chex.assert_rank(logprobs, 2)
  chex.assert_equal_shape((logprobs, old_logprobs, mask))
  advantages = jnp.asarray(advantages, jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  chex.assert_rank(advantages, 2)
  advantages = jax.lax.stop_gradient(jnp.broadcast_to(advantages, logprobs.shape))

  valid = mask > 0
  mask = valid.astype(jnp.float32)
  logprobs = logprobs.astype(jnp.float32)
  old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
  # Padding may hold anything; keep it out of exp() so it cannot produce inf or NaN grads.
  log_ratio = jnp.where(valid, logprobs - old_logprobs, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
  pg_token_loss = -jnp.minimum(unclipped, clipped)
  is_clipped = (((advantages > 0) & (ratio > 1.0 + clip_high))
                | ((advantages < 0) & (ratio < 1.0 - clip_low)))

  token_loss = pg_token_loss
  metrics = {}
  if ref_logprobs is not None:
    ref = jax.lax.stop_gradient(jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0))
    kl = ops.kl_estimate(jnp.where(valid, logprobs, 0.0), ref, kl_estimator)
    token_loss = token_loss + kl_coef * kl
    metrics['kl'] = ops.masked_mean(kl, mask)
  if entropy is not None:
    entropy = jnp.where(valid, entropy.astype(jnp.float32), 0.0)
    token_loss = token_loss - entropy_coef * entropy
    metrics['entropy'] = ops.masked_mean(entropy, mask)

  reduce = lambda x: _aggregate(x, mask, aggregation=aggregation, max_tokens=max_tokens,
                                normalizer=normalizer)
  loss = reduce(token_loss)
  has_tokens = jnp.sum(mask) > 0
  metrics.update({
      'loss': loss,
      'policy_loss': reduce(pg_token_loss),
      'clip_fraction': ops.masked_mean(is_clipped, mask),
      'ratio_mean': ops.masked_mean(ratio, mask),
      'ratio_min': jnp.where(has_tokens, jnp.min(jnp.where(valid, ratio, jnp.inf)), 1.0),
      'ratio_max': jnp.where(has_tokens, jnp.max(jnp.where(valid, ratio, -jnp.inf)), 1.0),
  })
  return loss, metrics


def value_loss(values, old_values, returns, mask, *, clip_range=0.2, normalizer=None):
  """PPO clipped value loss over completion tokens [B, T]. Returns (loss, metrics).

  Per token: 0.5 * max((v - R)**2, (old_v + clip(v - old_v, -c, c) - R)**2),
  so a step cannot profit from moving the value further than c from the
  rollout's value. clip_range=None disables clipping: 0.5 * (v - R)**2.
  old_values and returns are constants. Masked token mean; `normalizer`
  replaces the token count (the whole batch's count under accumulation).

  Metrics: 'value_loss', 'loss' (the same), 'value_clip_fraction' (tokens
  where the clipped error is the larger, i.e. the gradient is zero),
  'explained_variance' (1 - Var[R - v] / Var[R] over masked tokens).
  """
  if clip_range is not None and not clip_range > 0:
    raise ValueError(f'clip_range must be > 0, or None to disable clipping; got {clip_range}.')
  chex.assert_equal_shape((values, old_values, returns, mask))
  valid = mask > 0
  mask = valid.astype(jnp.float32)
  values = jnp.where(valid, values.astype(jnp.float32), 0.0)
  old_values = jax.lax.stop_gradient(jnp.where(valid, old_values.astype(jnp.float32), 0.0))
  returns = jax.lax.stop_gradient(jnp.where(valid, returns.astype(jnp.float32), 0.0))
  error = jnp.square(values - returns)
  if clip_range is None:
    per_token = error
    clip_fraction = jnp.zeros(())
  else:
    clipped_values = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
    clipped_error = jnp.square(clipped_values - returns)
    per_token = jnp.maximum(error, clipped_error)
    clip_fraction = ops.masked_mean(clipped_error > error, mask)
  loss = 0.5 * ops.masked_mean(per_token, mask, normalizer=normalizer)

  def masked_var(x):
    mean = ops.masked_mean(x, mask)
    return ops.masked_mean(jnp.square(x - mean), mask)

  explained = 1.0 - masked_var(returns - values) / jnp.maximum(masked_var(returns), 1e-8)
  metrics = {'loss': loss, 'value_loss': loss, 'value_clip_fraction': clip_fraction,
             'explained_variance': jax.lax.stop_gradient(explained)}
  return loss, metrics
