"""One Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2/3, SmolLM2).

Layer parameters are stacked along a leading 'layers' axis and the training
forward pass scans over them: one layer is traced and compiled once,
whatever the depth. Generation loops over the layers instead, with
parameters sliced once and one KV-cache array per layer, so that a decode
step neither copies weights nor the cache; or, where compile time matters
more, it scans over the stacked layers and a stacked cache. The module holds
parameters; the maths is pure functions over arrays.

Inputs follow the batch contract: `tokens`, `positions` and `segment_ids`
([B, T]; segment 0 = padding). A query attends to a key iff both are in the
same non-zero segment and the key's position is not after the query's, so
left padding and packed rows are handled by the same mask.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint

from jpost import ops, sharding
from jpost.models import attention as attn
from jpost.models import cpu_decode, lora
from jpost.models.config import ModelConfig
from jpost.models.remat import loops_go_through_float32, remat, saved

def layer_param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Name -> (shape without the layer axis, logical axes) of each layer parameter."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
  q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
  shapes = {
      'attn_norm': ((d,), ('norm',)),
      'q': ((d, q), ('embed', 'q_heads')),
      'k': ((d, kv), ('embed', 'kv_heads')),
      'v': ((d, kv), ('embed', 'kv_heads')),
      'o': ((q, d), ('q_heads', 'embed')),
      'mlp_norm': ((d,), ('norm',)),
      'gate': ((d, f), ('embed', 'mlp')),
      'up': ((d, f), ('embed', 'mlp')),
      'down': ((f, d), ('mlp', 'embed')),
  }
  if cfg.qkv_bias:
    shapes |= {'q_bias': ((q,), ('q_heads',)), 'k_bias': ((kv,), ('kv_heads',)),
               'v_bias': ((kv,), ('kv_heads',))}
  if cfg.o_bias:
    shapes['o_bias'] = ((d,), ('norm',))
  if cfg.qk_norm:
    shapes |= {'q_norm': ((h,), ('head_dim',)), 'k_norm': ((h,), ('head_dim',))}
  return shapes


class Layers(nnx.Module):
  """The stacked [num_layers, ...] parameters of all decoder blocks (with
  LoRA, their adapters too, and a quantised base's codes and scales)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(lora.base_dtype(cfg))
    base_shapes = layer_param_shapes(cfg)
    for name, (shape, axes) in base_shapes.items():
      if lora.is_quantized(cfg, name):
        continue  # lora.add_variables holds it as codes + scales
      full = (cfg.num_layers, *shape)
      if name.endswith('norm'):
        value = jnp.ones(full, pdt)
      elif name.endswith('bias'):
        value = jnp.zeros(full, pdt)
      else:
        value = 0.02 * jax.random.normal(rngs.params(), full, pdt)
      setattr(self, name, nnx.Param(value, logical_axes=('layers', *axes)))
    lora.add_variables(self, cfg, base_shapes, rngs.params())


class Decoder(nnx.Module):
  """Llama-family causal decoder. `__call__` returns float32 logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pdt = jnp.dtype(lora.base_dtype(cfg))
    d, v = cfg.hidden_size, cfg.vocab_size
    self.embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (v, d), pdt),
                           logical_axes=('vocab', 'embed'))
    self.layers = Layers(cfg, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((d,), pdt), logical_axes=('norm',))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d, v), pdt),
                               logical_axes=('embed', 'vocab'))

  def __call__(self, tokens, positions, segment_ids):
    hidden, _ = self.hidden_states(tokens, positions, segment_ids)
    return self.logits(hidden)

  def hidden_states(self, tokens, positions, segment_ids, cache: dict | None = None,
                    layers: list[dict] | None = None, prefix: dict | None = None):
    """Final-normed hidden states [B, T, D] (for heads) and the updated KV cache.

    `layers` (from `decode_layers()`) are the per-layer parameters a decode
    loop prepared once, outside the loop. `prefix`: a filled cache of G
    prompts that the B = G x n rows of `cache` continue (see decoder_stack).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if layers is None:
      layers = self.stacked_layers()
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
    x = sharding.constrain(x, ('batch', 'seq', 'act_embed'))
    x, cache = decoder_stack(x, layers, positions, segment_ids, cfg, cache, prefix)
    return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), cache

  def shared_prompt_hidden_states(self, prompt_tokens, prompt_positions, prompt_segment_ids,
                                  tokens, positions, segment_ids):
    """Final-normed hidden states of G left-padded prompts [G, P] and of
    their R = G * n continuations [R, N] (row r continues prompt r // n),
    each prompt computed once: ([G, P, D], [R, N, D])."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    layers = self.stacked_layers()
    embed = lambda t: jnp.take(self.embed[...], t, axis=0).astype(dtype)
    xp, xc = shared_prompt_stack(embed(prompt_tokens), embed(tokens), layers, prompt_positions,
                                 prompt_segment_ids, positions, segment_ids, cfg)
    norm = lambda x: rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    return norm(xp), norm(xc)

  def stacked_layers(self) -> dict:
    """Name -> the [L, ...] array of every layer variable."""
    return {name: value[...] for name, value in vars(self.layers).items()
            if isinstance(value, nnx.Variable)}

  def decode_layers(self, stacked: bool = False) -> list[dict] | dict:
    """The layer parameters in the compute dtype, for a decode loop to
    prepare once: a list of per-layer dicts, or with `stacked` one dict of
    [L, ...] arrays (for a scan over the layers).

    A loop that decodes one token per step and reads the stacked [L, ...]
    parameters slices (copies) every layer's weights every step; on CPU that
    copy cost as much as the matmuls. Sliced and cast once, they are read in place.
    Where a decode loop runs on jpost's CPU kernels (cpu_decode), the weight
    matrices come packed for its matmul kernel, which `dense` then calls:
    per layer, straight from the stacks in one pass (`_packed_layer`).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    # Adapters folded into the kernels once: a decode step runs plain matmuls.
    stacked_params = lora.merged(self.stacked_layers(), cfg, dtype)

    def prepared(take, matrix_ndim):
      # Each layer's weights sliced from the stacks, then cast and packed:
      # whole stacks prepared first and then sliced were copied once more,
      # and q, k, v (gate, up) concatenated in float32 before packing
      # (SmolLM2's preparation 162 ms a generate call then, 88 now).
      p = {name: take(value).astype(dtype) for name, value in stacked_params.items()}
      # One wide matmul instead of three (q, k, v) and of two (gate, up): fewer,
      # larger operations are what a small-batch decode step is short of.
      for out, names in _SIDE_BY_SIDE.items():
        p[out] = _wide([p.pop(name) for name in names], cfg)
      return {name: _for_decoding(value, cfg) if value.ndim == matrix_ndim else value
              for name, value in p.items()}  # kernels: [(L,) K, N]

    if stacked:
      return prepared(lambda value: value, 3)
    if cpu_decode.decodes_on_kernels(cfg.decode_kernels, dtype):
      return [_packed_layer(stacked_params, i, cfg) for i in range(cfg.num_layers)]
    return [prepared(lambda value, i=i: value[i], 2) for i in range(cfg.num_layers)]

  def head(self):
    """The output projection in the compute dtype, as (weight, is [V, D]):
    what a decode loop computes once and passes to `logits`."""
    weight, is_vd = self._head_param()
    dtype = jnp.dtype(self.config.dtype)
    if (cpu_decode.decodes_on_kernels(self.config.decode_kernels, dtype)
        and cpu_decode.packs_in_one_pass([weight], is_vd)):
      return cpu_decode.pack_side_by_side([weight], w_is_fd=is_vd), is_vd
    return _for_decoding(weight.astype(dtype), self.config, is_vd), is_vd

  def _head_param(self):
    if self.config.tie_embeddings:
      return self.embed[...], True  # [V, D]
    return self.lm_head[...], False  # [D, V]

  def logits(self, hidden, head=None):
    """Float32 logits [B, T, V]."""
    weight, is_vd = self._head_param() if head is None else head
    return dense(hidden, weight, is_vd, True)

  def target_logprobs(self, hidden, targets, *, temperature: float = 1.0,
                      entropy: str = 'none', mask=None):
    """log p(targets [B, T]) after each of hidden [B, T, D] (and entropies,
    see ops.head_logprobs), `config.logits_chunk` positions at a time.
    With `mask` [B, T]: 0 outside it, where the head does not run
    (ops.head_masked_logprobs)."""
    if mask is not None:
      weight, is_vd = self._head_param()
      return ops.head_masked_logprobs(
          functools.partial(_head_logits, is_vd=is_vd, temperature=temperature), weight,
          hidden, targets, mask, chunk=self.config.logits_chunk, entropy=entropy)
    head = self._head_param()
    return ops.head_logprobs(lambda h: self.logits(h, head) / temperature, hidden, targets,
                             chunk=self.config.logits_chunk, entropy=entropy)

  def weighted_target_logprobs(self, hidden, targets, token_weights):
    """(sum of token_weights * log p(targets [B, T]), the log-probs without a
    gradient) after each of hidden [B, T, D], its gradient taken in the
    forward pass (ops.head_weighted_logprobs), `config.logits_chunk`
    positions at a time."""
    weight, is_vd = self._head_param()
    return ops.head_weighted_logprobs(functools.partial(_head_logits, is_vd=is_vd), weight,
                                      hidden, targets, token_weights,
                                      chunk=self.config.logits_chunk)


