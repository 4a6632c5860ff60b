"""Attention implementations behind one function, chosen by name
(`ModelConfig.attention`; README, "Attention and memory").

- 'xla': scores [B, N, T, S] materialised, then softmax. The reference, and
  on a GPU the fastest where T x S is small.
- 'blockwise': online softmax over key blocks (pure JAX, every backend), with
  a recomputing backward, so memory is O(T x block) per head instead of
  O(T x S). The mask is built per block from positions and segment ids:
  packed rows stay packed, and no [T, S] mask exists anywhere. In
  self-attention the queries go in blocks too, and each query block visits
  only the key blocks up to its own, from its sliding window's start and
  from its queries' segments' start: about half the tiles of a long row,
  and of a row packed with short samples about their triangles only
  (README, "Attention and memory").
- 'pallas': the Pallas GPU (Triton) flash-attention kernel, which takes
  segment ids; causal by index, which for jpost's rows (positions rise by one
  within a segment) is causal by position. No sliding window; GQA by
  repeating K/V heads (the kernel needs equal head counts).
- 'cudnn': cuDNN's fused flash attention (Hopper or newer) in its packed
  layout: each row's segments (and padding runs) as start offsets and
  lengths, at most `max_segments` segments per row besides a padding run at
  either end (a row with more gets NaN outputs, which stop a run, rather
  than wrong ones). GQA without repeating K/V where this jax
  offsets packed keys right (`cudnn_offsets_follow_key_heads`); bfloat16 or
  float16 only; no sliding window. Reached through jax's private cuDNN
  module: the public `jax.nn.dot_product_attention` takes one length per
  row, not segments.
- 'cpu': jpost's fused CPU kernel (models/cpu_attention.py): packed
  self-attention, and queries that continue their keys' tokens (completions
  after their prompt's keys, `attend(continuation=True)`).
- 'auto': on CPU 'cpu' where the kernel applies (bfloat16, one device, no
  sliding window, the kernel built), else 'blockwise', even for keys that
  fit in one block: its backward recomputes the probabilities from the
  saved log-sum-exp, with fewer passes over [T, S] than autodiff of 'xla'
  (the SmolLM2 SFT step at 8 x 256 ran 2-8% faster, bench/RESULTS.md).
  Elsewhere 'xla' while the
  keys fit in one block; beyond that, on a GPU without a sliding window,
  'cudnn' for bfloat16/float16 compute on Hopper or newer, else 'pallas';
  on other backends 'blockwise'.

Queries are [B, T, N, H], keys [B, K, H, S], values [B, K, S, H] (K key/value
heads serve N // K query heads each), as in jpost.models.decoder.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jpost.models.remat import saved_residual

IMPLEMENTATIONS = ('auto', 'xla', 'blockwise', 'cpu', 'pallas', 'cudnn')

# Large negative instead of -inf: a padding query (no visible key) then gets a
# uniform, finite softmax rather than NaNs that would leak into gradients.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class Visibility(NamedTuple):
  """What each query may see, as positions and segment ids ([B, T] and
  [B, S]); segment 0 is padding, a negative key segment a prefix shared by
  every segment of the row (`mask_of`). A pytree: it passes through scans and jit.

  `mask`, where given, must be their [B, T, S] `mask_of` (sliding window
  included), made once before a loop over layers (models/decoder.py):
  recomputed inside each layer's rematerialised backward, XLA:CPU fused it
  into the softmax and evaluated it once per head. 'xla' and the blockwise
  path over given key blocks read it; the paths that make masks per tile
  (blockwise self-attention over several blocks, the GPU kernels) do not."""
  q_pos: jax.Array
  q_seg: jax.Array
  k_pos: jax.Array
  k_seg: jax.Array
  mask: jax.Array | None = None

  def dense_mask(self, sliding_window: int | None = None):
    """[B, T, S] bool: `mask` or `mask_of` the positions and segments."""
    if self.mask is not None:
      return self.mask
    return mask_of(self.q_pos, self.q_seg, self.k_pos, self.k_seg, sliding_window)


def mask_of(q_pos, q_seg, k_pos, k_seg, sliding_window: int | None = None):
  """[B, T, S] bool: same non-zero segment and key position <= query position.
  A negative key segment is a shared prefix: every real query of its row
  sees it (a prompt under several packed completions, rl_parts)."""
  q, k = q_seg[:, :, None], k_seg[:, None, :]
  same = ((q == k) & (k != 0)) | ((k < 0) & (q > 0))
  causal = k_pos[:, None, :] <= q_pos[:, :, None]
  mask = same & causal
  if sliding_window is not None:
    mask &= q_pos[:, :, None] - k_pos[:, None, :] < sliding_window
  return mask


def choose(name: str, *, key_len: int, block: int, sliding_window: int | None,
           dtype=None, backend: str | None = None, capability: float | None = None) -> str:
  """The implementation `name` resolves to for keys of `key_len` tokens in
  compute `dtype`; `capability`: the GPU's compute capability (None: ask
  the device)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'attention={name!r}; use one of {IMPLEMENTATIONS}.')
  if name != 'auto':
    return name
  backend = backend or jax.default_backend()
  if backend == 'cpu':
    return 'cpu' if _cpu_kernel_fits(dtype, sliding_window) else 'blockwise'
  if key_len <= block:
    return 'xla'
  if backend != 'gpu' or sliding_window is not None:
    return 'blockwise'
  # cuDNN's packed layout needs Hopper (9.0) and 16-bit inputs; there its
  # forward + backward ran 3.3x faster than the Pallas kernel's, and the 1B
  # SFT step 1.37x faster (bench/RESULTS.md, H200).
  if capability is None:
    capability = float(getattr(jax.devices()[0], 'compute_capability', 0) or 0)
  sixteen_bit = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return 'cudnn' if sixteen_bit and capability >= 9.0 else 'pallas'


