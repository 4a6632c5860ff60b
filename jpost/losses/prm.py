"""Process reward models: binary cross-entropy per step, read at step ends."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step_bce_loss(logits_bt, targets_bt, mask_bt, *, normalizer=None):
  """Per-step binary cross-entropy with soft labels. Returns (loss, metrics).

  logits_bt [B, T]: the PRM's value at every token (sigmoid = probability
  that the step ending there is correct); only positions where mask_bt is 1
  (each step's last token) count. targets_bt [B, T] in [0, 1]: hard 0/1 or
  soft labels (e.g. Math-Shepherd's share of rollouts that reach the answer).

  Per step: -[y log sigmoid(x) + (1 - y) log sigmoid(-x)], written as
  softplus(x) - x y, which is stable for large |x|. With a soft label its
  minimum is the label's entropy, not 0.

  loss = sum over step ends / normalizer. normalizer defaults to the number
  of step ends here; with gradient accumulation pass the whole batch's step
  count, so that micro-batch losses add up to one large batch's. A batch
  with no step ends gives 0, not NaN (an all-padding evaluation batch).
  Metrics are means over the step ends given here: 'step_accuracy' (the
  prediction sigmoid(x) >= 0.5 agrees with the label rounded at 0.5, y >= 0.5
  counting as correct), 'step_prob' (mean predicted probability),
  'step_label' (mean label), and 'loss'.
  """
  logits = jnp.asarray(logits_bt, jnp.float32)
  targets = jnp.asarray(targets_bt, jnp.float32)
  mask = jnp.asarray(mask_bt, jnp.float32)
  if logits.ndim != 2 or logits.shape != targets.shape or logits.shape != mask.shape:
    raise ValueError(f'logits, targets and mask must all be [B, T]; got {logits.shape}, '
                     f'{targets.shape} and {mask.shape}.')
  per_step = jax.nn.softplus(logits) - logits * targets
  count = jnp.sum(mask)
  if normalizer is None:
    normalizer = count
  normalizer = jnp.asarray(normalizer, jnp.float32)
  loss = jnp.sum(per_step * mask) / jnp.where(normalizer > 0, normalizer, 1.0)
  mean = lambda x: jnp.sum(x * mask) / jnp.maximum(count, 1.0)
  agree = (logits >= 0) == (targets >= 0.5)
  metrics = {
      'loss': loss,
      'step_accuracy': mean(agree.astype(jnp.float32)),
      'step_prob': mean(jax.nn.sigmoid(logits)),
      'step_label': mean(targets),
  }
  return loss, metrics
