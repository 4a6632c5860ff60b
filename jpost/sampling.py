"""Batched sampling with a KV cache: one prefill, then a jit-compiled decode loop.

Prompts are left-padded ([B, P] with a 0/1 mask); each row's positions start
at 0 on its first real token, so padding never shifts RoPE. The prompt is
prefilled once, and its cache is shared (not copied) by the `num_samples`
completions of each prompt, which keep their own tokens' keys apart. The loop stops when every row has produced a stop token or
`max_new_tokens` are out. Rollout and training share the decoder, so the
sampler's temperature-1 log-probs are the trainer's log-probs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
from flax import nnx

from jpost.errors import ConfigError
from jpost.models import cpu_decode
from jpost.models.decoder import cache_storage_dtype, init_cache

_NEG_INF = -1e30  # finite: softmax of a filtered row stays NaN-free


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """temperature 0 is greedy. Filters apply in the order temperature, top-k,
  top-p (nucleus), min-p, as in transformers. 0 / 1.0 / 0.0 disable them."""

  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  num_samples: int = 1
  stop_ids: tuple[int, ...] = ()
  # How the decode step runs, not its maths (bfloat16 rounds differently):
  # a scan over stacked layers compiles 2.5-7x faster and decodes 1.6-2x
  # slower than a loop over them. None: the loop in `generate`, the scan
  # for a program compiled for one call (`stream`, `for_one_call`).
  scan_layers: bool | None = None

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ConfigError(f'max_new_tokens must be positive, got {self.max_new_tokens}.')
    if self.temperature < 0:
      raise ConfigError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}.')
    if self.top_k < 0:
      raise ConfigError(f'top_k must be >= 0 (0 = off), got {self.top_k}.')
    if not 0 < self.top_p <= 1:
      raise ConfigError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}.')
    if not 0 <= self.min_p < 1:
      raise ConfigError(f'min_p must be in [0, 1) (0 = off), got {self.min_p}.')
    if self.num_samples < 1:
      raise ConfigError(f'num_samples must be >= 1, got {self.num_samples}.')
    if not self.stop_ids:
      raise ConfigError("stop_ids is empty: give the tokenizer's stop_ids so rows can end.")
    object.__setattr__(self, 'stop_ids', tuple(int(i) for i in self.stop_ids))


@dataclasses.dataclass(frozen=True)
class Completions:
  """Per completion row (prompt i's samples are rows i*n .. i*n+n-1), [R, N]."""

  tokens: jax.Array  # 0 after the end of each completion
  mask: jax.Array  # 1 up to and including the stop token
  logprobs: jax.Array  # log p(token) under the model at temperature 1, unfiltered
  sampling_logprobs: jax.Array  # under the distribution actually sampled from
  truncated: jax.Array  # [R] bool: no stop token within max_new_tokens
  lengths: jax.Array  # [R] tokens in the completion, stop token included


jax.tree_util.register_dataclass(
    Completions, data_fields=[f.name for f in dataclasses.fields(Completions)], meta_fields=[])


def left_pad(prompts: list[list[int]], pad_id: int, multiple: int = 1,
             max_width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] tokens and 0/1 mask, each prompt right-aligned. P is the longest
  prompt's length rounded up to a `multiple` (one compiled decode loop for a
  bucket of lengths, not one per length), but no more than `max_width`
  unless the longest prompt is."""
  if not prompts:
    raise ValueError('no prompts given.')
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f'prompt {i} is empty: every prompt needs at least one token.')
  longest = max(len(p) for p in prompts)
  width = -(-longest // multiple) * multiple
  if max_width is not None:
    width = max(longest, min(width, max_width))
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
    mask[row, width - len(prompt):] = 1
  return tokens, mask


def filter_logits(logits, sampling: SamplingConfig):
  """Temperature-scaled logits [.., V] with tokens outside top-k / top-p / min-p
  set to a large negative value; softmax of the result is what is sampled."""
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k and sampling.top_k < logits.shape[-1]:  # past the vocabulary: no filter
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, _NEG_INF, logits)
  if sampling.top_p < 1:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the top one always).
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, _NEG_INF, logits)
  if sampling.min_p > 0:
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= sampling.min_p * jnp.max(probs, axis=-1, keepdims=True)
    logits = jnp.where(keep, logits, _NEG_INF)
  return logits


def sample_categorical(key, logits, block: int = 256):
  """One token per row of logits [R, V] drawn from their softmax, by inverse
  CDF with one uniform number per row.

  `jax.random.categorical` (Gumbel-max) draws a random number per vocabulary
  entry: at batch 32 with a 49k vocabulary that cost 17 ms per step on CPU,
  more than the LM head. Here the uniform number picks a block of `block`
  tokens by the blocks' masses, then a token within the block: two short
  cumulative sums. A token of probability 0 is never drawn (the clamps only
  matter when float rounding puts the number on the very edge of the mass).
  """
  return _drawn(key, logits, block)[0]


def _drawn(key, logits, block: int = 256):
  """(`sample_categorical`'s tokens [R], their log-probs under the softmax
  of logits): the log-probs from the same exponentials and sums the draw
  used, not from a log_softmax's passes over [R, V] of its own."""
  rows, vocab = logits.shape
  top = jnp.max(logits, axis=-1, keepdims=True)
  probs = jnp.exp(logits - top)
  probs = jnp.pad(probs, ((0, 0), (0, -vocab % block))).reshape(rows, -1, block)
  mass = probs.sum(axis=-1)  # [R, blocks]
  ends = jnp.cumsum(mass, axis=-1)
  u = jax.random.uniform(key, (rows,)) * ends[:, -1]
  blocks = jnp.arange(mass.shape[1])
  chosen = jnp.sum(ends <= u[:, None], axis=-1)
  chosen = jnp.clip(chosen, jnp.min(jnp.where(mass > 0, blocks, blocks[-1]), axis=-1),
                    jnp.max(jnp.where(mass > 0, blocks, 0), axis=-1))
  in_block = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]  # [R, block]
  before = jnp.take_along_axis(ends - mass, chosen[:, None], axis=1)
  offsets = jnp.arange(block)
  index = jnp.sum(jnp.cumsum(in_block, axis=-1) <= u[:, None] - before, axis=-1)
  index = jnp.clip(index, jnp.min(jnp.where(in_block > 0, offsets, block - 1), axis=-1),
                   jnp.max(jnp.where(in_block > 0, offsets, 0), axis=-1))
  token = (chosen * block + index).astype(jnp.int32)
  picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  return token, picked - top[:, 0] - jnp.log(ends[:, -1])


