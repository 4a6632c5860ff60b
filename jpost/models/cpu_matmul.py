"""Decoding's matmuls on CPU: a C++ kernel (cpu_matmul.cc) called through
XLA's FFI, over weights packed once per generate call.

A decode step multiplies a few rows (one a sequence) by every weight of the
model. XLA:CPU's bfloat16 matmuls read the weights at those shapes well
under the machine's bandwidth; the kernel reads a weight packed as
[N/64, K/2, 64, 2] (`pack`), the layout its AVX512-BF16 dot instruction
takes, and runs the decode step's matmuls about twice as fast
(bench/RESULTS.md).

`packs_for_decoding` is the one place that decides where it runs: by
default (ModelConfig.decode_matmul='auto') bfloat16 compute on a single CPU
device whose processor has AVX512-BF16 and where the kernel builds
(models/native.py); 'xla' turns it off. Elsewhere decoding uses XLA's
matmuls, as training always does. A weight packed by `pack` is a 4-D array
(5-D stacked over layers); `decoder.dense` sends those here.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp

from jpost.models import native

SOURCE = 'cpu_matmul.cc'
_TARGETS = (('jpost_cpu_matmul_bf16', 'JpostMatmulBf16'),
            ('jpost_cpu_matmul_f32', 'JpostMatmulF32'))
BLOCK = 64  # output columns a packed block holds (cpu_matmul.cc's kBlock)


def unavailable_reason() -> str | None:
  """None if the kernel is built and registered here, else why not."""
  return native.unavailable_reason(SOURCE, _TARGETS)


CHOICES = ('auto', 'xla')  # ModelConfig.decode_matmul


def packs_for_decoding(choice: str, dtype) -> bool:
  """Whether decoding in compute `dtype` packs its weights for the kernel.
  `choice` (ModelConfig.decode_matmul): 'xla' never; 'auto' for bfloat16
  on the CPU backend with one device (a packed weight is not sharded),
  where the kernel builds. Says once on stderr why not, where only the
  kernel's absence stands in the way."""
  if choice not in CHOICES:
    raise ValueError(f'decode_matmul={choice!r}; use one of {CHOICES}.')
  return choice == 'auto' and _auto(jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=None)
def _auto(dtype_name: str) -> bool:
  if dtype_name != 'bfloat16' or jax.default_backend() != 'cpu' or jax.device_count() != 1:
    return False
  reason = unavailable_reason()
  if reason is not None:
    print(f'jpost: the CPU decoding matmul kernel is not available ({reason}); '
          "decoding uses XLA's matmuls.", file=sys.stderr)
  return reason is None


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


def is_packed(w) -> bool:
  """Whether `w` (one layer's weight) is `pack`ed."""
  return w.ndim == 4


def matmul(x, packed, float32_out: bool = False):
  """x [..., K] @ the weight `packed` holds ([..., N]), accumulated in
  float32 and returned in bfloat16 (or float32)."""
  nb, half_k, _, _ = packed.shape
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.bfloat16)
  if rows.shape[1] != 2 * half_k:
    raise ValueError(f'x has {rows.shape[1]} features; the packed weight takes {2 * half_k}.')
  out_dtype = jnp.float32 if float32_out else jnp.bfloat16
  out = jax.ffi.ffi_call(
      'jpost_cpu_matmul_f32' if float32_out else 'jpost_cpu_matmul_bf16',
      jax.ShapeDtypeStruct((rows.shape[0], nb * BLOCK), out_dtype))(rows, packed)
  return out.reshape(*x.shape[:-1], nb * BLOCK)


if __name__ == '__main__':  # python -m jpost.models.cpu_matmul: build it and say so
  reason = unavailable_reason()
  print('jpost CPU decoding matmul kernel:',
        'available' if reason is None else f'unavailable: {reason}')
  sys.exit(0 if reason is None else 1)
