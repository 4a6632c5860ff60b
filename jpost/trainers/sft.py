"""The `sft` recipe: next-token NLL on the target tokens of chat rows."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jpost import memory, ops
from jpost.data import pipeline
from jpost.errors import ConfigError
from jpost.losses import sft as sft_losses
from jpost.models import attention, cpu_attention
from jpost.trainers import offline, register

# data.padding_free: 'auto', or on / off (True / False; a command line's
# --config.data.padding_free=true gives the string, which counts the same).
PADDING_FREE = {'auto': 'auto', 'true': True, 'false': False}


def loss_fn(model, batch, normalizer, *, normalization, max_len=None):
  tokens, loss_mask, segment_ids = batch['tokens'], batch['loss_mask'], batch['segment_ids']
  hidden, _ = model.hidden_states(tokens, batch['positions'], segment_ids)
  targets, _ = ops.next_token_targets(tokens, loss_mask, segment_ids)
  kw = ({'normalizer': normalizer} if normalization == 'token'
        else {'num_sequences': normalizer})
  token_weights = sft_losses.sft_token_weights(tokens, loss_mask, segment_ids,
                                               normalization=normalization, **kw)
  # The loss is linear in the log-probs: the head takes its gradient in the
  # forward pass and never computes the logits twice.
  weighted, logprobs = _head(model, hidden, targets, token_weights, max_len)
  return sft_losses.sft_loss_and_metrics(-weighted, logprobs, tokens, loss_mask, segment_ids)


def _head(model, hidden, targets, token_weights, max_len):
  """model.weighted_target_logprobs over rows of max_len tokens: a
  padding-free row of several of them is cut into as many, so that the
  head's pieces (`logits_chunk` positions of each row) hold as many tokens
  as in rows of max_len. Each position's log-prob is its own, whatever the
  cut; the last position, which has no target, goes in with weight 0.
  max_len None: the rows as they are."""
  b, t, _ = hidden.shape
  if max_len is None or t == max_len or t % max_len:
    return model.weighted_target_logprobs(hidden[:, :-1], targets, token_weights)
  pad = lambda a: jnp.pad(a, ((0, 0), (0, 1))).reshape(b * t // max_len, max_len)
  weighted, logprobs = model.weighted_target_logprobs(
      hidden.reshape(b * t // max_len, max_len, -1), pad(targets), pad(token_weights))
  return weighted, logprobs.reshape(b, t)[:, :-1]


def normalizer_fn(batch, *, normalization):
  """The whole batch's target-token count (or count of samples with targets)."""
  _, weights = ops.next_token_targets(batch['tokens'], batch['loss_mask'], batch['segment_ids'])
  if normalization == 'token':
    return jnp.sum(weights)
  _, counts = ops.per_sample_sums(weights, weights, batch['segment_ids'])
  return jnp.sum(counts > 0)


def data_fn(data, *, sources, epochs, seed, batch_size):
  def build(tokenizer, shard_index, shard_count, row_len, max_segments):
    return pipeline.build(
        'sft', pipeline.resolve_sources(sources), tokenizer, batch_size=batch_size,
        max_len=data.max_len, mask_mode=data.mask_mode, truncation=data.truncation,
        packing=data.packing, pack_window=data.pack_window,
        weights=pipeline.stream_weights(data.weights, epochs),
        seed=seed, num_epochs=epochs, policy=data.policy, shard_index=shard_index,
        shard_count=shard_count, num_threads=data.num_threads, max_segments=max_segments,
        row_len=row_len)
  return build


def packing(config, model_config, batch_devices) -> dict:
  """The packer's row length and segment limit (offline.Task.packing).

  Rows hold data.max_len tokens, or, padding-free, one row holds each
  device's share of a micro-batch: batch_size / accum_steps / devices rows'
  worth of samples, run together without the padding their own rows would
  end with. 'auto' packs padding-free where attention runs on the fused CPU
  kernel, whose cost follows the samples' lengths, not the row's; the other
  implementations pay for the whole row (blockwise) or for a fixed number
  of segments in it (cuDNN). The segment limit, the model's
  attention_max_segments a row of max_len, grows with the row except under
  cuDNN, which is compiled for that many a row.
  """
  data = config.data
  choice = data.get('padding_free', False)
  choice = PADDING_FREE.get(str(choice).lower())
  if choice is None:
    raise ConfigError(f'config.data.padding_free={data.padding_free!r}; use true, false or '
                      'auto.')
  per_device = config.batch_size // config.accum_steps // batch_devices
  row_len = data.max_len * per_device
  chosen = attention.choose(model_config.attention, key_len=row_len,
                            block=model_config.attention_block,
                            sliding_window=model_config.sliding_window, dtype=model_config.dtype)
  if choice == 'auto':
    choice = data.packing and chosen == 'cpu' and cpu_attention.supports(
        model_config.num_heads, model_config.num_kv_heads, model_config.head_size,
        model_config.dtype)
  elif choice and not data.packing:
    raise ConfigError('config.data.padding_free=true packs samples into rows; it needs '
                      'config.data.packing=True.')
  if not choice:
    return {'row_len': data.max_len, 'max_segments': model_config.attention_max_segments}
  segments = model_config.attention_max_segments * (1 if chosen == 'cudnn' else per_device)
  return {'row_len': row_len, 'max_segments': segments}


@register('sft')
def run(config, workdir):
  normalization = config.loss.normalization
  if normalization not in sft_losses.NORMALIZATIONS:
    raise ConfigError(f'config.loss.normalization={normalization!r}; use one of '
                      f'{sft_losses.NORMALIZATIONS}.')
  data = config.data
  task = offline.Task(
      loss_fn=functools.partial(loss_fn, normalization=normalization, max_len=data.max_len),
      normalizer_fn=functools.partial(normalizer_fn, normalization=normalization),
      train_data=data_fn(data, sources=list(data.train), epochs=None, seed=config.seed,
                         batch_size=config.batch_size),
      eval_data=data_fn(data, sources=list(data.eval), epochs=1, seed=0,
                        batch_size=config.batch_size)
      if data.eval else None,
      activations=functools.partial(memory.step_activations, head_len=data.max_len),
      packing=functools.partial(packing, config))
  return offline.run(config, workdir, task)