def _cpu_kernel_fits(dtype, sliding_window) -> bool:
  """Whether 'auto' takes the fused CPU kernel (models/cpu_attention.py):
  bfloat16, no sliding window, one device (the kernel has no rule for
  splitting its operands over a mesh), and the kernel built here. It runs
  only the keys each query sees, without the blockwise path's separate
  passes over every score (bench/RESULTS.md measures both)."""
  if dtype is None or jnp.dtype(dtype) != jnp.bfloat16 or sliding_window is not None:
    return False
  if jax.device_count() != 1:
    return False
  from jpost.models import cpu_attention
  reason = cpu_attention.unavailable_reason()
  if reason is not None:
    _say_once(f'jpost: the fused CPU attention kernel is not available ({reason}); '
              'attention runs blockwise instead.')
  return reason is None


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
  import sys
  print(message, file=sys.stderr, flush=True)


def attend(q_btnh, keys, values, visible: Visibility, *, implementation: str, block: int,
           sliding_window: int | None = None, max_segments: int = 16,
           continuation: bool = False):
  """Attention output [B, T, N, H] by the named implementation.
  `continuation`: the caller's word that the queries are the last T of the
  keys' tokens, whose positions and segments `visible.k_pos` and `k_seg`
  hold (completions after their prompt's keys): the fused CPU kernel then
  runs them as the self-attention of those tokens."""
  name = choose(implementation, key_len=keys.shape[-1], block=block,
                sliding_window=sliding_window, dtype=q_btnh.dtype)
  if name == 'xla':
    return dense_attention(q_btnh, keys, values, visible.dense_mask(sliding_window))
  if name == 'cpu':
    return _cpu_attention(q_btnh, keys, values, visible, block=block,
                          sliding_window=sliding_window, asked=implementation == 'cpu',
                          continuation=continuation)
  if name in ('pallas', 'cudnn') and keys.shape[-1] != q_btnh.shape[1]:
    name = 'blockwise'  # the kernels are self-attention only; shared prompts are not
  if name in ('pallas', 'cudnn'):
    if jax.default_backend() != 'gpu':
      raise ValueError(f"attention='{name}' needs a GPU; use 'auto' (it picks per backend).")
    if sliding_window is not None:
      raise ValueError(f"attention='{name}' has no sliding window; use 'blockwise' or 'auto'.")
    if name == 'cudnn':
      return cudnn_attention(q_btnh, keys, values, visible, max_segments=max_segments)
    return pallas_attention(q_btnh, keys, values, visible)
  return blockwise_attention(q_btnh, keys, values, visible, block=block,
                             sliding_window=sliding_window)


def _cpu_attention(q_btnh, keys, values, visible: Visibility, *, block: int,
                   sliding_window: int | None, asked: bool, continuation: bool):
  """The fused CPU kernel where it applies (packed self-attention, or a
  `continuation` of the keys' tokens); other calls (a prefill over a cache)
  go blockwise, as they do for the GPU kernels, and so do shapes it does not
  take unless it was `asked` for by name."""
  from jpost.models import cpu_attention
  if jax.default_backend() != 'cpu':
    raise ValueError("attention='cpu' needs the CPU backend; use 'auto' (it picks per backend).")
  if sliding_window is not None:
    raise ValueError("attention='cpu' has no sliding window; use 'blockwise' or 'auto'.")
  cpu_attention.require()
  _, _, n, h = q_btnh.shape
  if not cpu_attention.supports(n, keys.shape[1], h, q_btnh.dtype):
    if asked:
      raise ValueError(f"attention='cpu' takes bfloat16 compute, a head size that is a "
                       f"multiple of 32 and 1-8 query heads per key head (here "
                       f"{q_btnh.dtype}, {h}, {n // keys.shape[1]}); use 'auto' or 'blockwise'.")
    return blockwise_attention(q_btnh, keys, values, visible, block=block)
  if continuation:
    return cpu_attention.attention(q_btnh, keys, values, visible.k_seg.astype(jnp.int32),
                                   visible.k_pos.astype(jnp.int32))
  if not _is_self_attention(q_btnh, keys, visible):
    return blockwise_attention(q_btnh, keys, values, visible, block=block)
  return cpu_attention.attention(q_btnh, keys, values, visible.q_seg.astype(jnp.int32),
                                 visible.q_pos.astype(jnp.int32))


