"""Block-wise weight quantisation for a frozen base (QLoRA): int8 and NF4.

A kernel w [..., D, F] (D inputs, F outputs) is cut into blocks of
`block_size` consecutive inputs of one output column, as bitsandbytes cuts
a torch [F, D] weight row-major; each block keeps its absolute maximum as
its scale [..., D / block_size, F] (float32).

- int8: code = round(127 w / absmax), stored as int8 [..., D, F].
- nf4: w / absmax is rounded to the nearest of 16 NormalFloat levels (the
  quantiles of a normal distribution, QLoRA section 3); two 4-bit codes are
  packed per byte along D, stored as uint8 [..., D / 2, F].

`quantize` runs once on the host (numpy) at load time; `dequantize` runs on
device inside the layer that uses the weight, so only one layer's kernels
exist in 16 bits at a time.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpost.errors import ConfigError

KINDS = ('int8', 'nf4')

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E): 0 and +-1 exact.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def check(kind: str, block_size: int, inputs: int, name: str) -> None:
  if kind not in KINDS:
    raise ConfigError(f"lora.quantize={kind!r}; use 'none' or one of {KINDS}.")
  if block_size <= 0 or block_size % 2 or inputs % block_size:
    raise ConfigError(
        f'lora.block_size={block_size} must be even and divide the {inputs} inputs of '
        f'{name}; use a divisor of the model\'s hidden and intermediate sizes (64 suits most).')


def quantize(w: np.ndarray, kind: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(codes, scales) of a kernel [..., D, F]."""
  w = np.asarray(w, np.float32)
  *lead, d, f = w.shape
  blocks = w.reshape(*lead, d // block_size, block_size, f)
  absmax = np.max(np.abs(blocks), axis=-2)
  scale = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
  normed = blocks / scale[..., None, :]
  if kind == 'int8':
    codes = np.round(normed * 127).astype(np.int8).reshape(w.shape)
    return codes, absmax.astype(np.float32)
  midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
  codes = np.searchsorted(midpoints, normed).astype(np.uint8).reshape(w.shape)
  packed = codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)
  return packed, absmax.astype(np.float32)


def dequantize(codes, scales, kind: str, dtype):
  """The kernel [..., D, F] in `dtype` from quantize's (codes, scales)."""
  if kind == 'int8':
    normed = codes.astype(jnp.float32) / 127
  else:
    low, high = codes & 0xF, codes >> 4
    # Interleave back along D: row 2i is the low nibble, 2i + 1 the high.
    nibbles = jnp.stack([low, high], axis=-2)
    nibbles = nibbles.reshape(*codes.shape[:-2], 2 * codes.shape[-2], codes.shape[-1])
    normed = jnp.asarray(NF4_LEVELS)[nibbles]
  d, f = normed.shape[-2:]
  block = d // scales.shape[-2]
  blocks = normed.reshape(*normed.shape[:-2], d // block, block, f)
  return (blocks * scales[..., None, :]).reshape(normed.shape).astype(dtype)


def stored_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The codes' shape for a kernel of `shape`."""
  if kind == 'nf4':
    return (*shape[:-2], shape[-2] // 2, shape[-1])
  return tuple(shape)