_SIDE_BY_SIDE = {'qkv': ('q', 'k', 'v'), 'gate_up': ('gate', 'up')}  # one matmul each


def _packed_layer(stacks: dict, i: int, cfg: ModelConfig) -> dict:
  """Layer i of the [L, ...] `stacks` for a decode loop on the CPU kernels:
  each weight matrix (q, k and v side by side, gate and up side by side)
  packed from its stacks in one pass (cpu_decode.pack_side_by_side); the
  rest, and any matrix that does not take, sliced, cast and packed as
  Decoder.decode_layers does otherwise."""
  joined = {name for names in _SIDE_BY_SIDE.values() for name in names}
  groups = _SIDE_BY_SIDE | {name: (name,) for name, value in stacks.items()
                            if value.ndim == 3 and name not in joined}
  layer, rest = {}, dict(stacks)
  for out, names in groups.items():
    parts = [stacks[name] for name in names]
    if cpu_decode.packs_in_one_pass(parts):
      layer[out] = cpu_decode.pack_side_by_side(parts, i)
      for name in names:
        del rest[name]
  dtype = jnp.dtype(cfg.dtype)
  sliced = {name: value[i].astype(dtype) for name, value in rest.items()}
  for out, names in _SIDE_BY_SIDE.items():
    if out not in layer:
      layer[out] = _wide([sliced.pop(name) for name in names], cfg)
  return layer | {name: _for_decoding(value, cfg) if value.ndim == 2 else value
                  for name, value in sliced.items()}