def greedy_tokens(logits):
  """jnp.argmax(logits [R, V], axis=-1) as int32 (the first maximum; the
  first NaN where a row has one), as a max and then a min over indices:
  XLA:CPU runs argmax's paired value-index reduction as a scalar loop, 6.3
  against 1.7 ms at 64 x 49152 (bench/RESULTS.md), in every greedy
  decode step."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  hit = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(hit, index, logits.shape[-1] - 1), axis=-1)


def _pick(logits, key, sampling: SamplingConfig, on_cpu_kernels: bool = False):
  """(token, raw log-prob at temperature 1, log-prob under the sampling distribution).

  Each pass over the [R, V] logits is a decode step's cost beside its
  matmuls: the raw log-prob takes one max, exp and sum; the draw one exp
  and sum more at the temperature, which its log-prob reuses.
  `on_cpu_kernels` (a decode loop on them: its head is packed): greedy
  decoding, or a draw at a temperature with no top-k, top-p or min-p, runs
  in one kernel call (cpu_decode.draw), from the same uniform numbers."""
  logits = logits.astype(jnp.float32)
  unfiltered = not sampling.top_k and sampling.top_p == 1 and sampling.min_p == 0
  if on_cpu_kernels and (sampling.temperature == 0 or unfiltered):
    return cpu_decode.draw(logits, jax.random.uniform(key, logits.shape[:1]),
                           sampling.temperature)
  top = jnp.max(logits, axis=-1, keepdims=True)
  raw_log_total = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
  if sampling.temperature == 0:
    token = greedy_tokens(logits)
    sampled_lp = jnp.zeros(token.shape, jnp.float32)  # a point mass
  else:
    token, sampled_lp = _drawn(key, filter_logits(logits, sampling))
  raw_lp = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - top[:, 0] - raw_log_total
  return token, raw_lp, sampled_lp


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A decode loop's weights, prepared once by `prepare` for several
  `generate` calls on the same parameters."""
  layers: object  # Decoder.decode_layers(stacked)
  head: jax.Array  # Decoder.head()'s weight
  stacked: bool  # whether `layers` are stacked for a scan over the layers


