"""The fused CPU attention kernel (models/cpu_attention.py) against the
materialised float32 reference, forward and gradients, on packed rows,
padding, a shared prefix and 1-8 query heads per key head; the model with
it against the model without; what 'auto' picks; and the errors it gives
where it cannot run. Inputs are bfloat16, so the bound is bfloat16's
rounding (a wrong mask or a dropped term is O(1))."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpost.models import attention as attn
from jpost.models import cpu_attention
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder
from norms import assert_norm_close, relative_error

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU kernel')


def _layout(t: int, lengths_per_row, prefix: int = 0):
  """Segments and positions: each row a shared prefix of `prefix` tokens
  (segment -1) then samples of the given lengths, padding after them."""
  seg = np.zeros((len(lengths_per_row), t), np.int32)
  pos = np.zeros_like(seg)
  for r, lengths in enumerate(lengths_per_row):
    seg[r, :prefix], pos[r, :prefix] = -1, np.arange(prefix)
    i = prefix
    for s, n in enumerate(lengths, start=1):
      seg[r, i:i + n], pos[r, i:i + n] = s, prefix + np.arange(n)
      i += n
  return jnp.asarray(seg), jnp.asarray(pos)


def _inputs(b, t, n, k, h, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
  k_ = jax.random.normal(keys[1], (b, k, h, t), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, k, t, h), jnp.bfloat16)
  weights = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
  return q, k_, v, weights


CASES = {
    # (query heads, key heads, head size, T, samples per row, shared prefix)
    'smollm2 3:1, packed and padded': (9, 3, 64, 256, [[120, 100], [256], [30, 40, 50]], 0),
    'no grouping, odd length': (4, 4, 32, 77, [[20, 57], [5, 6, 7]], 0),
    '8:1, head 128': (8, 1, 128, 64, [[64], [1, 30, 2]], 0),
    '2:1 under a shared prompt': (4, 2, 64, 300, [[100, 90, 60], [200]], 40),
    '6:1, one-token samples': (6, 1, 32, 40, [[1] * 40, [1, 1, 3]], 0),
    # A padding-free batch: one long row, split into pieces of whole samples
    # so that every thread has work.
    'one row of many samples': (9, 3, 64, 700, [[90, 30, 150, 5, 64, 200, 1, 100, 40]], 0),
}


@pytest.mark.parametrize('case', CASES)
def test_kernel_equals_the_reference_forward_and_gradients(case):
  n, k, h, t, lengths, prefix = CASES[case]
  seg, pos = _layout(t, lengths, prefix)
  q, keys, values, weights = _inputs(len(lengths), t, n, k, h)
  real = (seg != 0)[:, :, None, None]
  mask = attn.mask_of(pos, seg, pos, seg)

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * weights * real)

  kernel = lambda q, k, v: cpu_attention.attention(q, k, v, seg, pos)
  reference = lambda q, k, v: attn.dense_attention(
      *(a.astype(jnp.float32) for a in (q, k, v)), mask)
  assert_norm_close(jax.jit(kernel)(q, keys, values).astype(jnp.float32) * real,
                    jax.jit(reference)(q, keys, values) * real, bound=5e-3, what='output ')
  got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, keys, values)
  want = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, keys, values)
  assert_norm_close([g.astype(jnp.float32) for g in got], want, bound=5e-3, what='gradient ')
  # Padding queries get zeros, and so do their gradients.
  out = np.asarray(jax.jit(kernel)(q, keys, values), np.float32)
  assert not np.any(out[np.asarray(seg) == 0])
  assert not np.any(np.asarray(got[0], np.float32)[np.asarray(seg) == 0])


CONTINUATIONS = {
    # (left padding, prompt tokens, completions packed after it, query slots)
    'smollm2 3:1, packed completions after a left-padded prompt': (12, 40, [30, 7, 20], 64),
    'a prompt without padding, one completion and padding': (0, 25, [9], 16),
    # No shared prompt: the queries are the row's last tokens, the first
    # sample begun before them.
    'the last tokens of a packed row': (0, 0, [50, 30], 60),
}


@pytest.mark.parametrize('case', CONTINUATIONS)
def test_queries_that_continue_the_keys_equal_the_reference(case):
  """Queries of only the last T of the keys' tokens (a group's completions
  after their prompt's keys, decoder.shared_prompt_stack): output and
  gradients equal the reference under the mask of those T queries over
  every key, prompt keys included; padding queries get zeros."""
  pad, prompt, lengths, slots = CONTINUATIONS[case]
  n, k, h = 9, 3, 64
  s = pad + prompt + max(slots, sum(lengths))  # queries: the last `slots` tokens
  seg = np.zeros((2, s), np.int32)
  pos = np.zeros_like(seg)
  for r in range(2):  # row 1: the same prompt, the completions reversed
    seg[r, pad:pad + prompt], pos[r, pad:pad + prompt] = -1, np.arange(prompt)
    i = pad + prompt
    for sample, length in enumerate(lengths if r == 0 else lengths[::-1], start=1):
      seg[r, i:i + length], pos[r, i:i + length] = sample, prompt + np.arange(length)
      i += length
  seg, pos = jnp.asarray(seg), jnp.asarray(pos)
  q, keys, values, weights = _inputs(2, s, n, k, h, seed=1)
  q, weights = q[:, -slots:], weights[:, -slots:]
  q_seg, q_pos = seg[:, -slots:], pos[:, -slots:]
  real = (q_seg != 0)[:, :, None, None]
  visible = attn.Visibility(q_pos, q_seg, pos, seg)

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * weights * real)

  kernel = lambda q, k, v: attn.attend(q, k, v, visible, implementation='cpu', block=512,
                    continuation=True)
  reference = lambda q, k, v: attn.dense_attention(
    *(a.astype(jnp.float32) for a in (q, k, v)), visible.dense_mask())
  out = jax.jit(kernel)(q, keys, values)
  assert out.shape == q.shape
  assert_norm_close(out.astype(jnp.float32) * real,
                    jax.jit(reference)(q, keys, values) * real, bound=5e-3, what='output ')
  got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, keys, values)
  want = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, keys, values)
  assert_norm_close([g.astype(jnp.float32) for g in got], want, bound=5e-3, what='gradient ')
  assert not np.any(np.asarray(out, np.float32)[np.asarray(q_seg) == 0])


def _model_outputs(attention: str, remat: str, dtype: str):
  seg, pos = _layout(64, [[30, 34], [10, 20]])
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 64)))
  cfg = ModelConfig(vocab_size=100, hidden_size=192, intermediate_size=128, num_layers=2,
                    num_heads=6, num_kv_heads=2, attention=attention, remat=remat, dtype=dtype)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  real = (seg != 0)[..., None]

  @nnx.jit
  def grads(model):
    def loss(model):
      logits = model(tokens, pos, seg).astype(jnp.float32)
      return jnp.sum(jax.nn.log_softmax(logits) * real) / 100, logits
    return nnx.value_and_grad(loss, has_aux=True)(model)
  (_, logits), grads = grads(model)
  return logits * real, jax.tree.leaves(nnx.state(grads))


@pytest.mark.parametrize('remat', ['dots', 'full'])
def test_model_with_the_kernel_matches_the_model_without(remat):
  """A 2-layer GQA 3:1 bfloat16 model: logits and every parameter's gradient
  with attention='cpu' are as close to the float32 model's as the
  blockwise path's are (both round to bfloat16 in the same places)."""
  ref_logits, ref_grads = _model_outputs('xla', 'none', 'float32')
  errors = {}
  for attention in ('cpu', 'blockwise'):
    logits, grads = _model_outputs(attention, remat, 'bfloat16')
    errors[attention] = [relative_error(logits, ref_logits)] + [
        relative_error(g, w) for g, w in zip(grads, ref_grads)]
  cpu, blockwise = np.array(errors['cpu']), np.array(errors['blockwise'])
  assert np.all(cpu < 0.05), errors
  assert np.all(cpu <= 1.5 * blockwise + 2e-3), errors