def _for_decoding(value, cfg: ModelConfig, w_is_fd: bool = False):
  """A decode loop's kernel ([..., K, N], or [..., N, K] with `w_is_fd`),
  packed for the CPU decoding matmul where `cpu_decode.decodes_on_kernels`
  says so and its shape packs (`dense` then runs it there), else as it is."""
  if not cpu_decode.decodes_on_kernels(cfg.decode_kernels, value.dtype):
    return value
  k, n = value.shape[-2:][::-1] if w_is_fd else value.shape[-2:]
  return cpu_decode.pack(value, w_is_fd) if cpu_decode.packable(k, n) else value


def _wide(parts, cfg: ModelConfig):
  """[..., K, N_i] weights side by side along N, packed for the decoding
  matmul when `_for_decoding` packs each part: packed blocks of columns
  concatenate along their own axis, so no unpacked copy is made first."""
  packed = [_for_decoding(part, cfg) for part in parts]
  if all(q.ndim == p.ndim + 2 for p, q in zip(parts, packed)):
    return jnp.concatenate(packed, axis=-4)
  return jnp.concatenate(parts, axis=-1)


def _head_logits(hidden, weight, *, is_vd: bool, temperature: float = 1.0):
  return dense(hidden, weight, is_vd, True) / temperature


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, *,
               stacked: bool = False) -> dict[str, Any]:
  """An empty KV cache: every slot has segment 0, so nothing attends to it.

  Keys are [batch, kv_heads, head_dim, slots] and values [batch, kv_heads,
  slots, head_dim]: the layouts the two attention matmuls read without
  transposing the cache (4x faster decoding on CPU). By default one array per
  layer, so that a decode step that loops over the layers writes each in
  place; with `stacked`, one [L, ...] array each for a scan over the layers.
  `dtype` is the storage dtype; by default `cache_storage_dtype(cfg.dtype,
  cfg.decode_kernels)`.
  """
  dtype = (jnp.dtype(dtype) if dtype is not None
           else cache_storage_dtype(cfg.dtype, cfg.decode_kernels))
  k, h = cfg.num_kv_heads, cfg.head_size
  key_shape, value_shape = (batch, k, h, max_len), (batch, k, max_len, h)
  if stacked:
    keys = jnp.zeros((cfg.num_layers, *key_shape), dtype)
    values = jnp.zeros((cfg.num_layers, *value_shape), dtype)
  else:
    keys = [jnp.zeros(key_shape, dtype) for _ in range(cfg.num_layers)]
    values = [jnp.zeros(value_shape, dtype) for _ in range(cfg.num_layers)]
  return {
      'k': keys,
      'v': values,
      'positions': jnp.zeros((batch, max_len), jnp.int32),
      'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
      'index': jnp.zeros((), jnp.int32),
  }


def cache_storage_dtype(compute_dtype, decode_kernels: str = 'xla'):
  """The dtype a KV cache is stored in: the compute dtype, except for 16-bit
  caches on CPU. XLA:CPU runs a bfloat16 dynamic-update-slice in float32,
  converting the whole cache there and back at every write (15 ms per
  decoded token for SmolLM2 at batch 32). So there the cache is float32,
  or, where the decode loop runs on the CPU decoding kernels
  (`cpu_decode.decodes_on_kernels(decode_kernels, ...)`), its bits as
  uint16, which are written in place and which the attention kernel reads
  as bfloat16: half the bytes a decode step reads (SmolLM2 at batch 16:
  865-890 -> 950-968 tokens/s). XLA's own decode attention over those bits
  ran slower than over float32 (598 -> 503-526), hence float32 there.
  Blocks read bits as the compute dtype through `_cache_view` (a bitcast)."""
  dtype = jnp.dtype(compute_dtype)
  if not loops_go_through_float32(dtype):
    return dtype
  bits = cpu_decode.decodes_on_kernels(decode_kernels, dtype)
  return jnp.dtype(jnp.uint16 if bits else jnp.float32)


def _write_slots(cache, new, start):
  """Writes `new` into `cache` at `start`: as its bits into a cache of bits,
  else rounded to new's dtype and stored in the cache's, so that a bfloat16
  model attends to bfloat16 keys whatever the storage."""
  if cache.dtype == jnp.uint16:
    new = jax.lax.bitcast_convert_type(new, jnp.uint16)
  else:
    new = new.astype(cache.dtype)
  return jax.lax.dynamic_update_slice(cache, new, start)


def _cache_view(stored, dtype):
  """A cache array in the compute `dtype`: its bits bitcast back, or as it is."""
  return jax.lax.bitcast_convert_type(stored, dtype) if stored.dtype == jnp.uint16 else stored


