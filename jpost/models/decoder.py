"""One Flax NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2/3, SmolLM2).

Layer parameters are stacked along a leading 'layers' axis and the forward
pass scans over them: one layer is traced and compiled once, whatever the
depth. The module holds parameters; the maths is pure functions over arrays.

Inputs follow the batch contract: `tokens`, `positions` and `segment_ids`
([B, T]; segment 0 = padding). A query attends to a key iff both are in the
same non-zero segment and the key's position is not after the query's, so
left padding and packed rows are handled by the same mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpost import sharding
from jpost.models.config import ModelConfig

# Large negative instead of -inf: a padding query (no visible key) then gets a
# uniform, finite softmax rather than NaNs that would leak into gradients.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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
  """The stacked [num_layers, ...] parameters of all decoder blocks."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    for name, (shape, axes) in layer_param_shapes(cfg).items():
      full = (cfg.num_layers, *shape)
      if name.endswith('norm'):
        value = jnp.ones(full, pdt)
      elif name.endswith('bias'):
        value = jnp.zeros(full, pdt)
      else:
        value = 0.02 * jax.random.normal(rngs.params(), full, pdt)
      setattr(self, name, nnx.Param(value, logical_axes=('layers', *axes)))


class Decoder(nnx.Module):
  """Llama-family causal decoder. `__call__` returns float32 logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    pdt = jnp.dtype(cfg.param_dtype)
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

  def hidden_states(self, tokens, positions, segment_ids, cache: dict | None = None):
    """Final-normed hidden states [B, T, D] (for heads) and the updated KV cache."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    layer_params = {name: getattr(self.layers, name)[...] for name in layer_param_shapes(cfg)}
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
    x = sharding.constrain(x, ('batch', 'seq', 'act_embed'))
    x, cache = decoder_stack(x, layer_params, positions, segment_ids, cfg, cache)
    return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), cache

  def logits(self, hidden):
    dtype = jnp.dtype(self.config.dtype)
    if self.config.tie_embeddings:
      return jnp.einsum('btd,vd->btv', hidden, self.embed[...].astype(dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum('btd,dv->btv', hidden, self.lm_head[...].astype(dtype),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
  """An empty KV cache: every slot has segment 0, so nothing attends to it.

  Keys are [layers, batch, kv_heads, head_dim, slots] and values [layers,
  batch, kv_heads, slots, head_dim]: the layouts the two attention matmuls
  read without transposing the cache (4x faster decoding on CPU).
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  l, k, h = cfg.num_layers, cfg.num_kv_heads, cfg.head_size
  return {
      'k': jnp.zeros((l, batch, k, h, max_len), dtype),
      'v': jnp.zeros((l, batch, k, max_len, h), dtype),
      'positions': jnp.zeros((batch, max_len), jnp.int32),
      'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
      'index': jnp.zeros((), jnp.int32),
  }


def decoder_stack(x, layer_params, positions, segment_ids, cfg: ModelConfig, cache=None):
  """Runs every block over x [B, T, D] with a scan over the stacked layers."""
  cos, sin = rope_tables(positions, cfg)
  new_mask = attention_mask(positions, segment_ids, positions, segment_ids, cfg.sliding_window)
  if cache is None:
    def block(x, params):
      return decoder_block(x, params, cos, sin, new_mask, cfg)[0], None
    if cfg.remat:
      block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    x, _ = jax.lax.scan(block, x, layer_params)
    return x, None

  # With a cache, new tokens attend to the cached slots (the slots about to be
  # written still have segment 0, so they are masked) and to each other. The
  # scan reads one layer of the cache at a time and returns only the new
  # keys/values; one update then writes them for all layers. Carrying the
  # cache through the scan, or returning whole layers, copies all of it per token.
  index = cache['index']
  cached_mask = attention_mask(positions, segment_ids, cache['positions'],
                               cache['segment_ids'], cfg.sliding_window)

  def cached_block(x, scanned):
    params, cache_k, cache_v = scanned
    return decoder_block(x, params, cos, sin, new_mask, cfg, (cache_k, cache_v, cached_mask))

  x, (new_k, new_v) = jax.lax.scan(cached_block, x, (layer_params, cache['k'], cache['v']))
  cache = dict(
      cache, index=index + x.shape[1],
      k=jax.lax.dynamic_update_slice(cache['k'], new_k.astype(cache['k'].dtype), (0, 0, 0, 0, index)),
      v=jax.lax.dynamic_update_slice(cache['v'], new_v.astype(cache['v'].dtype), (0, 0, 0, index, 0)),
      positions=jax.lax.dynamic_update_slice_in_dim(
          cache['positions'], positions.astype(jnp.int32), index, axis=1),
      segment_ids=jax.lax.dynamic_update_slice_in_dim(
          cache['segment_ids'], segment_ids.astype(jnp.int32), index, axis=1))
  return x, cache


def decoder_block(x, p, cos, sin, mask, cfg: ModelConfig, cached=None):
  """One pre-norm block: x + attn(norm(x)), then + SwiGLU(norm(x)).

  `cached` = (keys [B, K, H, S], values [B, K, S, H], mask [B, T, S]) of
  earlier tokens adds them to what the new tokens attend to. Returns (x,
  (new keys [B, K, H, T], new values [B, K, T, H])).
  """
  dtype = x.dtype
  b, t, _ = x.shape
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  w = {name: value.astype(dtype) for name, value in p.items()}

  act = rms_norm(x, w['attn_norm'], cfg.rms_norm_eps)
  q = jnp.einsum('btd,dq->btq', act, w['q'])
  key = jnp.einsum('btd,dq->btq', act, w['k'])
  val = jnp.einsum('btd,dq->btq', act, w['v'])
  if cfg.qkv_bias:
    q, key, val = q + w['q_bias'], key + w['k_bias'], val + w['v_bias']
  q_btnh = q.reshape(b, t, n, h)
  k_btkh, v_btkh = key.reshape(b, t, k, h), val.reshape(b, t, k, h)
  if cfg.qk_norm:
    q_btnh = rms_norm(q_btnh, w['q_norm'], cfg.rms_norm_eps)
    k_btkh = rms_norm(k_btkh, w['k_norm'], cfg.rms_norm_eps)
  q_btnh = apply_rope(q_btnh, cos, sin)
  k_bkht = apply_rope(k_btkh, cos, sin).transpose(0, 2, 3, 1)
  v_bkth = v_btkh.transpose(0, 2, 1, 3)
  parts = [(k_bkht, v_bkth, mask)]
  if cached is not None:
    cache_k, cache_v, cache_mask = cached
    parts.insert(0, (cache_k.astype(dtype), cache_v.astype(dtype), cache_mask))
  attn = attention(q_btnh, parts)
  out = jnp.einsum('btq,qd->btd', attn.reshape(b, t, n * h), w['o'])
  if cfg.o_bias:
    out = out + w['o_bias']
  x = x + out
  x = sharding.constrain(x, ('batch', 'seq', 'act_embed'))

  act = rms_norm(x, w['mlp_norm'], cfg.rms_norm_eps)
  gate = jnp.einsum('btd,df->btf', act, w['gate'])
  up = jnp.einsum('btd,df->btf', act, w['up'])
  hidden = sharding.constrain(jax.nn.silu(gate) * up, ('batch', 'seq', 'mlp'))
  x = x + jnp.einsum('btf,fd->btd', hidden, w['down'])
  return sharding.constrain(x, ('batch', 'seq', 'act_embed')), (k_bkht, v_bkth)


def rms_norm(x, weight, eps: float):
  """RMSNorm computed in float32 and cast back before the scale, as HF does."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def attention(q_btnh, parts):
  """Grouped-query attention: each of k heads serves n // k query heads.

  `parts` is a list of (keys [B, K, H, S_i], values [B, K, S_i, H], mask
  [B, T, S_i]) whose slots are attended jointly, one softmax over all of them
  (a KV cache and the new tokens, without concatenating them).
  """
  b, t, n, h = q_btnh.shape
  k = parts[0][0].shape[1]
  q_bkgth = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
  scores = [jnp.where(mask[:, None, None], jnp.einsum(
      'bkgth,bkhs->bkgts', q_bkgth, keys, preferred_element_type=jnp.float32) * (h ** -0.5),
                      _MASK_VALUE) for keys, _, mask in parts]
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out, start = 0, 0
  for keys, values, _ in parts:
    width = keys.shape[3]
    out = out + jnp.einsum('bkgts,bksh->bkgth', probs[..., start:start + width].astype(values.dtype),
                           values)
    start += width
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def attention_mask(q_pos, q_seg, k_pos, k_seg, sliding_window: int | None = None):
  """[B, T, S] bool: same non-zero segment and key position <= query position."""
  same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  causal = k_pos[:, None, :] <= q_pos[:, :, None]
  mask = same & causal
  if sliding_window is not None:
    mask &= q_pos[:, :, None] - k_pos[:, None, :] < sliding_window
  return mask


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


def apply_rope(x_btnh, cos, sin):
  """Rotate-half RoPE (HF layout), computed in float32."""
  x32 = x_btnh.astype(jnp.float32)
  half = x32.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x_btnh.dtype)
