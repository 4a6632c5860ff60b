"""The `sft` recipe: next-token NLL on the target tokens of chat rows."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jpost import memory, ops
from jpost.data import pipeline
from jpost.losses import sft as sft_losses
from jpost.models import hf
from jpost.trainers import offline, register


def loss_fn(model, batch, normalizer, *, normalization):
  tokens, loss_mask, segment_ids = batch['tokens'], batch['loss_mask'], batch['segment_ids']
  hidden, _ = model.hidden_states(tokens, batch['positions'], segment_ids)
  targets, _ = ops.next_token_targets(tokens, loss_mask, segment_ids)
  kw = ({'normalizer': normalizer} if normalization == 'token'
        else {'num_sequences': normalizer})
  token_weights = sft_losses.sft_token_weights(tokens, loss_mask, segment_ids,
                                               normalization=normalization, **kw)
  # The loss is linear in the log-probs: the head takes its gradient in the
  # forward pass and never computes the logits twice.
  weighted, logprobs = model.weighted_target_logprobs(hidden[:, :-1], targets, token_weights)
  return sft_losses.sft_loss_and_metrics(-weighted, logprobs, tokens, loss_mask, segment_ids)


def normalizer_fn(batch, *, normalization):
  """The whole batch's target-token count (or count of samples with targets)."""
  _, weights = ops.next_token_targets(batch['tokens'], batch['loss_mask'], batch['segment_ids'])
  if normalization == 'token':
    return jnp.sum(weights)
  _, counts = ops.per_sample_sums(weights, weights, batch['segment_ids'])
  return jnp.sum(counts > 0)


def data_fn(data, *, sources, epochs, seed, batch_size, max_segments):
  def build(tokenizer, shard_index, shard_count):
    return pipeline.build(
        'sft', pipeline.resolve_sources(sources), tokenizer, batch_size=batch_size,
        max_len=data.max_len, mask_mode=data.mask_mode, truncation=data.truncation,
        packing=data.packing, pack_window=data.pack_window,
        weights=list(data.weights) if data.weights else None,
        seed=seed, num_epochs=epochs, policy=data.policy, shard_index=shard_index,
        shard_count=shard_count, num_threads=data.num_threads, max_segments=max_segments)
  return build


@register('sft')
def run(config, workdir):
  normalization = config.loss.normalization
  data = config.data
  # Packed rows never hold more samples than the cuDNN kernel is compiled for.
  max_segments = hf.compute_options(config)['attention_max_segments']
  task = offline.Task(
      loss_fn=functools.partial(loss_fn, normalization=normalization),
      normalizer_fn=functools.partial(normalizer_fn, normalization=normalization),
      train_data=data_fn(data, sources=list(data.train), epochs=None, seed=config.seed,
                         batch_size=config.batch_size, max_segments=max_segments),
      eval_data=data_fn(data, sources=list(data.eval), epochs=1, seed=0,
                        batch_size=config.batch_size, max_segments=max_segments)
      if data.eval else None,
      activations=memory.step_activations)
  return offline.run(config, workdir, task)