def prepare(model, sampling: SamplingConfig) -> Prepared | None:
  """The weights `generate` with `sampling` decodes from, prepared once:
  pass them as `generate(..., prepared=)` to every call on this model's
  parameters as they are now (an evaluation's batches, greedy and sampled).
  Otherwise each call prepares its own: on jpost's CPU decoding kernels it
  packs every weight from the float32 master weights (SmolLM2: 121 calls,
  270 MB of fresh memory, 62-146 ms, bench/RESULTS.md). None where the
  parameters are spread over several devices: there each call prepares its
  own, where they lie."""
  graphdef, state = nnx.split(model)
  if any(len(leaf.sharding.device_set) > 1 for leaf in jax.tree.leaves(state)
         if isinstance(leaf, jax.Array)):
    return None
  stacked = _scans(sampling, one_call=False)
  layers, head = _prepare(graphdef, state, stacked)
  return Prepared(layers, head, stacked)


def _check_layout(prepared: Prepared | None, stacked: bool):
  if prepared is not None and prepared.stacked != stacked:
    raise ValueError(f'prepared weights are for scan_layers={prepared.stacked}, this call '
                     f'decodes with scan_layers={stacked}; prepare them with the SamplingConfig '
                     'it decodes with (for chat: for_one_call(model, sampling)).')


@functools.partial(jax.jit, static_argnums=(0, 2))
def _prepare(graphdef, state, stacked: bool):
  model = nnx.merge(graphdef, state)
  return model.decode_layers(stacked), model.head()[0]


def generate(model, prompt_tokens, prompt_mask, sampling: SamplingConfig, key=None,
             *, batch_sharding=None, cache_dtype=None,
             prepared: Prepared | None = None) -> Completions:
  """Samples completions for left-padded prompts; see Completions.

  `batch_sharding` (a NamedSharding for [B, P]) spreads prompts over a mesh,
  e.g. the train state's; the model's parameters are used where they are.
  `cache_dtype` overrides the cache's storage dtype (see
  decoder.cache_storage_dtype; for bfloat16 models a rounding difference only).
  `prepared` (`prepare(model, sampling)`, for the model's parameters as they
  are) saves the call preparing its weights again.
  """
  placed = isinstance(prompt_tokens, jax.Array)  # e.g. rows of a mesh over processes
  if not placed:
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
    raise ValueError(f'prompt tokens {prompt_tokens.shape} and mask {prompt_mask.shape} must '
                     'be [B, P] and equal; build them with left_pad().')
  empty = [] if placed else np.nonzero(prompt_mask.sum(axis=1) == 0)[0].tolist()
  if empty:
    raise ValueError(f'prompt row(s) {empty} are empty: every prompt needs a token.')
  limit = model.config.max_position_embeddings
  if prompt_tokens.shape[1] + sampling.max_new_tokens > limit:
    raise ConfigError(
        f'prompt length {prompt_tokens.shape[1]} + max_new_tokens {sampling.max_new_tokens} '
        f'exceeds the model context ({limit} positions); shorten the prompts or max_new_tokens.')
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  tokens, mask = (prompt_tokens, prompt_mask) if placed else (
      jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask))
  if batch_sharding is not None:
    tokens, mask = jax.device_put((tokens, mask), batch_sharding)
  # The empty cache is made outside the compiled function: built inside, XLA
  # would try to constant-fold writes into a large array of zeros at compile time.
  # Made by a computation of its own, not from host zeros (no host transfer),
  # with its batch rows where the prompts' are.
  rows = getattr(tokens, 'sharding', None)
  # The storage dtype resolved here, not in the cached maker: it follows
  # where decoding runs (decoder.cache_storage_dtype), which is no part of its key.
  if cache_dtype is None:
    cache_dtype = cache_storage_dtype(model.config.dtype, model.config.decode_kernels)
  stacked = _scans(sampling, one_call=False)
  make_cache = functools.partial(
      _empty_cache_program, model.config, cache_dtype=jnp.dtype(cache_dtype),
      stacked=stacked,
      rows=rows if isinstance(rows, NamedSharding) else None)
  prompt_cache = make_cache(tokens.shape[0], tokens.shape[1])()
  completion_cache = make_cache(tokens.shape[0] * sampling.num_samples, sampling.max_new_tokens)()
  _check_layout(prepared, stacked)
  layers, head = (None, None) if prepared is None else (prepared.layers, prepared.head)
  return _generate(graphdef, state, tokens, mask, prompt_cache, completion_cache, key, sampling,
                   layers, head)[0]


