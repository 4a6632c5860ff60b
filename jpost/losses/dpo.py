"""Direct preference optimisation and its variants on summed response log-probs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpost import ops

LOSS_TYPES = ('sigmoid', 'ipo', 'cdpo', 'simpo')
# Relative to the summed log-probs: a log-ratio gap this small is rounding.
TIE_TOLERANCE = 1e-6


def check_options(loss_type, beta, label_smoothing) -> None:
  """Raises ValueError for a loss type, beta or label smoothing that cannot
  work together (the recipe checks them before anything runs)."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f'loss_type {loss_type!r} unknown; use one of {LOSS_TYPES}.')
  if not beta > 0:
    raise ValueError(f'beta must be > 0 (it scales the implicit reward); got {beta}.')
  if loss_type == 'sigmoid' and label_smoothing != 0:
    raise ValueError(f'label_smoothing={label_smoothing} with loss_type=\'sigmoid\': label '
                     "smoothing is conservative DPO; set loss_type='cdpo'.")
  if loss_type == 'cdpo' and not 0 < label_smoothing < 0.5:
    raise ValueError(f"loss_type='cdpo' needs 0 < label_smoothing < 0.5 (the assumed rate of "
                     f"flipped labels); got {label_smoothing}. With no smoothing use 'sigmoid'.")
  if loss_type in ('ipo', 'simpo') and label_smoothing != 0:
    raise ValueError(f'label_smoothing applies only to loss_type=\'cdpo\'; got '
                     f'label_smoothing={label_smoothing} with {loss_type!r}.')


def _validate(loss_type, beta, label_smoothing, ref_chosen_logps, ref_rejected_logps,
              chosen_lengths, rejected_lengths):
  check_options(loss_type, beta, label_smoothing)
  if loss_type in ('ipo', 'simpo') and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(f'loss_type={loss_type!r} averages log-probs per token: pass '
                     'chosen_lengths and rejected_lengths (target-token counts, [B]).')
  if loss_type != 'simpo' and (ref_chosen_logps is None or ref_rejected_logps is None):
    raise ValueError(f'loss_type={loss_type!r} needs the reference log-probs; only '
                     "'simpo' is reference-free.")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, loss_type: str = 'sigmoid', beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None, simpo_gamma: float = 0.5,
             normalizer=None, weights=None):
  """Preference loss on pairs. All inputs [B]. Returns (loss, metrics).

  Log-probs are sums over each response's target tokens; lengths are the
  counts of those tokens (clamped to at least 1). Reference log-probs are
  constants (no gradient flows into them). With
  h = (pc - pr) - (rc - rr), the policy-vs-reference log-ratio gap:

    'sigmoid' (DPO, Rafailov et al. 2023): -log sigmoid(beta * h).
    'cdpo' (conservative DPO): labels flipped with probability eps = label_smoothing:
        -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h).
    'ipo' (Azar et al. 2023): (h_len - 1 / (2 * beta))**2, where h_len is h
        computed from per-token average log-probs (pc / len_c etc.); a squared
        loss that stops pushing once the gap reaches its target.
    'simpo' (Meng et al. 2024, reference-free; ref inputs ignored, may be None):
        -log sigmoid(beta * (pc / len_c - pr / len_r) - simpo_gamma).
        The paper uses beta around 2 and gamma around 0.5-1.5, not DPO's 0.1.

  loss = sum over pairs / normalizer (default B; pass the whole batch's pair
  count under gradient accumulation). beta, label_smoothing and loss_type are
  Python values, checked when the function is traced.

  `weights` [B] (1 or 0; default all 1) leave pairs out: a batch padded to
  its size with empty pairs (an evaluation's last batch) weighs them 0 in
  the loss and the metrics.

  Metrics are means over the pairs given: 'rewards/chosen' = beta * (pc - rc)
  ('simpo': beta * pc / len_c), 'rewards/rejected' likewise, 'rewards/accuracy'
  (fraction with chosen reward strictly above rejected; a tie, a gap within
  TIE_TOLERANCE of the summed log-probs, is not a win, so a policy equal to
  its reference scores 0), 'rewards/margin' (mean chosen -
  rejected reward), 'logps/chosen', 'logps/rejected' (mean summed policy
  log-probs), 'loss'.
  """
  _validate(loss_type, beta, label_smoothing, ref_chosen_logps, ref_rejected_logps,
            chosen_lengths, rejected_lengths)
  pc = jnp.asarray(policy_chosen_logps, jnp.float32)
  pr = jnp.asarray(policy_rejected_logps, jnp.float32)
  if pc.ndim != 1 or pc.shape != pr.shape:
    raise ValueError(f'policy log-probs must both be [B] (one sum per response); got '
                     f'{pc.shape} and {pr.shape}.')

  if loss_type in ('ipo', 'simpo'):
    len_c = jnp.maximum(jnp.asarray(chosen_lengths, jnp.float32), 1.0)
    len_r = jnp.maximum(jnp.asarray(rejected_lengths, jnp.float32), 1.0)
  if loss_type != 'simpo':
    rc = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logps, jnp.float32))
    rr = jax.lax.stop_gradient(jnp.asarray(ref_rejected_logps, jnp.float32))

  if loss_type == 'simpo':
    chosen_reward = beta * pc / len_c
    rejected_reward = beta * pr / len_r
    per_pair = -jax.nn.log_sigmoid(chosen_reward - rejected_reward - simpo_gamma)
    wins = chosen_reward > rejected_reward
  else:
    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    h = (pc - pr) - (rc - rr)
    if loss_type == 'sigmoid':
      per_pair = -jax.nn.log_sigmoid(beta * h)
    elif loss_type == 'cdpo':
      eps = label_smoothing
      per_pair = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * h)
                  - eps * jax.nn.log_sigmoid(-beta * h))
    else:  # ipo
      h_len = (pc / len_c - pr / len_r) - (rc / len_c - rr / len_r)
      per_pair = jnp.square(h_len - 1.0 / (2.0 * beta))
    # The policy's and the reference's sums come from different compiled
    # programs (a cache made in other batches), which round differently in
    # the last bits: a gap within that is a tie, so that a policy equal to
    # its reference scores 0 whatever the batches.
    tie = jnp.abs(h) <= TIE_TOLERANCE * (jnp.abs(pc) + jnp.abs(pr) + jnp.abs(rc) + jnp.abs(rr))
    wins = (chosen_reward > rejected_reward) & ~tie

  # A weightless (empty) pair adds nothing, whatever its terms.
  mean = ops.pair_mean(weights, pc)
  loss = mean(per_pair, normalizer)
  metrics = {
      'loss': loss,
      'rewards/chosen': mean(chosen_reward),
      'rewards/rejected': mean(rejected_reward),
      'rewards/accuracy': mean(wins.astype(jnp.float32)),
      'rewards/margin': mean(chosen_reward - rejected_reward),
      'logps/chosen': mean(pc),
      'logps/rejected': mean(pr),
  }
  return loss, metrics
