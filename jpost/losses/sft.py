"""Supervised fine-tuning: negative log-likelihood of the target tokens."""

from __future__ import annotations

import jax.numpy as jnp

from jpost import ops

NORMALIZATIONS = ('token', 'sequence')


def sft_loss(logits, tokens, loss_mask, segment_ids, **kwargs):
  """NLL of next-token targets from logits [B, T, V]: see sft_loss_of_logprobs."""
  targets, _ = ops.next_token_targets(tokens, loss_mask, segment_ids)
  return sft_loss_of_logprobs(ops.token_logprobs(logits, targets), tokens, loss_mask,
                              segment_ids, **kwargs)


def sft_loss_of_logprobs(logprobs, tokens, loss_mask, segment_ids, *,
                         normalization: str = 'token', normalizer=None, num_sequences=None):
  """NLL of next-token targets from their log-probs [B, T-1]. Returns (loss, metrics).

  normalization='token': sum of target NLLs / number of target tokens in the
    whole batch (`normalizer`; defaults to this batch's count). Every token
    weighs the same, so long answers count more.
  normalization='sequence': mean over sequences of each sequence's mean NLL
    (`num_sequences` is the whole batch's count of sequences with targets).
    Packed rows are unpacked by segment for this, so every sample weighs the same.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization {normalization!r} unknown; use one of {NORMALIZATIONS}.')
  _, weights = ops.next_token_targets(tokens, loss_mask, segment_ids)
  nll = -logprobs
  count = jnp.sum(weights)
  if normalization == 'token':
    loss = ops.masked_mean(nll, weights, normalizer=normalizer)
  else:
    sums, counts = ops.per_sample_sums(nll, weights, segment_ids)
    has = counts > 0
    per_sample = jnp.where(has, sums / jnp.maximum(counts, 1.0), 0.0)
    n = jnp.sum(has) if num_sequences is None else num_sequences
    loss = jnp.sum(per_sample) / jnp.maximum(n, 1.0)
  metrics = {'loss': loss, 'target_tokens': count,
             'nll_per_token': ops.masked_mean(nll, weights)}
  return loss, metrics