def rollout_cache_bytes(config, prompts: int, prompt_len: int, samples: int, new_tokens: int,
                        cache_dtype=None) -> int:
  """Bytes of the KV caches `generate` holds for `prompts` prompts of
  `prompt_len` positions, over every device: each prompt's once, and
  `new_tokens` slots for each of its `samples` completions; nothing is allocated."""
  return (cache_bytes(config, prompts, prompt_len, cache_dtype)
          + cache_bytes(config, prompts * samples, new_tokens, cache_dtype))


def cache_bytes(config, rows: int, slots: int, cache_dtype=None) -> int:
  """Bytes of a KV cache of `rows` rows of `slots` positions, over every
  device; nothing is allocated."""
  shapes = jax.eval_shape(functools.partial(init_cache, config, rows, slots, cache_dtype))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


@functools.lru_cache(maxsize=64)
def _empty_cache_program(config, batch, max_len, *, cache_dtype, stacked, rows):
  """The compiled maker of an empty cache, one per shape and placement: a
  jit of a fresh closure at every call would compile again at every call
  (0.1-0.2 s at every rollout, for SmolLM2 and for a 2-layer model alike)."""
  make = functools.partial(init_cache, config, batch, max_len, cache_dtype, stacked=stacked)
  return jax.jit(make, out_shardings=_like_rows(jax.eval_shape(make), rows))


def _like_rows(cache, sharding):
  """Shardings putting each cache array's batch axis (1 in a stacked [L, B,
  ...] array, else 0) where the rows of a [B, P] array with `sharding` are;
  None off a mesh."""
  if not isinstance(sharding, NamedSharding):
    return None
  rows = sharding.spec[0] if len(sharding.spec) else None
  stacked = not isinstance(cache['k'], list)

  def one(x, batch_axis):
    spec = [None] * x.ndim
    if x.ndim > batch_axis:
      spec[batch_axis] = rows
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))
  kv = lambda x: one(x, 1 if stacked else 0)
  return {'k': jax.tree.map(kv, cache['k']), 'v': jax.tree.map(kv, cache['v']),
          'positions': one(cache['positions'], 0), 'segment_ids': one(cache['segment_ids'], 0),
          'index': one(cache['index'], 0)}


def _scans(sampling: SamplingConfig, one_call: bool, on_kernels: bool = False) -> bool:
  """Whether the decode step scans over the layers (else it loops over them
  in Python): `sampling.scan_layers`, by default only in a program compiled
  for one call (a chat turn, the generate recipe's one batch), and not
  where the decode loop runs on jpost's CPU kernels (`on_kernels`):
  their packed weights would be sliced (copied) out of the stack for every
  layer at every token (SmolLM2 chat in bfloat16 on the 2-core EPYC: 16.0
  tokens/s scanning against 128.8 looping, 227 against 67 ms to the first
  token, for a first turn that compiles in 1.1 against 1.9 s).

  The loop decodes faster in a batch: each layer's weights and cache are
  read in place, where a scan slices them every step (bf16, batch 16: 514
  vs 432 tokens/s on the 2-core CPU; 28.7k vs 18.0k on an H100 at batch
  32). But XLA
  then compiles 30 blocks instead of one: a first call compiles for 9 s
  instead of 2.4 s on the CPU (float32, batch 1), and for 26-80 s instead
  of 9-11 s on an H100. A chat turn usually opens a new prompt-length
  bucket, so it waits for the compile; its reply is short, and on a GPU the
  scan even streams faster (fewer arguments per step: 412 vs 264 tokens/s
  on an H200).
  """
  if sampling.scan_layers is not None:
    return sampling.scan_layers
  return one_call and not on_kernels