def test_dots_keeps_the_kernel_output():
  """Under remat 'dots' the kernel's output and log-sum-exp are kept, so the
  gradient calls its forward once; 'full' calls it again in the backward."""
  from jpost.models import decoder, remat
  seg, pos = _layout(64, [[30, 34], [10, 20]])
  calls = {}
  for policy in ('dots', 'full'):
    cfg = ModelConfig(vocab_size=64, hidden_size=192, intermediate_size=64, num_layers=1,
                      num_heads=6, num_kv_heads=2, attention='cpu', remat=policy,
                      dtype='bfloat16')
    layer = {k: v[0] for k, v in Decoder(cfg, rngs=nnx.Rngs(0)).stacked_layers().items()}
    cos, sin = decoder.rope_tables(pos, cfg)
    block = remat.remat(lambda x, p: decoder.decoder_block(
        x, p, cos, sin, attn.Visibility(pos, seg, pos, seg), cfg)[0], cfg)
    grad = jax.grad(lambda x, p: jnp.sum(block(x, p).astype(jnp.float32) ** 2), argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(grad)(jnp.ones((2, 64, 192), jnp.bfloat16), layer))
    calls[policy] = (jaxpr.count('jpost_cpu_attention_forward'),
                     jaxpr.count('jpost_cpu_attention_backward'))
  assert calls == {'dots': (1, 1), 'full': (2, 1)}, calls


