"""Reward models: Bradley-Terry loss on (chosen, rejected) scalar rewards."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpost import ops


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0,
                       normalizer=None, weights=None):
  """Pairwise Bradley-Terry loss on rewards [B]. Returns (loss, metrics).

  Per pair: -log sigmoid(r_chosen - r_rejected - margin), where `margin` [B]
  is an optional per-pair target gap (e.g. from preference strength; None = 0).

  center_coef adds center_coef * (r_chosen + r_rejected)**2 per pair: the
  reward-centering regulariser of Eisenstein et al. 2023 ("Helping or Herding?").
  The Bradley-Terry likelihood only sees reward differences, so a constant
  shift is free; this term pins the rewards of each pair near zero mean, which
  keeps rewards comparable across prompts and across reward models.

  loss = sum over pairs / normalizer. normalizer defaults to B; with gradient
  accumulation pass the whole batch's pair count so that micro-batches add up
  to one large batch. Metrics are means over the pairs given here:
  'accuracy' (fraction with r_chosen > r_rejected, a tie counts 0.5),
  'margin' (mean r_chosen - r_rejected), 'chosen_reward', 'rejected_reward', 'loss'.
  `weights` [B] (1 or 0; default all 1) leave pairs out of loss and metrics,
  as in dpo_loss.
  """
  chosen = jnp.asarray(chosen_rewards, jnp.float32)
  rejected = jnp.asarray(rejected_rewards, jnp.float32)
  if chosen.ndim != 1 or chosen.shape != rejected.shape:
    raise ValueError(f'chosen and rejected rewards must both be [B]; got {chosen.shape} and '
                     f'{rejected.shape}. Squeeze the reward head output to one scalar per row.')
  diff = chosen - rejected
  logits = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
  per_pair = -jax.nn.log_sigmoid(logits) + center_coef * jnp.square(chosen + rejected)
  # A weightless (empty) pair adds nothing, whatever its terms.
  mean = ops.pair_mean(weights, chosen)
  loss = mean(per_pair, normalizer)
  wins = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
  metrics = {
      'loss': loss,
      'accuracy': mean(wins),
      'margin': mean(diff),
      'chosen_reward': mean(chosen),
      'rejected_reward': mean(rejected),
  }
  return loss, metrics