def for_one_call(model, sampling: SamplingConfig) -> SamplingConfig:
  """`sampling` with its layer layout decided as for a program compiled for
  one call (`_scans`): a `generate` call that is the only one of its shapes
  (the generate recipe) or a chat turn (`stream`, whose weights `prepare`
  can then prepare once). Left to None: the scan, which compiles one block,
  except on the CPU kernels. configs/generate.py on the 2-core Zen 4 EPYC,
  float32, the whole run: 21.5 s with the loop, 14.0 s with the scan, the
  same answers."""
  if sampling.scan_layers is not None:
    return sampling
  on_kernels = cpu_decode.decodes_on_kernels(model.config.decode_kernels, model.config.dtype)
  return dataclasses.replace(sampling, scan_layers=_scans(sampling, True, on_kernels))


def _prefill(model, tokens, mask, cache, layers=None):
  """Runs the prompts into an empty cache: (last hidden [B, D], last position
  [B], cache). `layers`: the decode loop's prepared ones (`decode_layers`),
  which the prefill then reads too: sliced, cast and packed once per call,
  not once for the prefill and once for the loop (SmolLM2: 2 x 38 prompt
  tokens with one new token, 242 -> 213 ms; on the CPU decoding kernels,
  which ran even 2048 rows faster than XLA's matmuls, bench/RESULTS.md)."""
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  hidden, cache = model.hidden_states(tokens, positions, mask, cache, layers)
  return hidden[:, -1], positions[:, -1], cache


def _decode(model, token, pos, cache, layers=None, prefix=None):
  """One token per row at positions `pos`: (hidden [R, D], cache)."""
  hidden, cache = model.hidden_states(token[:, None], pos[:, None],
                                      jnp.ones((token.shape[0], 1), jnp.int32), cache, layers,
                                      prefix)
  return hidden[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(4, 5))
def _generate(graphdef, state, tokens, mask, prompt_cache, cache, key, sampling: SamplingConfig,
              layers=None, head=None):
  """(Completions, the filled caches). The caches are given (donated) and
  returned so that XLA fills them in place: kept inside, the decode loop
  wrote into a copy of the empty cache (SmolLM2, 2 prompts x 8 samples x 128
  tokens after 192: 97 MB more). `layers` and `head` (weight): prepared
  (`prepare`), or None to prepare them here."""
  model = nnx.merge(graphdef, state)
  batch = tokens.shape[0]
  n, samples = sampling.max_new_tokens, sampling.num_samples
  # Prefill once per prompt. The samples share that cache (read, never
  # copied) and write their own tokens into `cache`, [rows, max_new_tokens]:
  # each decode step reads a prompt's keys once for all its samples
  # (attention.shared_prefix_attention).
  stacked = not isinstance(cache['k'], list)
  # Sliced and cast once here (or given), for the prefill and every step of the loop.
  if layers is None:
    layers, head = model.decode_layers(stacked), model.head()[0]
  head = (head, model.config.tie_embeddings)  # a tied head is [V, D]
  last_hidden, last_pos, prompt_cache = _prefill(model, tokens, mask, prompt_cache, layers)
  repeat = lambda x: jnp.repeat(x, samples, axis=0)
  last_hidden, last_pos = repeat(last_hidden), repeat(last_pos)
  rows = batch * samples
  stop_ids = jnp.asarray(sampling.stop_ids, jnp.int32)

  key, sub = jax.random.split(key)
  on_kernels = cpu_decode.is_packed(head[0])
  first, raw_lp, sampled_lp = _pick(model.logits(last_hidden[:, None], head)[:, 0], sub, sampling,
                                    on_kernels)
  out = jnp.zeros((rows, n), jnp.int32).at[:, 0].set(first)
  raw_out = jnp.zeros((rows, n), jnp.float32).at[:, 0].set(raw_lp)
  sampled_out = jnp.zeros((rows, n), jnp.float32).at[:, 0].set(sampled_lp)
  done = jnp.isin(first, stop_ids)

  def cond(carry):
    step, _, _, _, done, *_ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, out, raw_out, sampled_out, done, cache, pos, key = carry
    pos = pos + 1
    hidden, cache = _decode(model, out[:, step - 1], pos, cache, layers, prompt_cache)
    key, sub = jax.random.split(key)
    token, raw_lp, sampled_lp = _pick(model.logits(hidden[:, None], head)[:, 0], sub, sampling,
                                      on_kernels)
    token = jnp.where(done, 0, token)
    out = out.at[:, step].set(token)
    raw_out = raw_out.at[:, step].set(raw_lp)
    sampled_out = sampled_out.at[:, step].set(sampled_lp)
    return step + 1, out, raw_out, sampled_out, done | jnp.isin(token, stop_ids), cache, pos, key

  step, out, raw_out, sampled_out, done, cache, *_ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), out, raw_out, sampled_out, done, cache, last_pos, key))
  # A token is in the completion if no stop token came strictly before it.
  is_stop = jnp.isin(out, stop_ids) & (jnp.arange(n)[None] < step)
  stopped_before = jnp.cumsum(is_stop, axis=1) - is_stop
  completion = (stopped_before == 0) & (jnp.arange(n)[None] < step)
  return Completions(
      tokens=jnp.where(completion, out, 0), mask=completion.astype(jnp.int32),
      logprobs=jnp.where(completion, raw_out, 0.0),
      sampling_logprobs=jnp.where(completion, sampled_out, 0.0),
      truncated=~jnp.any(is_stop, axis=1), lengths=jnp.sum(completion, axis=1)), (
          prompt_cache, cache)