def dense_attention(q_btnh, keys, values, mask):
  """The materialised reference: scores and softmax in float32, mask [B, T, S]."""
  b, t, n, h = q_btnh.shape
  k = keys.shape[1]
  q_bkgth = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
  scores = jnp.einsum('bkgth,bkhs->bkgts', q_bkgth, keys, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * (h ** -0.5), MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
  out = jnp.einsum('bkgts,bksh->bkgth', probs, values, preferred_element_type=jnp.float32)
  return out.astype(q_btnh.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def shared_prefix_attention(q_btnh, prefix_keys, prefix_values, prefix_mask, keys, values, mask):
  """`dense_attention` over a prefix shared by groups of rows, then each
  row's own keys: R = G x n query rows [R, T, N, H], where rows g*n .. g*n+n-1
  share prefix g (keys [G, K, H, P], values [G, K, P, H]); prefix_mask
  [R, T, P], own keys [R, K, H, S], values [R, K, S, H], mask [R, T, S].

  Equal to `dense_attention` over each row's copy of its prefix followed by
  its own keys (one softmax over both), without the copies: the n rows'
  queries meet the prefix in one matmul per group, which reads it once. A
  decode step of n samples of one prompt reads the prompt's cache once
  instead of n times (sampling.generate)."""
  r, t, n, h = q_btnh.shape
  g, k = prefix_keys.shape[0], prefix_keys.shape[1]
  rows = r // g
  # Queries as [G, K, rows x N/K x T, H]: one operand per group and key head.
  q_grouped = q_btnh.reshape(g, rows, t, k, n // k, h).transpose(0, 3, 1, 4, 2, 5)
  q_grouped = q_grouped.reshape(g, k, rows * (n // k) * t, h)
  scale = h ** -0.5
  shared = jnp.einsum('gkmh,gkhp->gkmp', q_grouped, prefix_keys,
                      preferred_element_type=jnp.float32)
  shared = shared.reshape(g, k, rows, n // k, t, -1)
  shared_mask = prefix_mask.reshape(g, rows, 1, 1, t, -1).transpose(0, 2, 1, 3, 4, 5)
  shared = jnp.where(shared_mask, shared * scale, MASK_VALUE)
  q_own = q_btnh.reshape(r, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
  own = jnp.einsum('rkgth,rkhs->rkgts', q_own, keys, preferred_element_type=jnp.float32)
  own = jnp.where(mask[:, None, None], own * scale, MASK_VALUE)
  # [R, K, N/K, T, S] -> [G, K, rows, N/K, T, S], beside the shared scores.
  own = own.reshape(g, rows, k, n // k, t, -1).transpose(0, 2, 1, 3, 4, 5)
  # One softmax over both parts, without concatenating them.
  top = jnp.maximum(shared.max(axis=-1, keepdims=True), own.max(axis=-1, keepdims=True))
  shared, own = jnp.exp(shared - top), jnp.exp(own - top)
  total = shared.sum(axis=-1, keepdims=True) + own.sum(axis=-1, keepdims=True)
  shared = (shared / total).astype(prefix_values.dtype).reshape(g, k, rows * (n // k) * t, -1)
  own = (own / total).astype(values.dtype)
  out = jnp.einsum('gkmp,gkph->gkmh', shared, prefix_values, preferred_element_type=jnp.float32)
  out = out.reshape(g, k, rows, n // k, t, h)
  own = own.transpose(0, 2, 1, 3, 4, 5).reshape(r, k, n // k, t, -1)
  own_out = jnp.einsum('rkgts,rksh->rkgth', own, values, preferred_element_type=jnp.float32)
  out = out.transpose(0, 2, 1, 3, 4, 5).reshape(r, k, n // k, t, h) + own_out
  return out.astype(q_btnh.dtype).transpose(0, 3, 1, 2, 4).reshape(r, t, n, h)


# --- blockwise: online softmax over key blocks ---------------------------------


def blockwise_attention(q_btnh, keys, values, visible: Visibility, *, block: int,
                        sliding_window: int | None = None):
  b, t, _, h = q_btnh.shape
  k, s = keys.shape[1], keys.shape[-1]
  self_attention = _is_self_attention(q_btnh, keys, visible)  # asked before keys are padded
  q_pos, q_seg, k_pos, k_seg = (a.astype(jnp.int32) for a in visible[:4])
  mask = visible.mask
  if self_attention and runs_in_halves(s, block):
    return _halved(q_btnh, keys, values, q_pos, q_seg, mask, sliding_window)
  block = min(block, s)
  pad = -s % block
  if pad:  # padded keys have segment 0: nothing sees them
    keys = jnp.pad(keys, ((0, 0), (0, 0), (0, 0), (0, pad)))
    values = jnp.pad(values, ((0, 0), (0, 0), (0, pad), (0, 0)))
    k_pos, k_seg = (jnp.pad(a, ((0, 0), (0, pad))) for a in (k_pos, k_seg))
    mask = None if mask is None else jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
  nb = (s + pad) // block
  # Key blocks along a leading axis, for a scan: [nb, B, K, H, blk] etc.
  k_blocks = keys.reshape(b, k, h, nb, block).transpose(3, 0, 1, 2, 4)
  v_blocks = values.reshape(b, k, nb, block, h).transpose(2, 0, 1, 3, 4)
  pos_blocks, seg_blocks = (a.reshape(b, nb, block).transpose(1, 0, 2) for a in (k_pos, k_seg))
  if self_attention and nb > 1:
    # Queries in blocks too, each seeing only the key blocks up to its own.
    q_pad = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
    out = _causal_flash(_to_bkgth(q_pad, k), k_blocks, v_blocks, pos_blocks, seg_blocks,
                        sliding_window)
    out = out[:, :, :, :t]
  else:
    # Key blocks of the given mask, [nb, B, T, blk]; None: made per block.
    mask_blocks = None if mask is None else mask.reshape(b, t, nb, block).transpose(2, 0, 1, 3)
    out = _flash(_to_bkgth(q_btnh, k), k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks,
                 sliding_window, mask_blocks)
  return _to_btnh(out.astype(q_btnh.dtype))


def _to_bkgth(a_btnh, k: int):
  """[B, T, N, ...] -> [B, K, G, T, ...]: query heads grouped by key head."""
  b, t, n = a_btnh.shape[:3]
  a = a_btnh.reshape(b, t, k, n // k, *a_btnh.shape[3:])
  return jnp.moveaxis(a, 1, 3)


def _to_btnh(a_bkgth):
  b, k, g, t = a_bkgth.shape[:4]
  return jnp.moveaxis(a_bkgth, 3, 1).reshape(b, t, k * g, *a_bkgth.shape[4:])


# Self-attention over one key block of at least this many keys runs as two
# halves of the queries, the first over the first half of the keys only: a
# quarter of the scores never computed, and smaller arrays for XLA:CPU's
# elementwise passes. SmolLM2's attention in bfloat16 on the 2-core AMX
# Xeon, forward + backward a layer: 8 x 256, 23.9-26.4 ms against 30.8
# (the forward alone 8.6-9.0 against 16.7-18.5; the SFT step 3-4% faster);
# 8 x 128, 7.5 against 8.5; 8 x 512, 103 against 143. Four or eight parts
# were no faster than two (bench/RESULTS.md).
HALVED_MIN_LEN = 128


def runs_in_halves(key_len: int, block: int) -> bool:
  """Whether blockwise self-attention over `key_len` keys takes that path:
  one key block (`_halved`, whose kept output is in the compute dtype)."""
  return HALVED_MIN_LEN <= key_len <= block


def _halves(t: int):
  """(first query, end query, keys) of each half: the first half of the
  queries sees only the first half of the keys."""
  half = t // 2
  return ((0, half, half), (half, t, t))


def _half_operands(q, keys, values, pos, seg, mask, lo, hi, n_keys):
  """`_flash`'s operands for queries [lo, hi) of q [B, K, G, T, H] over the
  first `n_keys` of keys [B, K, H, T] and values [B, K, T, H] (one key block)."""
  return dict(q=q[:, :, :, lo:hi], k_blocks=keys[None, ..., :n_keys],
              v_blocks=values[None, :, :, :n_keys], q_pos=pos[:, lo:hi], q_seg=seg[:, lo:hi],
              pos_blocks=pos[None, :, :n_keys], seg_blocks=seg[None, :, :n_keys],
              mask_blocks=None if mask is None else mask[None, :, lo:hi, :n_keys])


# Self-attention over one key block, in halves, as one custom_vjp whose
# output is already [B, T, N, H] in the compute dtype: that array is what the
# remat policies keep (not the float32 [B, K, G, T, H] of each half), and it
# is the o-projection's input as it stands, so the backward rebuilds nothing
# to reach it; the queries' gradient leaves as one [B, T, N, H] array, not
# two zero-padded halves added. The SmolLM2 SFT step on CPU: bench/RESULTS.md.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _halved(q_btnh, keys, values, pos, seg, mask, window):
  return _halved_fwd(q_btnh, keys, values, pos, seg, mask, window)[0]


def _halved_fwd(q_btnh, keys, values, pos, seg, mask, window):
  q = _to_bkgth(q_btnh, keys.shape[1])
  outs, lses = zip(*(_flash_forward(**_half_operands(q, keys, values, pos, seg, mask, *part),
                                    window=window)
                     for part in _halves(q_btnh.shape[1])))
  out = saved_residual(_to_btnh(jnp.concatenate(outs, axis=3).astype(q_btnh.dtype)),
                       'attention')
  lse = saved_residual(jnp.concatenate(lses, axis=3), 'attention')
  return out, (q_btnh, keys, values, pos, seg, mask, out, lse)


def _halved_bwd(window, residuals, d_out):
  q_btnh, keys, values, pos, seg, mask, out, lse = residuals
  k, t = keys.shape[1], q_btnh.shape[1]
  # sum(d_out * out) per query, from the kept output in the compute dtype
  # (as FlashAttention-2 keeps it), then to [B, K, G, T].
  delta = _to_bkgth(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), k)
  q, d_out_low = _to_bkgth(q_btnh, k), _to_bkgth(d_out.astype(q_btnh.dtype), k)
  dqs, dks, dvs = [], [], []
  for lo, hi, n_keys in _halves(t):
    dq, dk, dv = _flash_grads(**_half_operands(q, keys, values, pos, seg, mask, lo, hi, n_keys),
                              lse=lse[..., lo:hi], delta=delta[..., lo:hi],
                              d_out_low=d_out_low[:, :, :, lo:hi], window=window)
    dqs.append(dq)
    dks.append(jnp.pad(dk[0], ((0, 0),) * 3 + ((0, t - n_keys),)))
    dvs.append(jnp.pad(dv[0], ((0, 0),) * 2 + ((0, t - n_keys), (0, 0))))
  dq = _to_btnh(jnp.concatenate(dqs, axis=3).astype(q_btnh.dtype))
  return (dq, sum(dks).astype(keys.dtype), sum(dvs).astype(values.dtype), None, None, None)


_halved.defvjp(_halved_fwd, _halved_bwd)


def _is_self_attention(q_btnh, keys, visible: Visibility) -> bool:
  """Whether the queries are the keys' own tokens (a training or scoring
  forward: one Visibility built from one positions and one segments array),
  so that within a segment a later index is a later position and a query
  never sees a key after it. A KV cache or a shared prompt has other keys."""
  return (keys.shape[-1] == q_btnh.shape[1] and visible.q_pos is visible.k_pos
          and visible.q_seg is visible.k_seg)


def _block_scores(q, kb, q_pos, q_seg, kp, ks, window, mask=None):
  """Scaled, masked float32 scores [B, K, G, T, blk] of one key block
  (`mask` [B, T, blk]: its visibility, if already made)."""
  scores = jnp.einsum('bkgth,bkhs->bkgts', q, kb, preferred_element_type=jnp.float32)
  visible = (mask_of(q_pos, q_seg, kp, ks, window) if mask is None else mask)[:, None, None]
  return jnp.where(visible, scores * (q.shape[-1] ** -0.5), MASK_VALUE)


def _softmax_init(q):
  """(running max, sum, weighted values) before any key block. Starting at
  the mask value (not -inf) keeps a row with no visible key finite: every
  score equals the start, so it averages all values, as the materialised
  softmax does."""
  stats_shape = q.shape[:-1]
  return (jnp.full(stats_shape, MASK_VALUE, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros(q.shape, jnp.float32))


def _softmax_step(carry, q, kb, vb, q_pos, q_seg, kp, ks, window, mask=None):
  """The online softmax's state after one more key block."""
  m, l, acc = carry
  scores = _block_scores(q, kb, q_pos, q_seg, kp, ks, window, mask)
  m_new = jnp.maximum(m, scores.max(-1))
  correction = jnp.exp(m - m_new)
  p = jnp.exp(scores - m_new[..., None])
  pv = jnp.einsum('bkgts,bksh->bkgth', p.astype(vb.dtype), vb,
                  preferred_element_type=jnp.float32)
  return m_new, l * correction + p.sum(-1), acc * correction[..., None] + pv


def _tile_grads(q, d_out_low, lse, delta, kb, vb, q_pos, q_seg, kp, ks, window, mask=None):
  """(dq, dk, dv) float32 of one query x key tile, its probabilities
  recomputed from the saved log-sum-exp; `delta` is sum(d_out * out) per query."""
  low = q.dtype
  p = jnp.exp(_block_scores(q, kb, q_pos, q_seg, kp, ks, window, mask) - lse[..., None])
  dv = jnp.einsum('bkgts,bkgth->bksh', p.astype(low), d_out_low,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum('bkgth,bksh->bkgts', d_out_low, vb.astype(low),
                  preferred_element_type=jnp.float32)
  ds = (p * (dp - delta[..., None]) * q.shape[-1] ** -0.5).astype(low)
  dq = jnp.einsum('bkgts,bkhs->bkgth', ds, kb.astype(low), preferred_element_type=jnp.float32)
  dk = jnp.einsum('bkgts,bkgth->bkhs', ds, q, preferred_element_type=jnp.float32)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, window, mask_blocks):
  return _flash_fwd(q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, window,
                    mask_blocks)[0]


def _flash_forward(q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, window,
                   mask_blocks):
  """Output [B, K, G, T, H] (float32) and the row log-sum-exp [B, K, G, T]:
  nothing of size T x S is kept (but a given mask)."""
  def step(carry, blocks):
    kb, vb, kp, ks, mask = blocks
    return _softmax_step(carry, q, kb, vb, q_pos, q_seg, kp, ks, window, mask), None

  (m, l, acc), _ = jax.lax.scan(step, _softmax_init(q),
                                (k_blocks, v_blocks, pos_blocks, seg_blocks, mask_blocks))
  return acc / l[..., None], m + jnp.log(l)


def _flash_fwd(q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, window, mask_blocks):
  out, lse = _flash_forward(q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, window,
                            mask_blocks)
  out, lse = saved_residual(out, 'attention'), saved_residual(lse, 'attention')
  return out, (q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, mask_blocks, out,
               lse)


def _flash_grads(q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, mask_blocks, lse,
                 delta, d_out_low, window):
  """float32 (dq, dk blocks, dv blocks), each block's probabilities
  recomputed from the saved log-sum-exp."""
  def step(dq, blocks):
    kb, vb, kp, ks, mask = blocks
    dq_tile, dk, dv = _tile_grads(q, d_out_low, lse, delta, kb, vb, q_pos, q_seg, kp, ks, window,
                                  mask)
    return dq + dq_tile, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32),
                              (k_blocks, v_blocks, pos_blocks, seg_blocks, mask_blocks))
  return dq, dk, dv


def _flash_bwd(window, residuals, d_out):
  q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks, mask_blocks, out, lse = residuals
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)  # [B, K, G, T]
  dq, dk, dv = _flash_grads(q, k_blocks, v_blocks, q_pos, q_seg, pos_blocks, seg_blocks,
                            mask_blocks, lse, delta, d_out.astype(q.dtype), window)
  return (dq.astype(q.dtype), dk.astype(k_blocks.dtype), dv.astype(v_blocks.dtype), None, None,
          None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# Self-attention skips the tiles that hold no visible key: the key blocks
# after each query block, those before its sliding window, and those before
# the earliest segment its queries are in (and, for the backward's loop over
# query blocks, those after the last segment a key block's keys are in),
# bounded over every row of the batch. Rows are causal by index
# there (_is_self_attention), and a segment is one run of its row, gaps of
# padding aside (every jpost packer writes rows so), so a packed row of many
# short samples visits about its samples' triangles instead of the whole
# row's: the tiles the mask would only zero.


def visible_spans(seg):
  """([B, T] int32) per token of seg [B, T]: the first index its queries may
  see, and one past the last index whose queries may see it as a key. A
  segment's span runs from its first to its last token across padding gaps;
  a shared prefix (negative segment) is seen by every later query of its
  row; a padding token's span is itself (it sees nothing, nothing sees it)."""
  b, t = seg.shape
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  real = seg != 0
  # The last real segment at or before each token, and at or after it.
  before = jax.lax.cummax(jnp.where(real, index, -1), axis=1)
  after = jax.lax.cummin(jnp.where(real, index, t), axis=1, reverse=True)
  seg_before = jnp.take_along_axis(seg, jnp.maximum(before, 0), axis=1)
  seg_after = jnp.take_along_axis(seg, jnp.minimum(after, t - 1), axis=1)
  prev_before = jnp.concatenate([jnp.zeros((b, 1), seg.dtype), seg_before[:, :-1]], axis=1)
  next_after = jnp.concatenate([seg_after[:, 1:], jnp.zeros((b, 1), seg.dtype)], axis=1)
  # A run starts at a real token whose segment differs from the last real
  # one before it, and ends likewise; a padding token is a run of its own.
  starts = jax.lax.cummax(jnp.where(real & (seg != prev_before), index, 0), axis=1)
  ends = jax.lax.cummin(jnp.where(real & (seg != next_after), index + 1, t), axis=1,
                        reverse=True)
  prefix = jnp.where(seg < 0, index, t).min(axis=1, keepdims=True)
  first_seen = jnp.where(real, jnp.minimum(starts, prefix), index)
  last_seeing = jnp.where(seg < 0, t, jnp.where(real, ends, index + 1))
  return first_seen, last_seeing


def _block_ranges(pos_blocks, seg_blocks, window):
  """Per query block i, the first key block it may see; per key block j,
  one past the last query block that may see it ([nb] int32 each, over
  every row of the batch) from pos_blocks and seg_blocks [nb, B, blk]."""
  nb, b, block = seg_blocks.shape
  pos, seg = (jnp.moveaxis(a, 0, 1).reshape(b, nb * block) for a in (pos_blocks, seg_blocks))
  first_seen, last_seeing = visible_spans(seg)
  blocks = jnp.arange(nb, dtype=jnp.int32)
  lo = first_seen.reshape(b, nb, block).min(axis=(0, 2)) // block
  hi = (last_seeing.reshape(b, nb, block).max(axis=(0, 2)) + block - 1) // block
  if window is not None:
    # The window counts positions; it bounds indices only where a visible
    # key is as many indices back as positions: no shared prefix, and
    # positions rising by one per index through each run (no padding gap).
    # Elsewhere (a prefix under several completions) the segments bound alone.
    index = jnp.arange(nb * block, dtype=jnp.int32)
    start_offset = jnp.take_along_axis(pos - index, first_seen, axis=1)
    by_index = jnp.all((seg == 0) | ((seg > 0) & (pos - index == start_offset)))
    lo = jnp.where(by_index, jnp.maximum(lo, (blocks * block - window + 1) // block), lo)
    hi = jnp.where(by_index,
                   jnp.minimum(hi, (blocks * block + block + window - 2) // block + 1), hi)
  return jnp.clip(lo, 0, blocks), jnp.clip(hi, blocks + 1, nb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _causal_flash(q, k_blocks, v_blocks, pos_blocks, seg_blocks, window):
  return _causal_fwd(q, k_blocks, v_blocks, pos_blocks, seg_blocks, window)[0]


def _take(a, i):
  """Block i of blocks stacked along the leading axis (i traced)."""
  return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _query_blocks(a, nb):
  """[B, K, G, T, ...] -> [nb, B, K, G, T / nb, ...]."""
  b, k, g, t = a.shape[:4]
  a = a.reshape(b, k, g, nb, t // nb, *a.shape[4:])
  return jnp.moveaxis(a, 3, 0)


def _from_query_blocks(a):
  a = jnp.moveaxis(a, 0, 3)
  return a.reshape(*a.shape[:3], a.shape[3] * a.shape[4], *a.shape[5:])


def _causal_fwd(q, k_blocks, v_blocks, pos_blocks, seg_blocks, window):
  nb = k_blocks.shape[0]
  first_block, _ = _block_ranges(pos_blocks, seg_blocks, window)

  def query_block(_, xs):
    i, lo, qb, qp, qs = xs
    key_block = lambda j, carry: _softmax_step(carry, qb, _take(k_blocks, j), _take(v_blocks, j),
                                               qp, qs, _take(pos_blocks, j), _take(seg_blocks, j),
                                               window)
    m, l, acc = jax.lax.fori_loop(lo, i + 1, key_block, _softmax_init(qb))
    return None, (acc / l[..., None], m + jnp.log(l))

  _, (out, lse) = jax.lax.scan(query_block, None, (jnp.arange(nb), first_block,
                                                   _query_blocks(q, nb), pos_blocks, seg_blocks))
  out = saved_residual(_from_query_blocks(out), 'attention')
  lse = saved_residual(_from_query_blocks(lse), 'attention')
  return out, (q, k_blocks, v_blocks, pos_blocks, seg_blocks, out, lse)


def _causal_bwd(window, residuals, d_out):
  q, k_blocks, v_blocks, pos_blocks, seg_blocks, out, lse = residuals
  nb = k_blocks.shape[0]
  _, end_block = _block_ranges(pos_blocks, seg_blocks, window)
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)
  q_b, do_b = _query_blocks(q, nb), _query_blocks(d_out.astype(q.dtype), nb)
  lse_b, delta_b = _query_blocks(lse, nb), _query_blocks(delta, nb)

  def key_block(dq, xs):
    j, hi, kb, vb, kp, ks = xs

    def query_block(i, carry):
      dq, dk, dv = carry
      dq_tile, dk_tile, dv_tile = _tile_grads(
          _take(q_b, i), _take(do_b, i), _take(lse_b, i), _take(delta_b, i), kb, vb,
          _take(pos_blocks, i), _take(seg_blocks, i), kp, ks, window)
      dq = jax.lax.dynamic_update_index_in_dim(dq, _take(dq, i) + dq_tile, i, 0)
      return dq, dk + dk_tile, dv + dv_tile

    init = (dq, jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(j, hi, query_block, init)
    return dq, (dk.astype(kb.dtype), dv.astype(vb.dtype))

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q_b.shape, jnp.float32),
                              (jnp.arange(nb), end_block, k_blocks, v_blocks, pos_blocks,
                               seg_blocks))
  return _from_query_blocks(dq).astype(q.dtype), dk, dv, None, None


_causal_flash.defvjp(_causal_fwd, _causal_bwd)


# --- pallas: the Triton flash-attention kernel with segment ids (GPU) ----------


def pallas_attention(q_btnh, keys, values, visible: Visibility, *, interpret: bool = False,
                     block: int = 128):
  """Self-attention over packed/padded rows by the Pallas GPU kernel.

  `interpret` runs the kernel's program in the Pallas interpreter (any
  backend, slow): how the CPU tests check it. Queries and keys must be the
  same tokens (training and scoring, not a KV cache)."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
  b, t, n, h = q_btnh.shape
  k = keys.shape[1]
  if keys.shape[-1] != t:
    raise ValueError("attention='pallas' is self-attention: use 'xla' or 'blockwise' with a "
                     'KV cache or shared prompts.')
  groups = n // k
  k_btnh = jnp.repeat(keys.transpose(0, 3, 1, 2), groups, axis=2)
  v_btnh = jnp.repeat(values.transpose(0, 2, 1, 3), groups, axis=2)
  small = min(32, block)  # the backward's blocks
  pad = -t % block
  seg = visible.q_seg.astype(jnp.int32)
  if pad:  # the kernel needs whole blocks; padding after the row is segment 0
    q_btnh, k_btnh, v_btnh = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
                              for a in (q_btnh, k_btnh, v_btnh))
    seg = jnp.pad(seg, ((0, 0), (0, pad)))
  sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=small,
                                block_kv_dkv=small, block_q_dq=small, block_kv_dq=small)
  # A padding query (segment 0) sees only padding keys here, the reference
  # sees every key: both are ignored downstream, as no real token sees them.
  out = pallas_gpu.mha(q_btnh, k_btnh, v_btnh, seg, sm_scale=h ** -0.5, causal=True,
                       block_sizes=sizes, interpret=interpret)
  return out[:, :t]


# --- cudnn: cuDNN's flash attention over packed segments (GPU) ----------------


def segment_spans(seg, max_spans: int):
  """Rows of segment ids [B, T] in cuDNN's packed layout: (lengths [B, M],
  starts [B, M + 1], overflow [B]) with M = max_spans. A span is a run of one
  id, padding (id 0) included: every query then lies in a span and sees at
  least itself. A query in no span has no visible key, and cuDNN's backward
  turns such a row into NaN gradients for the whole step (seen on an H200,
  jax 0.11.2). Padding runs see only padding, whose outputs are zeroed, so
  real tokens see exactly the reference's keys. Entries past a row's last
  span are -1, as cuDNN wants them; `overflow` marks rows with more than M
  spans, whose later spans are left out."""
  seg = seg.astype(jnp.int32)
  before = jnp.pad(seg, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  opens = seg != before  # the first token always opens a span
  count = jnp.sum(opens, axis=1)
  run = jnp.cumsum(opens, axis=1) - 1
  lengths = jax.vmap(lambda r: jnp.zeros(max_spans, jnp.int32).at[r].add(1, mode='drop'))(run)
  starts = jax.vmap(lambda o: jnp.nonzero(o, size=max_spans, fill_value=-1)[0])(opens)
  present = jnp.arange(max_spans) < count[:, None]
  lengths = jnp.where(present, lengths, -1)
  starts = jnp.pad(jnp.where(present, starts, -1).astype(jnp.int32), ((0, 0), (0, 1)),
                   constant_values=-1)
  return lengths, starts, count > max_spans


def cudnn_span_slots(max_segments: int) -> int:
  """Span slots cuDNN's packed layout is compiled with: the segments and a
  padding run at either end of a row."""
  return max_segments + 2


def cudnn_attention(q_btnh, keys, values, visible: Visibility, *, max_segments: int):
  """Self-attention over packed/padded rows by cuDNN's fused kernel: causal
  by index within each segment, which for jpost's rows (positions rise by
  one within a segment) is causal by position, as in 'pallas'. Rows hold up
  to `max_segments` segments plus a padding run at either end."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  b, t, n, h = q_btnh.shape
  if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention='cudnn' takes bfloat16 or float16 compute, not "
                     f"{q_btnh.dtype}; set the model's dtype or use 'auto'.")
  if keys.shape[1] != n and not cudnn_offsets_follow_key_heads():
    keys, values = (jnp.repeat(a, n // keys.shape[1], axis=1) for a in (keys, values))
  lengths, starts, overflow = segment_spans(visible.q_seg, cudnn_span_slots(max_segments))
  out = cudnn.dot_product_attention(
      q_btnh, keys.transpose(0, 3, 1, 2), values.transpose(0, 2, 1, 3),
      q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts, kv_offsets=starts,
      scale=h ** -0.5, mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout='BTNH')
  # Padding queries attended padding: their outputs (and so the gradients
  # they send back) are zero. A row with too many segments is poisoned, not
  # wrong.
  real = (visible.q_seg > 0)[:, :, None, None]
  out = jnp.where(real, out, jnp.zeros((), out.dtype))
  return jnp.where(overflow[:, None, None, None], jnp.full((), jnp.nan, out.dtype), out)


@functools.cache
def cudnn_offsets_follow_key_heads() -> bool:
  """Whether this jax scales the keys' packed offsets by the keys' own head
  count. Earlier versions scaled them by the queries' (fixed upstream in
  jax-ml/jax#39521, July 2026): under GQA the keys' offsets then point at
  other tokens, silently, so `cudnn_attention` repeats K/V heads there.
  Asked of jax's own offset function at trace time; if it cannot be asked,
  the answer is no."""
  try:
    return _cudnn_key_token_stride() == 8
  except Exception:  # a renamed or reshaped private function: take the safe path
    return False


def _cudnn_key_token_stride() -> int:
  """The per-token stride jax's packed layout gives keys of 1 head x 8 beside
  queries of 2 heads x 8: 8 (the keys' own) or 16 (the queries')."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  with jax.ensure_compile_time_eval():  # concrete even inside a jit trace
    query, key = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 1, 8))
    lengths, offsets = jnp.array([[2, 2]], jnp.int32), jnp.array([[0, 2, -1]], jnp.int32)
    kv_offsets = cudnn._fix_seqlen_offsets(lengths, lengths, offsets, offsets, query, key)[3]
    return int(kv_offsets.reshape(-1)[1]) // 2  # the second segment starts at token 2