def decoder_stack(x, layer_params, positions, segment_ids, cfg: ModelConfig, cache=None,
                  prefix=None):
  """Runs every block over x [B, T, D].

  Without a cache (training), a scan over the stacked [L, ...] parameters:
  one layer is traced and compiled. With a cache (generation), a scan too
  when the cache is stacked, else a loop over the layers with `layer_params`
  either stacked or a list of per-layer dicts.

  `prefix`, with a cache: a filled cache (the same structure) of G prompts,
  read but not written, that the B = G x n rows continue (row b continues
  prompt b // n): the tokens attend to their prompt's keys there and to
  their own in `cache`, through dense masks (attention.shared_prefix_attention).
  """
  cos, sin = rope_tables(positions, cfg)
  if cache is None:
    visible = _layers_visibility(positions, segment_ids, positions, segment_ids, cfg)

    stacks, bits_of = _training_operands(layer_params, cfg)

    def block(x, params):
      params = _viewed(params, bits_of)
      return decoder_block(saved(x, 'layer_input'), params, cos, sin, visible, cfg)[0], None
    x, _ = jax.lax.scan(remat(block, cfg), x, stacks)
    return x, None

  # The new tokens' keys and values are written into each layer's cache
  # first, then the tokens attend over the whole cache (slots not yet written
  # have segment 0, so they are masked). Reading the buffer only after the
  # write lets XLA update it in place: reading it before made a copy of every
  # layer's cache per step.
  index = cache['index']
  cache_positions = jax.lax.dynamic_update_slice_in_dim(
      cache['positions'], positions.astype(jnp.int32), index, axis=1)
  cache_segments = jax.lax.dynamic_update_slice_in_dim(
      cache['segment_ids'], segment_ids.astype(jnp.int32), index, axis=1)
  if prefix is None:
    visible = _cache_visibility(positions, segment_ids, cache_positions, cache_segments, cfg)
    prefix_k = prefix_v = prefix_mask = None
  else:
    visible = attn.mask_of(positions, segment_ids, cache_positions, cache_segments,
                           cfg.sliding_window)
    # [B, T, P] from the G prompts' positions and segments (small integer arrays).
    per_prompt = lambda a: jnp.repeat(a, x.shape[0] // a.shape[0], axis=0)
    prefix_mask = attn.mask_of(positions, segment_ids, per_prompt(prefix['positions']),
                               per_prompt(prefix['segment_ids']), cfg.sliding_window)
    prefix_k, prefix_v = prefix['k'], prefix['v']
  if isinstance(cache['k'], list):
    if isinstance(layer_params, dict):
      layer_params = [{name: value[i] for name, value in layer_params.items()}
                      for i in range(cfg.num_layers)]
    if prefix is None:
      prefix_k = prefix_v = [None] * cfg.num_layers
    keys, values = [], []
    for params, cache_k, cache_v, shared_k, shared_v in zip(
        layer_params, cache['k'], cache['v'], prefix_k, prefix_v, strict=True):
      shared = None if prefix is None else (shared_k, shared_v, prefix_mask)
      x, (cache_k, cache_v) = decoder_block(x, params, cos, sin, visible, cfg,
                                            (cache_k, cache_v, index), shared)
      keys.append(cache_k)
      values.append(cache_v)
  else:  # stacked [L, ...] cache: one layer traced and compiled, as in training
    if not isinstance(layer_params, dict):
      raise TypeError('a stacked KV cache needs stacked layer parameters '
                      '(decode_layers(stacked=True)), not a list of layers.')
    stacks, bits_of = _loop_operands(layer_params, lambda name: True)  # nothing differentiated

    def block(x, params_and_cache):
      params, cache_k, cache_v, shared_k, shared_v = params_and_cache
      shared = None if prefix is None else (shared_k, shared_v, prefix_mask)
      return decoder_block(x, _viewed(params, bits_of), cos, sin, visible, cfg,
                           (cache_k, cache_v, index), shared)
    x, (keys, values) = jax.lax.scan(block, x,
                                     (stacks, cache['k'], cache['v'], prefix_k, prefix_v))
  return x, dict(cache, index=index + x.shape[1], k=keys, v=values, positions=cache_positions,
                 segment_ids=cache_segments)


def _layers_visibility(q_pos, q_seg, k_pos, k_seg, cfg: ModelConfig) -> attn.Visibility:
  """What queries see of keys in every layer, with the [B, T, S] mask made
  once for all of them where the keys fit in one block (B x T x S bytes, at
  most B x block^2). Made inside each layer, the rematerialised backward
  evaluated it once per head, in the softmax's fusion: a GRPO update of
  SmolLM2 ran 4% faster with it made here (bench/RESULTS.md)."""
  if k_seg.shape[1] > cfg.attention_block:
    return attn.Visibility(q_pos, q_seg, k_pos, k_seg)
  return attn.Visibility(q_pos, q_seg, k_pos, k_seg,
                         attn.mask_of(q_pos, q_seg, k_pos, k_seg, cfg.sliding_window))


def _cache_visibility(positions, segment_ids, cache_positions, cache_segments,
                      cfg: ModelConfig):
  """What new tokens see over the cache's S slots. A prefill of T > 1 tokens
  over a cache longer than one key block goes through `cfg.attention` (the
  blockwise path off GPU and for the fused kernels, which are self-attention
  only), so a long prompt never materialises [B, N, T, S] scores; a decode
  step (T = 1) takes the dense [B, 1, S] mask, cheaper than a scan over blocks."""
  implementation = attn.choose(cfg.attention, key_len=cache_segments.shape[1],
                               block=cfg.attention_block, sliding_window=cfg.sliding_window)
  if positions.shape[1] > 1 and implementation != 'xla':
    return attn.Visibility(positions, segment_ids, cache_positions, cache_segments)
  return attn.mask_of(positions, segment_ids, cache_positions, cache_segments,
                      cfg.sliding_window)


def decoder_block(x, p, cos, sin, visible, cfg: ModelConfig, cache=None, prefix=None):
  """One pre-norm block: x + attn(norm(x)), then + SwiGLU(norm(x)).

  `visible` is an attention.Visibility (positions and segments of queries
  and keys: `cfg.attention` picks the implementation) or, for a decode step
  or a prefill that `cfg.attention` keeps on 'xla', a dense mask [B, T, S].
  Without a cache the tokens attend to each other and the second output is
  their (keys [B, K, H, T], values [B, K, T, H]). With
  `cache` = (keys [B, K, H, S], values [B, K, S, H], slot index), the new
  keys and values are written at the index, the tokens attend over all S
  slots, and the updated cache arrays are returned. With `prefix` = (keys
  [G, K, H, P], values [G, K, P, H], mask [B, T, P]) as well, they attend to
  their prompt's keys there too (decoder_stack).
  """
  w = _block_weights(p, x.dtype, cfg)
  q, keys, values = _attention_inputs(x, w, cos, sin, cfg)
  if cache is None:
    return _block_output(x, _attend(q, keys, values, visible, cfg), w, cfg), (keys, values)
  cache_k, cache_v, index = cache
  stored = (_write_slots(cache_k, keys, (0, 0, 0, index)),
            _write_slots(cache_v, values, (0, 0, index, 0)))
  if (not isinstance(visible, attn.Visibility)
      and cpu_decode.decodes_on_kernels(cfg.decode_kernels, x.dtype)
      and cpu_decode.attends(q, stored[0])):
    attended = cpu_decode.attention(q, *stored, visible, prefix)  # reads the bits
  else:
    keys, values = (_cache_view(a, x.dtype) for a in stored)
    if prefix is not None:
      prefix_k, prefix_v, prefix_mask = prefix
      attended = attn.shared_prefix_attention(q, _cache_view(prefix_k, x.dtype),
                                              _cache_view(prefix_v, x.dtype), prefix_mask,
                                              keys, values, visible)
    else:
      attended = _attend(q, keys, values, visible, cfg)
  return _block_output(x, attended, w, cfg), stored


def _attend(q, keys, values, visible, cfg: ModelConfig, continuation: bool = False):
  if isinstance(visible, attn.Visibility):
    return attn.attend(q, keys, values, visible, implementation=cfg.attention,
                       block=cfg.attention_block, sliding_window=cfg.sliding_window,
                       max_segments=cfg.attention_max_segments, continuation=continuation)
  return attn.dense_attention(q, keys, values, visible)


def _block_weights(p, dtype, cfg: ModelConfig):
  # Matrices go to `dense` as stored (it casts); the small vectors are cast
  # here; a quantised kernel is dequantised here, inside its layer.
  p = lora.dequantized(p, cfg, dtype)
  return {name: value if value.ndim == 2 or name == 'dropout_key' else value.astype(dtype)
          for name, value in p.items()}


def _with_dropout_keys(layer_params: dict, cfg: ModelConfig) -> dict:
  """The stacked layer parameters plus one adapter-dropout key per layer,
  when a train update asked for dropout (lora.dropout)."""
  keys = lora.dropout_keys(cfg, cfg.num_layers)
  return layer_params if keys is None else layer_params | {'dropout_key': keys}


def _loop_operands(layer_params: dict, frozen) -> tuple[dict, dict]:
  """The stacked [L, ...] parameters as a scan over the layers slices them,
  and {name: dtype} of those it holds as bits (`_viewed` restores a layer's).

  Where loops go through float32 (XLA:CPU, 16-bit floats), a scan slicing a
  bfloat16 stack converts the whole stack to float32 before the loop, on
  every call: with LoRA's bfloat16 base, a float32 copy of every base kernel
  each step (424 MB for SmolLM2-135M); in a stacked decode step, of every
  weight each token (bench/RESULTS.md). Such stacks travel as their uint16
  bits instead (a bitcast: free), each layer's slice viewed back in the
  body. Integers carry no gradient, so only those `frozen(name)` marks as
  never differentiated go as bits."""
  stacks, bits_of = {}, {}
  for name, value in layer_params.items():
    if frozen(name) and loops_go_through_float32(value.dtype):
      bits_of[name] = value.dtype
      value = jax.lax.bitcast_convert_type(value, jnp.uint16)
    stacks[name] = value
  return stacks, bits_of


def _training_operands(layer_params: dict, cfg: ModelConfig) -> tuple[dict, dict]:
  """`_loop_operands` of a training forward: with the adapter-dropout keys,
  and only what is never differentiated (LoRA's frozen base) as bits."""
  return _loop_operands(_with_dropout_keys(layer_params, cfg),
                        lambda name: lora.frozen_in_training(cfg, name))


def _viewed(params: dict, bits_of: dict) -> dict:
  """One layer's parameters from `_loop_operands`, in their own dtypes."""
  return {name: jax.lax.bitcast_convert_type(value, bits_of[name]) if name in bits_of else value
          for name, value in params.items()}


def _project(x, w, name: str, cfg: ModelConfig):
  """x @ kernel `name`, plus its LoRA adapter's (scale * x @ A) @ B if it has one."""
  low = lora.adapter_input(x, w, name, cfg, dense)
  if low is None:
    return dense(x, w[name])
  if sharding.active_mesh_size() == 1:
    return saved(_adapted_dense(x, low, w[name], w[f'{name}_lora_b']), 'dense')
  # Over a mesh the joined weight would set a sharded axis beside an
  # unsharded one; not measured there, so the two matmuls stay apart.
  return dense(x, w[name]) + dense(low, w[f'{name}_lora_b'])


@jax.custom_vjp
def _adapted_dense(x, low, w, b):
  """x @ w + low @ b (x [..., D], low [..., r], w [D, F], b [r, F]) as one
  matmul of [x, low] by [w; b], summed in float32 and rounded once: the
  adapter's output is never written out, converted and added on its own
  (for SmolLM2 about 3.5 GB of memory traffic a LoRA step's forward on
  every kernel). Its backward takes x's and low's gradients from one
  matmul by [w; b] too; w's is computed apart, so that XLA drops it where
  the base is frozen (LoRA)."""
  joined = jnp.concatenate([x, low.astype(x.dtype)], axis=-1)
  weight = jnp.concatenate([w.astype(x.dtype), b.astype(x.dtype)], axis=0)
  return _matmul(joined, weight, '...d,df->...f').astype(x.dtype)


def _adapted_dense_fwd(x, low, w, b):
  return _adapted_dense(x, low, w, b), (x, low, w, b)


def _adapted_dense_bwd(res, g):
  x, low, w, b = res
  g = g.astype(x.dtype)
  weight = jnp.concatenate([w.astype(x.dtype), b.astype(x.dtype)], axis=0)
  d_joined = _matmul(g, weight, '...f,df->...d')
  d = x.shape[-1]
  return (d_joined[..., :d].astype(x.dtype), d_joined[..., d:].astype(low.dtype),
          _weight_gradient(x, g, w_is_fd=False).astype(w.dtype),
          _weight_gradient(low.astype(x.dtype), g, w_is_fd=False).astype(b.dtype))


_adapted_dense.defvjp(_adapted_dense_fwd, _adapted_dense_bwd)


def _attention_inputs(x, w, cos, sin, cfg: ModelConfig):
  """Queries [B, T, N, H] and keys [B, K, H, T] / values [B, K, T, H] of x."""
  b, t, _ = x.shape
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  if 'qkv' in w:  # fused by Decoder.decode_layers
    if cpu_decode.is_packed(w['qkv']):  # the norm inside the kernel's call
      qkv = cpu_decode.norm_matmul(x, w['attn_norm'], cfg.rms_norm_eps, w['qkv'])
    else:
      qkv = dense(rms_norm(x, w['attn_norm'], cfg.rms_norm_eps), w['qkv'])
    q, key, val = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
  else:
    act = rms_norm(x, w['attn_norm'], cfg.rms_norm_eps)
    q, key, val = (_project(act, w, name, cfg) for name in ('q', 'k', 'v'))
  if cfg.qkv_bias:
    q, key, val = q + w['q_bias'], key + w['k_bias'], val + w['v_bias']
  q_btnh = q.reshape(b, t, n, h)
  k_btkh, v_btkh = key.reshape(b, t, k, h), val.reshape(b, t, k, h)
  if cfg.qk_norm:
    q_btnh = rms_norm(q_btnh, w['q_norm'], cfg.rms_norm_eps)
    k_btkh = rms_norm(k_btkh, w['k_norm'], cfg.rms_norm_eps)
  # Kept under 'dots' (the name 'rope'): the attention's backward reads these
  # very arrays, which it would otherwise get by running RoPE again.
  q_btnh, k_btkh = (saved(apply_rope(a, cos, sin), 'rope') for a in (q_btnh, k_btkh))
  return q_btnh, k_btkh.transpose(0, 2, 3, 1), v_btkh.transpose(0, 2, 1, 3)


def _block_output(x, attn, w, cfg: ModelConfig):
  """x + o(attn), then the SwiGLU half of the block."""
  b, t, n, h = attn.shape
  if cpu_decode.is_packed(w['o']) and not cfg.o_bias:
    x = cpu_decode.matmul_add(attn.reshape(b, t, n * h), w['o'], x)
  else:
    out = _project(attn.reshape(b, t, n * h), w, 'o', cfg)
    if cfg.o_bias:
      out = out + w['o_bias']
    x = x + out
  x = sharding.constrain(x, ('batch', 'seq', 'act_embed'))

  if 'gate_up' in w and cpu_decode.is_packed(w['gate_up']) and cpu_decode.is_packed(w['down']):
    # A decode loop's on the CPU kernels: norm, both matmuls, SwiGLU and the
    # residual in two calls (cpu_matmul.cc).
    hidden = cpu_decode.norm_matmul(x, w['mlp_norm'], cfg.rms_norm_eps, w['gate_up'], True)
    return cpu_decode.matmul_add(hidden, w['down'], x)
  act = rms_norm(x, w['mlp_norm'], cfg.rms_norm_eps)
  if 'gate_up' in w:
    gate, up = jnp.split(dense(act, w['gate_up']), 2, axis=-1)
  else:
    gate, up = _project(act, w, 'gate', cfg), _project(act, w, 'up', cfg)
  hidden = sharding.constrain(swiglu(gate, up), ('batch', 'seq', 'mlp'))
  x = x + _project(hidden, w, 'down', cfg)
  return sharding.constrain(x, ('batch', 'seq', 'act_embed'))


def shared_prompt_stack(x_prompt, x_comp, layer_params, prompt_pos, prompt_seg, comp_pos,
                        comp_seg, cfg: ModelConfig):
  """Runs every block over G prompts [G, P, D] and their R = G * n
  completion rows [R, N, D] (row r continues prompt r // n), computing each
  prompt once instead of once per sample.

  Completions attend to their prompt's keys and values (repeated per row,
  so the backward pass sums the rows' gradients into the shared prompt) and
  causally to their own segment; the result equals running every prompt +
  completion through `decoder_stack`. A row may hold several completions of
  its prompt as segments 1, 2, ... (packed, rl_parts.pack_plan): the
  prompt's keys carry segment -1, which every real segment sees.
  """
  samples = x_comp.shape[0] // x_prompt.shape[0]
  prompt_seg, comp_seg = prompt_seg.astype(jnp.int32), comp_seg.astype(jnp.int32)
  repeat = lambda a: jnp.repeat(a, samples, axis=0)
  p_cos, p_sin = rope_tables(prompt_pos, cfg)
  c_cos, c_sin = rope_tables(comp_pos, cfg)
  prompt_visible = _layers_visibility(prompt_pos, prompt_seg, prompt_pos, prompt_seg, cfg)
  # A completion token sees its whole (real) prompt and its completion so far.
  comp_visible = _layers_visibility(
      comp_pos, comp_seg, jnp.concatenate([repeat(prompt_pos), comp_pos], axis=1),
      jnp.concatenate([jnp.where(repeat(prompt_seg) > 0, -1, 0), comp_seg], axis=1), cfg)

  stacks, bits_of = _training_operands(layer_params, cfg)

  def block(carry, params):
    xp, xc = saved(carry[0], 'layer_input'), saved(carry[1], 'layer_input')
    w = _block_weights(_viewed(params, bits_of), xp.dtype, cfg)
    pq, pk, pv = _attention_inputs(xp, w, p_cos, p_sin, cfg)
    cq, ck, cv = _attention_inputs(xc, w, c_cos, c_sin, cfg)
    keys = jnp.concatenate([repeat(pk), ck], axis=-1)
    values = jnp.concatenate([repeat(pv), cv], axis=-2)
    xp = _block_output(xp, _attend(pq, pk, pv, prompt_visible, cfg), w, cfg)
    # The completions' queries are the last of their keys' tokens: on CPU
    # the fused kernel runs them, reading only the keys each one sees.
    xc = _block_output(xc, _attend(cq, keys, values, comp_visible, cfg, continuation=True), w,
                       cfg)
    return (xp, xc), None

  (x_prompt, x_comp), _ = jax.lax.scan(remat(block, cfg), (x_prompt, x_comp), stacks)
  return x_prompt, x_comp


def dense(x, w, w_is_fd: bool = False, float32_out: bool = False):
  """x [..., D] @ w [D, F] (or w [F, D] with `w_is_fd`), accumulated in
  float32 and returned in x's dtype (or float32); w is cast to x's dtype and
  its gradient comes back in w's own (the master weights').

  Asking for a float32 result is what makes XLA:CPU run bfloat16 matmuls on
  the AVX512-BF16 dot instructions: 200-400 GFLOP/s on a 2-core EPYC against
  ~35 for a bfloat16 result. The custom gradient keeps the backward's two
  matmuls on that path too (autodiff would run them in float32).

  The result is named 'dense' for remat's 'dots' policy: a custom_vjp call
  is one opaque operation to JAX's dot-finding policies, which kept none of
  these outputs (so 'dots' recomputed as much as 'full').
  """
  if cpu_decode.is_packed(w):  # a decode loop's weight (Decoder.decode_layers)
    return cpu_decode.matmul(x, w, float32_out)
  return saved(_dense(x, w, w_is_fd, float32_out), 'dense')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, w, w_is_fd: bool = False, float32_out: bool = False):
  w_spec = 'fd' if w_is_fd else 'df'
  if w_is_fd and _sets_layouts(x):
    # As [tokens, D]: XLA:CPU turns x [..., T, D] @ w[F, D].T into a matmul
    # over w.T laid out in memory, a transposed copy of w on every call (the
    # tied LM head: 57 MB of bfloat16 a step), where [T, D] x [F, D] runs
    # as it stands (bench/RESULTS.md).
    out = _matmul(x.reshape(-1, x.shape[-1]), w.astype(x.dtype), 'td,fd->tf')
    out = out.reshape(*x.shape[:-1], out.shape[-1])
  else:
    out = _matmul(x, w.astype(x.dtype), f'...d,{w_spec}->...f')
  return out if float32_out else out.astype(x.dtype)


