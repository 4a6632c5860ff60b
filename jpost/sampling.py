"""Batched generation with a KV cache: one prefill, then a jit-compiled decode loop.

Prompts are left-padded ([B, P] with a 0/1 mask); each row's positions start
at 0 on its first real token, so padding never shifts RoPE. The loop stops
when every row has produced a stop token or `max_new_tokens` are out.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost.models.decoder import init_cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f'max_new_tokens must be positive, got {self.max_new_tokens}.')
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}.')
    if not self.stop_ids:
      raise ValueError('stop_ids is empty: give the tokenizer\'s stop_ids so rows can end.')


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] tokens and 0/1 mask, each prompt right-aligned."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token.')
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
    mask[row, width - len(prompt):] = 1
  return tokens, mask


def generate(model, prompt_tokens, prompt_mask, sampling: SamplingConfig, key=None):
  """Returns (completion tokens [B, N], completion mask [B, N]); the mask
  covers each row's tokens up to and including its stop token."""
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  return _generate(graphdef, state, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask),
                   key, sampling)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(graphdef, state, tokens, mask, key, sampling: SamplingConfig):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens.shape
  n = sampling.max_new_tokens
  cache = init_cache(model.config, batch, prompt_len + n)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, cache = model.hidden_states(tokens, positions, mask, cache)
  stop_ids = jnp.asarray(sampling.stop_ids, jnp.int32)

  def pick(hidden_last, key):
    logits = model.logits(hidden_last[:, None])[:, 0]
    if sampling.temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / sampling.temperature).astype(jnp.int32)

  key, sub = jax.random.split(key)
  first = pick(hidden[:, -1], sub)
  out = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_ids)
  last_pos = positions[:, -1]

  def cond(carry):
    step, _, done, *_ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, out, done, cache, last_pos, key = carry
    token = out[:, step - 1]
    pos = last_pos + 1
    hidden, cache = model.hidden_states(token[:, None], pos[:, None],
                                        jnp.ones((batch, 1), jnp.int32), cache)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, 0, pick(hidden[:, -1], sub))
    out = out.at[:, step].set(nxt)
    return step + 1, out, done | jnp.isin(nxt, stop_ids), cache, pos, key

  step, out, done, *_ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), out, done, cache, last_pos, key))
  # A token belongs to the completion if no stop token came strictly before it.
  is_stop = jnp.isin(out, stop_ids)
  stopped_before = jnp.cumsum(is_stop, axis=1) - is_stop
  completion_mask = (stopped_before == 0) & (jnp.arange(n)[None] < step)
  return jnp.where(completion_mask, out, 0), completion_mask.astype(jnp.int32)
