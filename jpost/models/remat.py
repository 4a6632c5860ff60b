"""What a layer's backward pass keeps from its forward pass (remat), by name.

The decoder names the values a policy may keep: 'layer_input' (each layer's
input, the scan's carry), 'dense' (the weight matmuls' outputs), 'rope'
(the rotated queries and keys) and 'attention' (the blockwise attention's
or the CPU kernel's output and row log-sum-exp, what its own backward
reads: for the kernel and for self-attention over one key block, the
output as the o-projection reads it, [B, T, N, H] in the compute dtype;
else float32 [B, K, G, T, H]).
'full' keeps the layer inputs and recomputes the rest; 'dots' also keeps
the matmul outputs, the rotated queries and keys and the attention's, so
only elementwise work runs twice (the SmolLM2 SFT step 8-11% faster than
recomputing the attention, for 141 MB more at 8 x 256; 5-8% faster than
running RoPE again, for 95 MB more, bench/RESULTS.md); 'none' keeps every
value the backward reads.

The scan over layers stacks each layer's kept values into [L, ...] arrays.
XLA:CPU writes a 16-bit float array inside a loop through float32: each
layer's write converts the whole stack to float32 and back, and the
backward converts every stack to float32 once more (bench/RESULTS.md). So
there, a named value is kept as same-width integers (a bitcast, which costs
nothing) and bitcast back where it is read; `loops_go_through_float32`
is the one place that decides. 'none' leaves the keeping to JAX, whose
stacks of unnamed values still go through float32 on CPU, which makes it
the slowest policy there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpost.models.config import ModelConfig

POLICIES = {
    'full': jax.checkpoint_policies.save_only_these_names('layer_input'),
    'dots': jax.checkpoint_policies.save_only_these_names('layer_input', 'dense', 'rope',
                                                          'attention'),
}


def remat(block, cfg: ModelConfig):
  """`block` under the remat policy `cfg.remat` names ('none', 'dots',
  'full'; True = 'full', False = 'none')."""
  name = cfg.remat_policy
  if name == 'none':
    return block
  return jax.checkpoint(block, policy=POLICIES[name])


def loops_go_through_float32(dtype) -> bool:
  """Whether this backend writes or slices a `dtype` array inside a loop by
  converting the whole array to float32 (and back, for a write) around the
  loop (XLA:CPU, 16-bit floats). Writes: the kept values here and the KV
  cache, float32 or bits there (decoder.cache_storage_dtype). Reads: the stacked
  weights a scan over the layers slices (decoder._loop_operands)."""
  return (jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2
          and jax.default_backend() == 'cpu')


def saved(value, name: str):
  """`value`, named `name` for the remat policies; where 16-bit loop writes
  go through float32, the named value is its bits as uint16."""
  if not loops_go_through_float32(value.dtype):
    return checkpoint_name(value, name)
  return _saved_as_bits(value, name)


def saved_residual(value, name: str):
  """`saved` inside a custom_vjp's forward rule (its residuals), which is
  never differentiated: the bits are named directly, since a custom_jvp
  call there is opaque to the policies (the value would be recomputed)."""
  if not loops_go_through_float32(value.dtype):
    return checkpoint_name(value, name)
  return _named_bits(value, name)


def _named_bits(value, name: str):
  bits = checkpoint_name(jax.lax.bitcast_convert_type(value, jnp.uint16), name)
  return jax.lax.bitcast_convert_type(bits, value.dtype)


# The identity with its own derivative, because integers carry no gradient.
# The rule computes the primal itself (not by calling the function), so that
# the named bits are an ordinary value of the differentiated program, which
# the policies see; a nested custom_jvp call would be opaque to them.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _saved_as_bits(value, name: str):
  return _named_bits(value, name)


@_saved_as_bits.defjvp
def _saved_as_bits_jvp(name, primals, tangents):
  return _named_bits(primals[0], name), tangents[0]