# --- streaming (interactive chat): the same prefill / decode / pick, one token
# per host step so text can be shown as it comes.

@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _stream_prefill(graphdef, state, tokens, mask, cache, layers):
  """The prefill on the decode steps' layers (`_prepare`: sliced and cast
  in a compiled program, not op by op: 585 -> 495 ms to the first token,
  SmolLM2 float32 on CPU)."""
  return _prefill(nnx.merge(graphdef, state), tokens, mask, cache, layers)


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=(6,))
def _stream_step(graphdef, state, layers, head, hidden, pos, cache, key, sampling):
  model = nnx.merge(graphdef, state)
  head = (head, model.config.tie_embeddings)  # a tied head is [V, D]
  token = _pick(model.logits(hidden[:, None], head)[:, 0], key, sampling,
                cpu_decode.is_packed(head[0]))[0]
  hidden, cache = _decode(model, token, pos + 1, cache, layers)
  return token, hidden, pos + 1, cache


def stream(model, prompt: list[int], sampling: SamplingConfig, key=None, *,
           prepared: Prepared | None = None):
  """Yields the completion's token ids one by one (stop token last, if any).

  Prompts are left-padded to a multiple of 64 so that compilation is paid
  once per length bucket, not once per turn. `prepared`
  (`prepare(model, for_one_call(model, sampling))`, for the model's
  parameters as they are) saves each turn of a conversation preparing the
  decode weights again (SmolLM2 in bfloat16 on the CPU kernels: 57-68 ms of
  every turn's wait for its first token, on the 2-core Zen 4 EPYC).
  """
  tokens, mask = left_pad([prompt], 0, multiple=64)
  bucket = tokens.shape[1]
  if bucket + sampling.max_new_tokens > model.config.max_position_embeddings:
    raise ConfigError(f'conversation of {len(prompt)} tokens + max_new_tokens '
                     f'{sampling.max_new_tokens} exceeds the model context.')
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if key is None else key
  stacked = for_one_call(model, sampling).scan_layers
  _check_layout(prepared, stacked)
  cache = init_cache(model.config, 1, bucket + sampling.max_new_tokens, stacked=stacked)
  layers, head = (_prepare(graphdef, state, stacked) if prepared is None
                  else (prepared.layers, prepared.head))
  hidden, pos, cache = _stream_prefill(graphdef, state, tokens, mask, cache, layers)
  # The cache is updated in place (donated).
  for _ in range(sampling.max_new_tokens):
    key, sub = jax.random.split(key)
    token, hidden, pos, cache = _stream_step(graphdef, state, layers, head, hidden, pos, cache,
                                             sub, sampling)
    token = int(token[0])
    yield token
    if token in sampling.stop_ids:
      return