def _matmul(a, b, equation):
  return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def _dense_fwd(x, w, w_is_fd, float32_out):
  return _dense(x, w, w_is_fd, float32_out), (x, w)


def _dense_bwd(w_is_fd, float32_out, res, g):
  del float32_out
  x, w = res
  w_spec = 'fd' if w_is_fd else 'df'
  g, w_low = g.astype(x.dtype), w.astype(x.dtype)
  dx = _matmul(g, w_low, f'...f,{w_spec}->...d').astype(x.dtype)
  return dx, _weight_gradient(x, g, w_is_fd).astype(w.dtype)


def _weight_gradient(x, g, w_is_fd: bool):
  """x [..., D] and its output's gradient g [..., F] (x's dtype) -> the
  weight's gradient in float32, [D, F] (or [F, D] with `w_is_fd`)."""
  # The weight gradient contracts over tokens. XLA:CPU runs a bfloat16 matmul
  # on its fast kernels only when the left operand is contracted along its
  # last, contiguous axis; otherwise it converts both to float32 and runs a
  # generic kernel (2-3x slower alone, ~5% of a GRPO update). So one operand
  # is transposed in memory first: the narrower one where layouts are set
  # here. The MLP down projection's [tokens, 1536] input took 13 ms a layer
  # to transpose (5% of a SmolLM2 step's operation time); its [tokens, 576]
  # gradient and the [576, 1536] result cost less, and the step ran 2.4%
  # faster. The result is pinned row-major before its transpose: left to
  # XLA, the transpose folds into the matmul's output layout, and XLA:CPU
  # then fails to run it ("Unsupported element type for DotThunk").
  tokens_x, tokens_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if w_is_fd:
    dw = _matmul(_transposed(tokens_g), tokens_x, 'ft,td->fd')
  elif _sets_layouts(x) and tokens_g.shape[-1] < tokens_x.shape[-1]:
    dw = _matmul(_transposed(tokens_g), tokens_x, 'ft,td->fd')
    dw = with_layout_constraint(dw, Layout(major_to_minor=(0, 1))).T
  else:
    dw = _matmul(_transposed(tokens_x), tokens_g, 'dt,tf->df')
  return dw


