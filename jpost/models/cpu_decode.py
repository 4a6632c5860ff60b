"""A decode step on CPU: its weight matmuls and its attention over the KV
cache on jpost's C++ kernels (cpu_matmul.cc, cpu_decode_attention.cc),
called through XLA's FFI.

A decode step multiplies a few rows (one a sequence) by every weight of the
model, then attends over each row's cache. XLA:CPU's bfloat16 matmuls read
the weights at those shapes well under the machine's bandwidth, and runs
the attention as some ten small operations a layer whose fixed cost
outweighs their arithmetic. The matmul kernel reads a weight packed as
[N/64, K/2, 64, 2] (`pack`, once per generate call), the layout its
AVX512-BF16 dot instruction takes; the attention kernel is one call a
layer over the cache (and a shared prompt's), stored as bfloat16 bits
(decoder.cache_storage_dtype), skipping masked slots (bench/RESULTS.md).

`decodes_on_kernels` is the one place that decides where they run: by
default (ModelConfig.decode_kernels='auto') bfloat16 compute on a single
CPU device whose processor has AVX512-BF16 and where both kernels build
(models/native.py); 'xla' turns them off. Elsewhere decoding uses XLA's
operations, as training always does. A weight packed by `pack` is a 4-D
array (5-D stacked over layers); `decoder.dense` sends those to `matmul`.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jpost.models import native

_MATMUL = ('cpu_matmul.cc', (('jpost_cpu_matmul_bf16', 'JpostMatmulBf16'),
                             ('jpost_cpu_matmul_f32', 'JpostMatmulF32'),
                             ('jpost_cpu_matmul_add', 'JpostMatmulAddBf16'),
                             ('jpost_cpu_norm_matmul', 'JpostNormMatmulBf16'),
                             ('jpost_cpu_norm_matmul_gated', 'JpostNormMatmulGatedBf16'),
                             ('jpost_cpu_pack', 'JpostPack')))
_ATTENTION = ('cpu_decode_attention.cc',
              (('jpost_cpu_decode_attention', 'JpostDecodeAttention'),
               ('jpost_cpu_decode_attention_shared', 'JpostDecodeAttentionShared')))
_SAMPLE = ('cpu_sample.cc', (('jpost_cpu_sample', 'JpostSample'),))
BLOCK = 64  # output columns a packed block holds (cpu_matmul.cc's kBlock)
CHOICES = ('auto', 'xla')  # ModelConfig.decode_kernels


def unavailable_reason() -> str | None:
  """None if the kernels are built and registered here, else why not."""
  return (native.unavailable_reason(*_MATMUL) or native.unavailable_reason(*_ATTENTION)
          or native.unavailable_reason(*_SAMPLE))


def decodes_on_kernels(choice: str, dtype) -> bool:
  """Whether a decode loop in compute `dtype` runs on the kernels.
  `choice` (ModelConfig.decode_kernels): 'xla' never; 'auto' for bfloat16
  on the CPU backend with one device (a packed weight is not sharded),
  where the kernels build. Says once on stderr why not, where only the
  kernels' absence stands in the way."""
  if choice not in CHOICES:
    raise ValueError(f'decode_kernels={choice!r}; use one of {CHOICES}.')
  return choice == 'auto' and _auto(jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=None)
def _auto(dtype_name: str) -> bool:
  if dtype_name != 'bfloat16' or jax.default_backend() != 'cpu' or jax.device_count() != 1:
    return False
  reason = unavailable_reason()
  if reason is not None:
    print(f'jpost: the CPU decoding kernels are not available ({reason}); '
          "decoding uses XLA's operations.", file=sys.stderr)
  return reason is None


# --- the weight matmuls ----------------------------------------------------------


def packable(k: int, n: int) -> bool:
  """Whether a [K, N] weight packs: N a multiple of 64, K even."""
  return n % BLOCK == 0 and k % 2 == 0


