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

  The loss is -sum(sft_token_weights(...) * logprobs): see sft_token_weights
  for the normalizations.
  """
  token_weights = sft_token_weights(tokens, loss_mask, segment_ids, normalization=normalization,
                                    normalizer=normalizer, num_sequences=num_sequences)
  return sft_loss_and_metrics(-jnp.sum(token_weights * logprobs), logprobs, tokens, loss_mask,
                              segment_ids)


def sft_token_weights(tokens, loss_mask, segment_ids, *, normalization: str = 'token',
                      normalizer=None, num_sequences=None):
  """Each next-token target's weight [B, T-1] in the SFT loss, which is
  -sum(weights * log-probs): linear in the log-probs, so the LM head can take
  its gradient in the forward pass (ops.head_weighted_logprobs).

  normalization='token': 1 / the number of target tokens in the whole batch
    (`normalizer`; defaults to this batch's count). Every token weighs the
    same, so long answers count more.
  normalization='sequence': 1 / (the sample's target count x the number of
    samples), so the loss is the mean over samples of each one's mean NLL
    (`num_sequences` is the whole batch's count of samples with targets).
    Packed rows are unpacked by segment for this, so every sample weighs the same.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization {normalization!r} unknown; use one of {NORMALIZATIONS}.')
  _, weights = ops.next_token_targets(tokens, loss_mask, segment_ids)
  if normalization == 'token':
    count = jnp.sum(weights) if normalizer is None else normalizer
    return weights / jnp.maximum(count, 1.0)
  b, t = segment_ids.shape
  _, counts = ops.per_sample_sums(weights, weights, segment_ids)
  ids = jnp.arange(b)[:, None] * (t + 1) + segment_ids[:, 1:]  # ops.per_sample_sums' slots
  n = jnp.sum(counts > 0) if num_sequences is None else num_sequences
  return weights / jnp.maximum(counts[ids], 1.0) / jnp.maximum(n, 1.0)


def sft_loss_and_metrics(loss, logprobs, tokens, loss_mask, segment_ids):
  """(loss, metrics) for a loss already summed from the log-probs [B, T-1]."""
  _, weights = ops.next_token_targets(tokens, loss_mask, segment_ids)
  metrics = {'loss': loss, 'target_tokens': jnp.sum(weights),
             'nll_per_token': ops.masked_mean(-logprobs, weights)}
  return loss, metrics