def _sets_layouts(a) -> bool:
  """Whether matmul operands like `a` get their memory layout set here:
  16-bit ones on one CPU device (float32 kernels take either layout at the
  same speed; elsewhere XLA picks). Not over a mesh: there the layout
  constraint made XLA gather every device's rows first (the tied LM head's
  gradient on 8 CPU devices: an f32 [49152, 4096] all-gather, 805 MB on each
  device, bench/RESULTS.md)."""
  return (jax.default_backend() == 'cpu' and a.dtype.itemsize == 2
          and sharding.active_mesh_size() == 1)


def _transposed(a):
  """a.T, laid out row-major in memory where `_sets_layouts`."""
  if not _sets_layouts(a):
    return a.T
  return with_layout_constraint(a.T, Layout(major_to_minor=(0, 1)))


_dense.defvjp(_dense_fwd, _dense_bwd)


def rms_norm(x, weight, eps: float):
  """RMSNorm computed in float32 and cast back before the scale, as HF does.

  Over the tokens as rows of a 2-D array: for one packed row ([1, T, D],
  SFT's padding-free batches) XLA:CPU otherwise hands the backward's sum over
  D to YNNPACK as a reduction to [1, T, 1], which cost SmolLM2's SFT step 5%
  (bench/RESULTS.md); [B, T, D] with B > 1 it fuses into its own loops."""
  shape = x.shape
  x32 = x.astype(jnp.float32).reshape(-1, shape[-1])
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale_features(normed.astype(x.dtype).reshape(shape), weight.astype(x.dtype))