def pack(w, w_is_fd: bool = False):
  """w [..., K, N] (or [..., N, K] with `w_is_fd`) as [..., N/64, K/2, 64, 2]:
  for each block of 64 output columns, the inputs in pairs."""
  *lead, k, n = w.shape
  if w_is_fd:
    n, k = k, n
    blocks = w.reshape(*lead, n // BLOCK, BLOCK, k // 2, 2)
    return jnp.swapaxes(blocks, -3, -2)
  blocks = w.reshape(*lead, k // 2, 2, n // BLOCK, BLOCK)
  return jnp.moveaxis(blocks, (-2, -4, -1, -3), (-4, -3, -2, -1))


def packs_in_one_pass(parts, w_is_fd: bool = False) -> bool:
  """Whether `pack_side_by_side` takes these weights: float32 or bfloat16,
  [(L,) K, N] (or [(L,) N, K]) with the same K, N a multiple of 64 and K of 16."""
  def takes(w):
    k, n = w.shape[-2:][::-1] if w_is_fd else w.shape[-2:]
    return (w.ndim in (2, 3) and w.dtype in (jnp.float32, jnp.bfloat16) and n % BLOCK == 0
            and k % 16 == 0 and k == (parts[0].shape[-1] if w_is_fd else parts[0].shape[-2]))
  return all(takes(w) for w in parts)


def pack_side_by_side(parts, layer: int = 0, w_is_fd: bool = False):
  """concatenate([pack(w[layer].astype(bfloat16), w_is_fd) for w in parts],
  axis=0) in one pass over the weights (cpu_matmul.cc's Pack), where XLA's
  slice, convert, transpose and concatenate copied them several times.
  `parts`: [L, K, N_i] stacks (or [K, N_i] weights, layer 0) that
  `packs_in_one_pass`."""
  if not packs_in_one_pass(parts, w_is_fd):
    raise ValueError('pack_side_by_side: the weights are '
                     f'{[(w.dtype.name, w.shape) for w in parts]}; see packs_in_one_pass.')
  k = parts[0].shape[-1] if w_is_fd else parts[0].shape[-2]
  blocks = sum((w.shape[-2] if w_is_fd else w.shape[-1]) // BLOCK for w in parts)
  out = jax.ShapeDtypeStruct((blocks, k // 2, BLOCK, 2), jnp.bfloat16)
  return jax.ffi.ffi_call('jpost_cpu_pack', out)(*parts, layer=np.int64(layer),
                                                   w_is_fd=bool(w_is_fd))


def is_packed(w) -> bool:
  """Whether `w` (one layer's weight) is `pack`ed."""
  return w.ndim == 4


def matmul(x, packed, float32_out: bool = False):
  """x [..., K] @ the weight `packed` holds ([..., N]), accumulated in
  float32 and returned in bfloat16 (or float32)."""
  nb = packed.shape[0]
  rows = _rows(x, packed)
  out_dtype = jnp.float32 if float32_out else jnp.bfloat16
  out = jax.ffi.ffi_call(
      'jpost_cpu_matmul_f32' if float32_out else 'jpost_cpu_matmul_bf16',
      jax.ShapeDtypeStruct((rows.shape[0], nb * BLOCK), out_dtype))(rows, packed)
  return out.reshape(*x.shape[:-1], nb * BLOCK)


def matmul_add(x, packed, residual):
  """residual + `matmul`(x, packed), as decoder's x + dense(...) rounds
  it (the product to bfloat16, then the sum): one call, no operation of
  XLA's between them. residual [..., N] bfloat16."""
  rows = _rows(x, packed)
  n = packed.shape[0] * BLOCK
  if residual.shape != (*x.shape[:-1], n) or residual.dtype != jnp.bfloat16:
    raise ValueError(f'matmul_add: the residual is {residual.dtype}{list(residual.shape)}; '
                     f'expected bfloat16{[*x.shape[:-1], n]}.')
  out = jax.ffi.ffi_call('jpost_cpu_matmul_add',
                         jax.ShapeDtypeStruct((rows.shape[0], n), jnp.bfloat16))(
      rows, packed, residual.reshape(-1, n))
  return out.reshape(residual.shape)


def norm_matmul(x, norm_weight, eps: float, packed, gated: bool = False):
  """`matmul`(decoder.rms_norm(x, norm_weight, eps), packed) in one call,
  with the norm's roundings. `gated`: decoder.swiglu(gate, up) of the
  product's two halves of column blocks (a gate_up weight), [..., N/2]."""
  rows = _rows(x, packed)
  nb = packed.shape[0]
  if gated and nb % 2:
    raise ValueError(f'norm_matmul: a gated weight needs an even number of column blocks '
                     f'(gate and up side by side), not {nb}.')
  n = (nb // 2 if gated else nb) * BLOCK
  out = jax.ffi.ffi_call(
      'jpost_cpu_norm_matmul_gated' if gated else 'jpost_cpu_norm_matmul',
      jax.ShapeDtypeStruct((rows.shape[0], n), jnp.bfloat16))(
      rows, norm_weight.astype(jnp.bfloat16), packed, eps=np.float32(eps))
  return out.reshape(*x.shape[:-1], n)


def _rows(x, packed):
  """x [..., K] as bfloat16 rows [M, K], checked against the packed weight."""
  half_k = packed.shape[1]
  if x.shape[-1] != 2 * half_k:
    raise ValueError(f'x has {x.shape[-1]} features; the packed weight takes {2 * half_k}.')
  return x.reshape(-1, x.shape[-1]).astype(jnp.bfloat16)


# --- the attention over the cache -------------------------------------------------


def attends(q_btnh, keys) -> bool:
  """Whether a decoder block attends on the kernel: a decode step's
  bfloat16 queries (one new token a row, [B, 1, N, H]) over a cache of
  bfloat16 bits (keys [B, K, H, S] uint16), a head size that is a multiple
  of 16 and 1-8 query heads per key head. (The kernel takes any T; a
  prefill's many queries go to XLA's batched matmuls.)"""
  t, n, h, k = q_btnh.shape[1], q_btnh.shape[2], q_btnh.shape[3], keys.shape[1]
  return (t == 1 and q_btnh.dtype == jnp.bfloat16 and keys.dtype == jnp.uint16
          and h % 16 == 0 and n % k == 0 and 1 <= n // k <= 8)


def attention(q_btnh, keys, values, mask, prefix=None):
  """attention.dense_attention(q, keys, values, mask), or with `prefix` =
  (keys [G, K, H, P], values [G, K, P, H], mask [B, T, P])
  attention.shared_prefix_attention: queries [B, T, N, H] bfloat16, the
  cache's keys [B, K, H, S] and values [B, K, S, H] as bfloat16 bits
  (uint16), mask [B, T, S] bool. Returns [B, T, N, H] bfloat16."""
  b, t, _, h = q_btnh.shape
  k, s = keys.shape[1], keys.shape[-1]
  expected = {'keys': (keys.shape, (b, k, h, s)), 'values': (values.shape, (b, k, s, h)),
              'mask': (mask.shape, (b, t, s))}
  if prefix is not None:
    g, p = prefix[0].shape[0], prefix[0].shape[-1]
    expected |= {'prompt keys': (prefix[0].shape, (g, k, h, p)),
                 'prompt values': (prefix[1].shape, (g, k, p, h)),
                 'prompt mask': (prefix[2].shape, (b, t, p))}
  for name, (shape, want) in expected.items():
    if tuple(shape) != want:
      raise ValueError(f'cpu_decode.attention: {name} are {tuple(shape)}; expected {want} '
                       f'for queries {q_btnh.shape}.')
  out = jax.ShapeDtypeStruct(q_btnh.shape, q_btnh.dtype)
  mask = mask.astype(jnp.bool_)
  if prefix is None:
    return jax.ffi.ffi_call('jpost_cpu_decode_attention', out)(q_btnh, keys, values, mask)
  prefix_keys, prefix_values, prefix_mask = prefix
  return jax.ffi.ffi_call('jpost_cpu_decode_attention_shared', out)(
      q_btnh, prefix_keys, prefix_values, prefix_mask.astype(jnp.bool_), keys, values, mask)


# --- the draw from the logits -------------------------------------------------------


def draw(logits, uniform, temperature: float):
  """sampling._drawn over the temperature-`temperature` softmax of float32
  logits [R, V] with the uniform numbers [R] it would draw (the same blocks
  of 256 tokens, the same clamps), in one call (cpu_sample.cc): (tokens [R]
  int32, their log-probs at temperature 1, their log-probs under the
  temperature's softmax). At temperature 0, sampling.greedy_tokens (the
  uniform numbers unread) and a sampling log-prob of 0, a point mass's."""
  rows = logits.shape[0]
  if logits.ndim != 2 or uniform.shape != (rows,) or not temperature >= 0:
    raise ValueError(f'cpu_decode.draw: logits {logits.shape}, uniform {uniform.shape}, '
                     f'temperature {temperature}; expected [R, V], [R] and >= 0.')
  outs = (jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.float32),
          jax.ShapeDtypeStruct((rows,), jnp.float32))
  return jax.ffi.ffi_call('jpost_cpu_sample', outs)(
      logits.astype(jnp.float32), uniform.astype(jnp.float32),
      temperature=np.float32(temperature))


if __name__ == '__main__':  # python -m jpost.models.cpu_decode: build them and say so
  reason = unavailable_reason()
  print('jpost CPU decoding kernels:', 'available' if reason is None else f'unavailable: {reason}')
  sys.exit(0 if reason is None else 1)
