"""The compiled device programs of the serving engine: prefill one prompt,
place it into a slot of the running batch's cache, and one decode step of
every slot.

The running batch has a fixed number of slots R and a KV cache of S
columns per slot, so the decode step compiles once. The decoder writes a
step's keys and values at one column shared by all rows (`cache['index']`),
and a query attends by position and segment, not by column order. So the
cache is used as a ring: step t writes column t mod S for every slot, and a
request joining before step t0 with a prompt of P tokens and at most N new
tokens gets its prompt placed at columns t0+N .. t0+N+P-1 (mod S), which
its own decode steps (t0 .. t0+N-1) never overwrite while it runs: it
needs P + N <= S columns. Joining rewrites the whole row, so nothing of the
slot's previous request stays visible. Prompts are prefilled at a few
bucketed lengths (one compile each).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jpost import sampling
from jpost.models.decoder import init_cache

TOP_LOGPROBS = 5  # the most alternatives a request may ask log-probs for


def prefill_buckets(cache_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Prompt lengths compiled for: powers of two from `smallest`, then S."""
  buckets, size = [], smallest
  while size < cache_len:
    buckets.append(size)
    size *= 2
  return (*buckets, cache_len)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
  for size in buckets:
    if length <= size:
      return size
  raise ValueError(f'prompt of {length} tokens is longer than the largest bucket {buckets[-1]}.')


def empty_cache(model_config, slots: int, cache_len: int):
  """The running batch's cache: one array per layer (the decode loop writes
  each in place), made by its own compiled computation, not from host zeros."""
  make = functools.partial(init_cache, model_config, slots, cache_len, stacked=False)
  return jax.jit(make)()


@functools.partial(jax.jit, static_argnums=(0,))
def prefill(graphdef, state, tokens, mask, cache):
  """One left-padded prompt [1, B] into an empty stacked cache of B columns:
  (last hidden [1, D], last position [1], cache). A scan over the layers:
  one layer compiled per bucket, not all of them."""
  model = nnx.merge(graphdef, state)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, cache = model.hidden_states(tokens, positions, mask, cache)
  return hidden[:, -1], positions[:, -1], cache


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def join(cache, hidden, pos, prompt_cache, prompt_hidden, prompt_pos, slot, start):
  """Places a prefilled prompt (stacked cache of B columns) into row `slot`
  of the running cache, bucket column j at column (start + j) mod S, and
  clears the rest of the row."""
  width = cache['positions'].shape[1]
  bucket = prompt_cache['positions'].shape[1]
  offset = (jnp.arange(width) - start) % width  # bucket column each cache column holds
  inside = offset < bucket
  source = jnp.minimum(offset, bucket - 1)

  def spread(row, axis):  # [..., B, ...] along `axis` -> [..., S, ...], zeros outside
    taken = jnp.take(row, source, axis=axis)
    shape = [1] * taken.ndim
    shape[axis] = width
    return jnp.where(inside.reshape(shape), taken, jnp.zeros((), taken.dtype))

  def put(full, row):
    return jax.lax.dynamic_update_index_in_dim(full, row.astype(full.dtype), slot, axis=0)

  keys = [put(k, spread(prompt_cache['k'][i, 0], -1)) for i, k in enumerate(cache['k'])]
  values = [put(v, spread(prompt_cache['v'][i, 0], -2)) for i, v in enumerate(cache['v'])]
  cache = dict(cache, k=keys, v=values,
               positions=put(cache['positions'], spread(prompt_cache['positions'][0], 0)),
               segment_ids=put(cache['segment_ids'], spread(prompt_cache['segment_ids'][0], 0)))
  return cache, put(hidden, prompt_hidden[0]), put(pos, prompt_pos[0])


def _nucleus(logits, top_p):
  """Rows of temperature-scaled logits [R, V] with the tokens outside each
  row's top-p nucleus set to a large negative value (top_p [R]; 1 keeps all)."""
  sorted_desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
  keep = jnp.sum(before < top_p[:, None], axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(sorted_desc, keep - 1, axis=-1)
  return jnp.where(logits < threshold, -1e30, logits)


def pick_rows(logits, temperature, top_p, seeds, counts):
  """One token per row of logits [R, V], each row with its own settings:
  argmax where temperature is 0, else a draw from the temperature-scaled,
  top-p filtered softmax with a key made from the row's seed and token count
  (so a seeded request draws the same numbers whatever else shares the batch;
  its logits can still differ in the last bits with its place in the batch,
  so a draw that falls on a boundary between two tokens can differ: seeds
  replay best-effort, as OpenAI's do). Sorting the vocabulary for top-p and
  drawing run only when some row needs them."""
  greedy = sampling.greedy_tokens(logits)

  def draw(_):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    scaled = jax.lax.cond(jnp.any(top_p < 1), lambda x: _nucleus(x, top_p), lambda x: x, scaled)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
    drawn = jax.vmap(lambda k, row: sampling.sample_categorical(k, row[None])[0])(keys, scaled)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


@functools.partial(jax.jit, static_argnums=(0, 12), donate_argnums=(4, 5))
def step(graphdef, state, layers, head, cache, hidden, pos, active, column, temperature, top_p,
         seeds_and_counts, with_top: bool):
  """Picks every slot's next token from its last hidden state, then runs the
  tokens through the decoder at `column`: (token [R], its log-prob at
  temperature 1 [R], top ids [R, k] and log-probs [R, k] (k = 0 unless
  `with_top`), hidden, pos, cache). Idle slots (active 0) write segment 0,
  which nothing attends to."""
  model = nnx.merge(graphdef, state)
  logits = model.logits(hidden[:, None], (head, model.config.tie_embeddings))[:, 0]
  token = pick_rows(logits, temperature, top_p, seeds_and_counts[:, 0], seeds_and_counts[:, 1])
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  token_logprob = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
  if with_top:
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
  else:
    top_logprobs, top_ids = jnp.zeros((token.shape[0], 0)), jnp.zeros((token.shape[0], 0), jnp.int32)
  cache = dict(cache, index=column)
  new_hidden, cache = model.hidden_states(token[:, None], (pos + 1)[:, None], active[:, None],
                                          cache, layers)
  return token, token_logprob, top_ids, top_logprobs, new_hidden[:, -1], pos + 1, cache


def split_model(model):
  """(graphdef, state, per-layer decode parameters, head weight): what the
  programs take, prepared once per served model."""
  graphdef, state = nnx.split(model)
  layers = jax.jit(lambda s: nnx.merge(graphdef, s).decode_layers(False))(state)
  head = jax.jit(lambda s: nnx.merge(graphdef, s).head()[0])(state)
  return graphdef, state, layers, head


def prompt_cache(model_config, bucket: int):
  return init_cache(model_config, 1, bucket, stacked=True)