@jax.custom_vjp
def scale_features(x, w):
  """x [..., D] * w [D], whose weight gradient (a sum over every token) runs
  as a ones-vector matmul in float32. XLA:CPU lowers that sum, written as a
  reduction, to a tree of reduce-windows: 3 ms a call at 8 x 256 x 576, 60
  calls an SFT step of SmolLM2 (bench/RESULTS.md)."""
  return x * w


def _scale_features_fwd(x, w):
  return x * w, (x, w)


def _scale_features_bwd(residuals, g):
  x, w = residuals
  terms = (g.astype(jnp.float32) * x.astype(jnp.float32)).reshape(-1, x.shape[-1])
  w_grad = jnp.ones((1, terms.shape[0]), jnp.float32) @ terms
  return (g * w).astype(x.dtype), w_grad[0].astype(w.dtype)


scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


@jax.custom_vjp
def swiglu(gate, up):
  """silu(gate) * up, in float32 and rounded once to gate's dtype.

  The custom backward is one elementwise pass over gate, up and the
  cotangent. Autodiff of the composed ops ran as five or six fusions a
  layer on XLA:CPU, with bfloat16 <-> float32 converts written out between
  them: the SmolLM2 SFT step ran 2.7% and the GRPO update 5% faster without
  them (bench/RESULTS.md)."""
  return _swiglu(gate, up)