def test_rows_it_cannot_run_are_an_error():
  """A segment in two pieces is not a layout the packers make; the kernel
  says so rather than attending across the gap."""
  seg = jnp.asarray([[1] * 8 + [2] * 8 + [1] * 8], jnp.int32)
  pos = jnp.arange(24, dtype=jnp.int32)[None]
  q, keys, values, _ = _inputs(1, 24, 2, 1, 32)
  with pytest.raises(Exception, match='segments are split'):
    jax.block_until_ready(cpu_attention.attention(q, keys, values, seg, pos))


def test_asking_for_it_with_shapes_it_does_not_take_is_an_error():
  seg, pos = _layout(16, [[16]])
  q, keys, values, _ = _inputs(1, 16, 2, 1, 32)
  visible = attn.Visibility(pos, seg, pos, seg)
  with pytest.raises(ValueError, match="attention='cpu' takes bfloat16"):
    attn.attend(q.astype(jnp.float32), keys.astype(jnp.float32), values.astype(jnp.float32),
                visible, implementation='cpu', block=512)
  with pytest.raises(ValueError, match='no sliding window'):
    attn.attend(q, keys, values, visible, implementation='cpu', block=512, sliding_window=4)
  # Under 'auto' the same shapes simply go blockwise.
  out = attn.attend(q.astype(jnp.float32), keys.astype(jnp.float32),
                    values.astype(jnp.float32), visible, implementation='auto', block=512)
  assert out.shape == q.shape


def test_auto_picks_the_kernel_in_bfloat16_on_one_cpu_device(monkeypatch):
  common = dict(key_len=256, block=512, backend='cpu')
  monkeypatch.setattr(jax, 'device_count', lambda *a: 1)
  assert attn.choose('auto', **common, sliding_window=None, dtype='bfloat16') == 'cpu'
  assert attn.choose('auto', **common, sliding_window=None, dtype='float32') == 'blockwise'
  assert attn.choose('auto', **common, sliding_window=64, dtype='bfloat16') == 'blockwise'
  assert attn.choose('auto', **common, sliding_window=None) == 'blockwise'  # dtype unknown
  monkeypatch.setattr(jax, 'device_count', lambda *a: 8)  # a mesh: no rule to split it over
  assert attn.choose('auto', **common, sliding_window=None, dtype='bfloat16') == 'blockwise'


def test_without_a_compiler_auto_says_why_and_goes_blockwise(without_a_compiler):
  """A fresh cache and no compiler: the reason names the compiler, 'auto'
  prints it once and picks the blockwise path, and asking for 'cpu' by name
  is an error that says what to use instead."""
  script = (
      'import jax\n'
      'from jpost.models import attention as attn, cpu_attention\n'
      'print("reason:", cpu_attention.unavailable_reason())\n'
      'print("auto:", attn.choose("auto", key_len=256, block=512, sliding_window=None,'
      ' dtype="bfloat16"))\n'
      'try:\n'
      '  cpu_attention.require()\n'
      'except cpu_attention.KernelUnavailable as e:\n'
      '  print("asked:", e)\n')
  result = without_a_compiler(script)
  assert 'reason: ' in result.stdout and 'no-such-compiler' in result.stdout, result.stdout
  assert 'auto: blockwise' in result.stdout, result.stdout
  assert "asked: attention='cpu' is not available here" in result.stdout, result.stdout
  assert result.stderr.count('fused CPU attention kernel is not available') == 1, result.stderr
