"""The `reward` recipe: a Bradley-Terry reward model on chosen/rejected pairs.

The decoder (initialised from an SFT/instruct checkpoint) gets a scalar head
read at the last token of prompt + response; the loss is
-log sigmoid(r_chosen - r_rejected [- margin]) plus an optional centering
term. One epoch by default: reward models overfit preference data quickly.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from jpost import memory
from jpost.data import pipeline
from jpost.errors import ConfigError
from jpost.losses.reward import bradley_terry_loss
from jpost.models import hf, lora
from jpost.models import reward as reward_model
from jpost.trainers import offline, register

EVAL_METRICS = ('accuracy', 'margin', 'chosen_reward', 'rejected_reward')


def pair_rewards(model, batch):
  """(r_chosen [B], r_rejected [B]) from one forward over both sides."""
  both = {k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']])
          for k in ('tokens', 'positions', 'segment_ids')}
  values = model(both['tokens'], both['positions'], both['segment_ids'])
  rewards = reward_model.last_token_values(values, both['segment_ids'])
  n = batch['chosen_tokens'].shape[0]
  return rewards[:n], rewards[n:]


def activations(model_config, rows, seq_len) -> dict:
  """A step's activations: both sides of `rows` pairs in one forward
  (pair_rewards), through a scalar head instead of the LM head."""
  return memory.step_activations(model_config, 2 * rows, seq_len, lm_head=False)


def loss_fn(model, batch, normalizer, *, center_coef):
  chosen, rejected = pair_rewards(model, batch)
  return bradley_terry_loss(chosen, rejected, margin=batch.get('margin'),
                            center_coef=center_coef, normalizer=normalizer,
                            weights=pair_weights(batch))


def pair_weights(batch):
  """[B]: 1 for each pair, 0 for an empty one (no tokens: the rows that fill
  up an evaluation's last batch, or a batch of a process whose data ran out)."""
  return jnp.any(batch['chosen_segment_ids'] > 0, axis=-1).astype(jnp.float32)


def normalizer_fn(batch):
  return jnp.sum(pair_weights(batch))


def preference_data(data, *, sources, epochs, seed, batch_size, pad_last=False):
  """Batches of pairs; `pad_last` (evaluation): every pair, the last batch
  filled up with empty pairs, which weigh nothing (pair_weights)."""
  def build(tokenizer, shard_index, shard_count):
    return pipeline.build(
        'preference', pipeline.resolve_sources(sources), tokenizer, batch_size=batch_size,
        max_len=data.max_len, truncation=data.truncation,
        weights=pipeline.stream_weights(data.weights, epochs), seed=seed, num_epochs=epochs,
        policy=data.policy, shard_index=shard_index, shard_count=shard_count,
        num_threads=data.num_threads, pad_last=pad_last)
  return build


def count_rows(sources, policy: str, kind: str = 'preference') -> int:
  """Valid rows of `kind` in `sources` (for 'one epoch' step counts)."""
  from jpost.data import rows
  row_filter = rows.RowFilter(policy=policy)
  return sum(len(pipeline.load_examples(s, kind, row_filter))
             for s in pipeline.resolve_sources(sources))


def epochs_to_steps(config, sources, kind: str = 'preference') -> int:
  """config.total_steps, or when it is 0, config.epochs over the train rows."""
  if config.total_steps > 0:
    return config.total_steps
  rows = count_rows(sources, config.data.policy, kind)
  steps = math.floor(rows * config.epochs / config.batch_size)
  if steps <= 0:
    raise ConfigError(f'{rows} train rows make no full batch of {config.batch_size}; lower '
                     'config.batch_size or add data.')
  return steps


@register('reward')
def run(config, workdir):
  data = config.data
  with config.unlocked():
    config.total_steps = epochs_to_steps(config, list(data.train))
  task = offline.Task(
      loss_fn=functools.partial(loss_fn, center_coef=config.loss.center_coef),
      normalizer_fn=normalizer_fn,
      train_data=preference_data(data, sources=list(data.train), epochs=None,
                                 seed=config.seed, batch_size=config.batch_size),
      eval_data=preference_data(data, sources=list(data.eval), epochs=1, seed=0,
                                batch_size=config.eval_batch_size, pad_last=True)
      if data.eval else None,
      load_model=lambda path, mesh, cfg: reward_model.load(
          path, mesh=mesh, **hf.compute_options(cfg), **({'seed': cfg.seed} | lora.load_options(cfg))),
      export=reward_model.save,
      eval_metrics=EVAL_METRICS, activations=activations)
  return offline.run(config, workdir, task)
