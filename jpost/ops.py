"""Pure array helpers shared by losses: next-token targets and log-probs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(tokens, loss_mask, segment_ids):
  """(targets [B, T-1], weights [B, T-1]) for next-token prediction.

  Logits at position t predict token t+1. A target counts only if it is a
  target token (loss_mask) in the same non-zero segment as its predictor, so
  the first token of a packed sample is never predicted from the previous
  sample's last token.
  """
  same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
  weights = loss_mask[:, 1:].astype(jnp.float32) * same_segment
  return tokens[:, 1:], weights


def token_logprobs(logits, targets):
  """log p(target) [B, T-1] from logits [B, T, V] (the last position has no target)."""
  logits = logits[:, :-1].astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def masked_sum(x, mask):
  return jnp.sum(x * mask)


def masked_mean(x, mask, *, normalizer=None):
  """sum(x * mask) / normalizer; normalizer defaults to sum(mask) (at least 1).

  Pass the whole batch's target count as `normalizer` when x is one
  micro-batch of it, so that accumulated micro-batches equal one large batch.
  """
  if normalizer is None:
    normalizer = jnp.sum(mask)
  return jnp.sum(x * mask) / jnp.maximum(normalizer, 1.0)


def sequence_mean(x, mask):
  """Per-sequence masked means [B] (rows without targets give 0)."""
  return jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def per_sample_sums(x, weights, segment_ids):
  """(sums of x * weights, sums of weights), one slot per (row, segment) of
  next-token targets [B, T-1]; slot b * (T + 1) + s is sample s of row b."""
  b, t = segment_ids.shape
  ids = (jnp.arange(b)[:, None] * (t + 1) + segment_ids[:, 1:]).reshape(-1)
  sums = jax.ops.segment_sum((x * weights).reshape(-1), ids, num_segments=b * (t + 1))
  counts = jax.ops.segment_sum(weights.reshape(-1), ids, num_segments=b * (t + 1))
  return sums, counts
