"""Packed causal self-attention on CPU as one fused operation: a C++ kernel
(cpu_attention.cc) called through XLA's FFI, with its own backward.

XLA:CPU runs attention as separate passes (scores, mask, softmax, the
probabilities' transposed copies, two matmuls each way) over every
position pair of a row; this kernel computes only the keys each query
sees (its sample up to itself, and a row's shared prompt), in float32
from the bfloat16 inputs, without writing the scores out (bench/RESULTS.md
measures it against the blockwise path).

The kernel is built on first use (models/native.py says how and where);
`available()` says whether that worked; `attention.choose('auto')` uses
the kernel only then, and says once why not when it does not (a missing
compiler, say).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from jpost.models import native
from jpost.models.remat import saved_residual

SOURCE = 'cpu_attention.cc'
_TARGETS = (('jpost_cpu_attention_forward', 'JpostAttentionForward'),
            ('jpost_cpu_attention_backward', 'JpostAttentionBackward'))
KernelUnavailable = native.KernelUnavailable


def unavailable_reason() -> str | None:
  """None if the kernel is built and registered here, else why not."""
  return native.unavailable_reason(SOURCE, _TARGETS)


def available() -> bool:
  return unavailable_reason() is None


def supports(num_heads: int, num_kv_heads: int, head_size: int, dtype) -> bool:
  """The shapes and dtype the kernel takes: bfloat16, a head size that is a
  multiple of 32, 1-8 query heads per key head."""
  return (jnp.dtype(dtype) == jnp.bfloat16 and head_size % 32 == 0
          and num_heads % num_kv_heads == 0 and 1 <= num_heads // num_kv_heads <= 8)


def require() -> None:
  reason = unavailable_reason()
  if reason is not None:
    raise KernelUnavailable(f"attention='cpu' is not available here: {reason}. "
                            "Use attention='auto' or 'blockwise'.")


def _forward_call(q, keys, values, seg, pos):
  require()  # built and registered before the first call is traced
  b, t, n, _ = q.shape
  k, s = keys.shape[1], keys.shape[-1]
  if not 1 <= t <= s or seg.shape != (b, s) or pos.shape != (b, s):
    raise ValueError(f'cpu_attention: queries {q.shape} must be the last of the keys\' '
                     f'{s} tokens, whose segments {seg.shape} and positions {pos.shape} '
                     f'are [{b}, {s}].')
  out = jax.ShapeDtypeStruct(q.shape, q.dtype)
  lse = jax.ShapeDtypeStruct((b, k, n // k, t), jnp.float32)
  return jax.ffi.ffi_call('jpost_cpu_attention_forward', (out, lse))(q, keys, values, seg, pos)


@jax.custom_vjp
def attention(q_btnh, keys, values, seg, pos):
  """Causal self-attention of packed rows: keys [B, K, H, S], values
  [B, K, S, H] (bfloat16), their tokens' segment ids and positions [B, S]
  (int32), and the queries q [B, T, N, H] of the last T <= S of those
  tokens (T = S in a training forward; T < S for completions after their
  prompt's keys, decoder.shared_prompt_stack). Equal to
  `attention.dense_attention` under `attention.mask_of` for real queries;
  padding queries (segment 0) get zeros. Rows whose segments are split, or
  whose shared prefix is not one run before them, are an error."""
  return _forward_call(q_btnh, keys, values, seg, pos)[0]


def _attention_fwd(q_btnh, keys, values, seg, pos):
  out, lse = _forward_call(q_btnh, keys, values, seg, pos)
  # Kept under remat 'dots' (the name 'attention'): the backward reads them.
  out, lse = saved_residual(out, 'attention'), saved_residual(lse, 'attention')
  return out, (q_btnh, keys, values, seg, pos, out, lse)


def _attention_bwd(residuals, d_out):
  q, keys, values, seg, pos, out, lse = residuals
  # The keys' gradient comes as rows of tokens, [B, K, T, H], like the
  # values': what RoPE's backward reads next (the kernel's source says why).
  dq, dk_rows, dv = jax.ffi.ffi_call(
      'jpost_cpu_attention_backward',
      (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(values.shape, keys.dtype),
       jax.ShapeDtypeStruct(values.shape, values.dtype)),
  )(q, keys, values, seg, pos, out, lse, d_out.astype(q.dtype))
  return dq, dk_rows.swapaxes(2, 3), dv, None, None


attention.defvjp(_attention_fwd, _attention_bwd)


if __name__ == '__main__':  # python -m jpost.models.cpu_attention: build it and say so
  reason = unavailable_reason()
  print('jpost CPU attention kernel:', 'available' if reason is None else f'unavailable: {reason}')
  sys.exit(0 if reason is None else 1)