def _swiglu(gate, up):
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
  return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_hidden):
  gate, up = residuals
  g, u, d = (a.astype(jnp.float32) for a in (gate, up, d_hidden))
  s = jax.nn.sigmoid(g)
  d_up = d * g * s
  d_gate = d * u * s * (1 + g * (1 - s))  # silu'(g) = s + g s (1 - s)
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def rope_inv_freq(cfg: ModelConfig):
  """Inverse frequencies [H/2], with linear or Llama-3 scaling applied."""
  h = cfg.head_size
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  kind, s = cfg.rope_type, cfg.rope_params
  if kind == 'linear':
    inv_freq = inv_freq / s['factor']
  elif kind == 'llama3':
    # Long wavelengths are slowed by `factor`, short ones kept, and the band
    # in between interpolated smoothly (Llama 3.1 report, section 3).
    factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
    old_len = s['original_max_position_embeddings']
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    inv_freq = jnp.where(is_medium, smoothed, inv_freq)
  return inv_freq


def rope_tables(positions, cfg: ModelConfig):
  """cos, sin [B, T, H] in float32 for the given per-token positions."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


@jax.custom_vjp
def apply_rope(x_btnh, cos, sin):
  """Rotate-half RoPE (HF layout), computed in float32. Its gradient is the
  inverse rotation (no gradient reaches cos and sin: they come from
  positions)."""
  return _rotate(x_btnh, cos, sin, inverse=False)


def _rotate(x_btnh, cos, sin, *, inverse: bool):
  """x cos + rotate_half(x) sin, or with `inverse` the transpose of that
  map, x cos - rotate_half(x) sin (the tables repeat over the two halves,
  rope_tables, so sin commutes with rotate_half): in float32. Left
  to autodiff, the backward was two zero-padded halves added, which XLA:CPU
  fused with the attention's transposes into one slow loop
  (bench/RESULTS.md)."""
  x32 = x_btnh.astype(jnp.float32)
  half = x32.shape[-1] // 2
  sin = -sin if inverse else sin
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x_btnh.dtype)


def _apply_rope_fwd(x_btnh, cos, sin):
  return apply_rope(x_btnh, cos, sin), (cos, sin)


def _apply_rope_bwd(residuals, g):
  cos, sin = residuals
  return _rotate(g, cos, sin, inverse=True), None, None


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)
