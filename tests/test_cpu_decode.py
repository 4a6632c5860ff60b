"""The CPU decoding kernels (models/cpu_decode.py): the matmul against
XLA's float32-accumulated matmul over every tile split of the rows and both
weight layouts, the packed layout index by index; the attention against
attention.dense_attention and shared_prefix_attention over masked, partly
filled and fully masked caches; sampling on both against the trainer's full
forward; where 'auto' uses them, and what happens without a compiler. The
suite runs on 8 fake devices, where 'auto' keeps XLA's operations; the
sampling test turns the kernels on as one device would."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpost import sampling
from jpost.errors import ConfigError
from jpost.models import attention as attn
from jpost.models import cpu_decode, decoder, hf
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder
from jpost.tokenizer import Tokenizer
from digit_share_config import recipe
from norms import assert_norm_close
from test_sampling import _full_forward_logprobs, _prompts

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU kernel'),
    pytest.mark.skipif(cpu_decode.unavailable_reason() is not None,
                       reason=f'kernels unavailable: {cpu_decode.unavailable_reason()}')]


@pytest.mark.parametrize('m, k, n', [(1, 576, 576), (5, 64, 192), (6, 128, 64), (7, 128, 128),
                                     (16, 576, 960), (16, 1536, 576), (33, 96, 64),
                                     (130, 64, 256)])
@pytest.mark.parametrize('w_is_fd', [False, True])
def test_kernel_equals_xla_matmul(m, k, n, w_is_fd):
  """Rows 1-130 (tiles of 1 to 6 rows, 16 = 6 + 5 + 5), 1 to 24 column
  blocks, [K, N] and [N, K] weights, float32 and bfloat16 results. Inputs
  are bfloat16 and both sides accumulate in float32, so the float32 results
  differ only by summation order (a wrong pair, block or row is O(1))."""
  x = jax.random.normal(jax.random.key(m), (2, m, k), jnp.bfloat16)  # leading dims flatten
  w = jax.random.normal(jax.random.key(k + n), (n, k) if w_is_fd else (k, n), jnp.bfloat16)
  reference = jnp.einsum('bmk,nk->bmn' if w_is_fd else 'bmk,kn->bmn', x, w,
                         preferred_element_type=jnp.float32)
  packed = cpu_decode.pack(w, w_is_fd)
  assert packed.shape == (n // 64, k // 2, 64, 2) and cpu_decode.is_packed(packed)
  out32 = jax.jit(lambda x, p: cpu_decode.matmul(x, p, float32_out=True))(x, packed)
  out16 = jax.jit(cpu_decode.matmul)(x, packed)
  assert out32.shape == out16.shape == (2, m, n)
  assert out32.dtype == jnp.float32 and out16.dtype == jnp.bfloat16
  assert_norm_close(out32, reference, bound=1e-5)
  # Rounded to bfloat16 once: within half a bfloat16 step of the reference's rounding.
  assert_norm_close(out16.astype(jnp.float32), reference.astype(jnp.bfloat16).astype(jnp.float32),
                    bound=4e-3)


@pytest.mark.parametrize('m, k, n', [(1, 576, 1536), (5, 64, 128), (16, 576, 768),
                                     (64, 1536, 640), (130, 128, 256)])
def test_fused_kernels_equal_the_decoders_operations(m, k, n):
  """norm_matmul (gated or not) and matmul_add against what the decoder
  runs on XLA around a matmul: rms_norm then dense, swiglu of the halves,
  x + dense. The kernels round where those operations round, so the only
  difference is summation order: rarely an element one bfloat16 step off
  (a missing weight, a wrong half or residual is O(1)). Rows 1-130: every
  tile split; the mean-square of each row is that row's own."""
  keys = jax.random.split(jax.random.key(m * k + n), 4)
  # Rows of very different scales: a norm over the wrong row or axis shows.
  scales = jnp.exp(jax.random.uniform(keys[0], (2, m, 1), minval=-3.0, maxval=3.0))
  x = (jax.random.normal(keys[1], (2, m, k)) * scales).astype(jnp.bfloat16)
  norm_weight = (1 + 0.5 * jax.random.normal(keys[2], (k,))).astype(jnp.bfloat16)
  w = (jax.random.normal(keys[3], (k, n)) / k ** 0.5).astype(jnp.bfloat16)
  packed = cpu_decode.pack(w)
  eps = 1e-5

  def reference(x, norm_weight, w):
    product = decoder._dense(decoder.rms_norm(x, norm_weight, eps), w)
    gate, up = jnp.split(product, 2, axis=-1)
    return product, decoder._swiglu(gate, up)
  want, want_gated = jax.jit(reference)(x, norm_weight, w)
  got = jax.jit(lambda *a: cpu_decode.norm_matmul(*a[:2], eps, a[2]))(x, norm_weight, packed)
  got_gated = jax.jit(lambda *a: cpu_decode.norm_matmul(*a[:2], eps, a[2], gated=True))(
      x, norm_weight, packed)
  assert got.shape == (2, m, n) and got_gated.shape == (2, m, n // 2)
  assert got.dtype == got_gated.dtype == jnp.bfloat16
  assert_norm_close(got.astype(jnp.float32), want.astype(jnp.float32), bound=4e-3)
  assert_norm_close(got_gated.astype(jnp.float32), want_gated.astype(jnp.float32), bound=4e-3)

  residual = (jax.random.normal(keys[0], (2, m, n)) * scales).astype(jnp.bfloat16)
  want_sum = jax.jit(lambda x, w, r: r + decoder._dense(x, w))(x, w, residual)
  got_sum = jax.jit(cpu_decode.matmul_add)(x, packed, residual)
  assert got_sum.shape == (2, m, n) and got_sum.dtype == jnp.bfloat16
  assert_norm_close(got_sum.astype(jnp.float32), want_sum.astype(jnp.float32), bound=4e-3)


def test_fused_kernels_refuse_what_they_do_not_take():
  packed = cpu_decode.pack(jnp.ones((64, 192), jnp.bfloat16))  # 3 column blocks
  x = jnp.ones((3, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match='even number of column blocks'):
    cpu_decode.norm_matmul(x, jnp.ones((64,)), 1e-5, packed, gated=True)
  with pytest.raises(ValueError, match=r'residual is float32\[3, 192\]; expected bfloat16'):
    cpu_decode.matmul_add(x, packed, jnp.ones((3, 192), jnp.float32))
  with pytest.raises(ValueError, match='x has 32 features'):
    cpu_decode.norm_matmul(x[:, :32], jnp.ones((32,)), 1e-5, packed)


def test_packed_layout_index_by_index():
  """packed[b, p, c, j] = w[2p + j, 64b + c] ([K, N]) = w_fd[64b + c, 2p + j]."""
  k, n = 6, 128
  w = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n)
  packed, packed_fd = np.asarray(cpu_decode.pack(w)), np.asarray(cpu_decode.pack(w.T, True))
  for b, p, c, j in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 2, 63, 1), (1, 1, 5, 0), (0, 2, 17, 1)]:
    assert packed[b, p, c, j] == packed_fd[b, p, c, j] == w[2 * p + j, 64 * b + c]
  stacked = cpu_decode.pack(jnp.stack([w, w + 1]))  # over layers: [L, N/64, K/2, 64, 2]
  np.testing.assert_array_equal(stacked[1], packed + 1)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_packing_in_one_pass_equals_xlas(dtype):
  """pack_side_by_side against XLA's slice, convert, pack and concatenate,
  bit for bit: a layer of [L, K, N_i] stacks side by side, a [K, N] weight
  and an [N, K] one (the tied head), from float32 (rounded to nearest even
  as XLA converts) and from bfloat16."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (3, 96, n), dtype) for key, n in zip(keys, (128, 64, 192)))
  got = jax.jit(lambda *a: cpu_decode.pack_side_by_side(a, 2))(q, k, v)
  want = jnp.concatenate([cpu_decode.pack(w[2].astype(jnp.bfloat16)) for w in (q, k, v)])
  assert got.shape == (6, 48, 64, 2) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
  head = jax.random.normal(keys[3], (256, 96), dtype)  # [V, D]
  for w, w_is_fd in ((head, True), (head.T, False)):
    got = jax.jit(lambda w: cpu_decode.pack_side_by_side([w], w_is_fd=w_is_fd))(w)
    want = cpu_decode.pack(w.astype(jnp.bfloat16), w_is_fd)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(want).view(np.uint16))
  assert not cpu_decode.packs_in_one_pass([q[..., :96]])  # not whole blocks of 64
  assert not cpu_decode.packs_in_one_pass([q, k[:, :64]])  # different K
  assert not cpu_decode.packs_in_one_pass([q.astype(jnp.float16)])
  with pytest.raises(ValueError, match='pack_side_by_side: the weights are'):
    cpu_decode.pack_side_by_side([q[:, :90]])


def test_decode_layers_pack_as_before(shallow_smollm2, kernels_on):
  """Decoder.decode_layers on the kernels packs each layer from the stacks
  in one pass: the same arrays as slicing, casting and packing them."""
  model = hf.load(shallow_smollm2, dtype='bfloat16')
  cfg = model.config
  stacks = model.stacked_layers()
  for i, layer in enumerate(model.decode_layers()):
    sliced = {name: value[i].astype(jnp.bfloat16) for name, value in stacks.items()}
    want = {'qkv': decoder._wide([sliced.pop(n) for n in ('q', 'k', 'v')], cfg),
            'gate_up': decoder._wide([sliced.pop(n) for n in ('gate', 'up')], cfg)}
    want |= {name: decoder._for_decoding(value, cfg) if value.ndim == 2 else value
             for name, value in sliced.items()}
    assert sorted(layer) == sorted(want)
    for name in want:
      np.testing.assert_array_equal(np.asarray(layer[name], np.float32),
                                    np.asarray(want[name], np.float32), err_msg=name)
  head, is_vd = model.head()
  np.testing.assert_array_equal(
      np.asarray(head, np.float32),
      np.asarray(cpu_decode.pack(model._head_param()[0].astype(jnp.bfloat16), is_vd), np.float32))


def test_bad_shapes_are_clear_errors():
  packed = cpu_decode.pack(jnp.ones((64, 128), jnp.bfloat16))
  with pytest.raises(ValueError, match='x has 32 features; the packed weight takes 64'):
    cpu_decode.matmul(jnp.ones((3, 32), jnp.bfloat16), packed)
  assert not cpu_decode.packable(64, 96) and not cpu_decode.packable(63, 64)
  assert cpu_decode.packable(576, 960)


@pytest.mark.parametrize('temperature', [0.0, 0.7, 1.0, 1.6])
def test_draw_equals_samplings(temperature):
  """cpu_decode.draw against sampling._pick on XLA's operations from the
  same keys: the same tokens (the same uniform numbers, blocks and clamps;
  only where rounding put a number on a token's very edge could they
  differ, and none does here), the same log-probs to float32 rounding. The
  rows: a peaked, a flat and a wide-ranging one, one whose mass sits in the
  last, partial block, one where all but two tokens underflow, and for
  greedy decoding ties (the first maximum) and a NaN (the first NaN)."""
  vocab = 1000  # 3 full blocks of 256 and a partial one
  rows = 64
  base = jax.random.normal(jax.random.key(1), (rows, vocab)) * jnp.linspace(0.1, 8, rows)[:, None]
  logits = base.at[0].set(0.0).at[1, 990:].add(20.0).at[2].set(-300.0).at[2, [5, 700]].set(0.0)
  if temperature == 0:
    logits = logits.at[3, [300, 40, 900]].set(50.0).at[4, [600, 800]].set(jnp.nan)
  settings = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, stop_ids=(0,))
  xla = jax.jit(lambda l, k: sampling._pick(l, k, settings))
  kernel = jax.jit(lambda l, k: sampling._pick(l, k, settings, True))
  for seed in range(4):
    want = xla(logits, jax.random.key(seed))
    got = kernel(logits, jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), atol=2e-5, rtol=1e-5)
    assert got[0][1] >= 990 and int(got[0][2]) in (5, 700)
    if temperature == 0:
      assert (int(got[0][3]), int(got[0][4]), int(got[0][2])) == (40, 600, 5)
      assert not np.any(np.asarray(got[2]))
  # Filters keep XLA's path; a bad call says what it expected.
  filtered = dataclasses.replace(settings, top_k=5)
  np.testing.assert_array_equal(
      np.asarray(sampling._pick(logits, jax.random.key(0), filtered, True)[0]),
      np.asarray(sampling._pick(logits, jax.random.key(0), filtered)[0]))
  with pytest.raises(ValueError, match='expected'):
    cpu_decode.draw(logits, jnp.zeros((3,)), temperature)


def _attention_case(rows, groups, heads, kv_heads, t, prompt, slots, seed=0):
  """Queries, a shared prompt's cache and the rows' own cache (bfloat16
  values stored as their bits, as decoder.cache_storage_dtype keeps them on
  CPU), with masks: random visibility over the prompt, own caches filled to
  different lengths, one row that sees only its prompt, one only its own
  slots, one nothing at all."""
  keys = jax.random.split(jax.random.key(seed), 6)
  head = 64
  q = jax.random.normal(keys[0], (rows, t, heads, head), jnp.bfloat16)
  bits = lambda key, shape: _bits(jax.random.normal(key, shape, jnp.bfloat16))
  prefix_k = bits(keys[1], (groups, kv_heads, head, prompt))
  prefix_v = bits(keys[2], (groups, kv_heads, prompt, head))
  own_k = bits(keys[3], (rows, kv_heads, head, slots))
  own_v = bits(keys[4], (rows, kv_heads, slots, head))
  prefix_mask = np.array(jax.random.uniform(keys[5], (rows, t, prompt)) < 0.8)
  filled = 1 + np.arange(rows) * (slots - 1) // max(rows - 1, 1)
  mask = np.arange(slots)[None, None, :] < filled[:, None, None] + np.arange(t)[None, :, None]
  mask[1], prefix_mask[2] = False, False  # row 1: its prompt only; row 2: its own slots only
  mask[3], prefix_mask[3] = False, False  # row 3: nothing (a softmax of equal scores)
  if rows > 4:  # row 4: a left-padded prompt, its first 40 slots masked (two whole chunks)
    prefix_mask[4, :, :40] = False
  return q, (prefix_k, prefix_v, jnp.asarray(prefix_mask)), own_k, own_v, jnp.asarray(mask)


def _bits(a):
  return jax.lax.bitcast_convert_type(a, jnp.uint16)


def _values(bits):
  """The bfloat16 values a cache of bits holds, in float32 (exactly)."""
  return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize('rows, groups, heads, kv_heads, t, prompt, slots', [
    (16, 2, 9, 3, 1, 37, 128),  # SmolLM2's heads; a prompt that is not whole blocks of 16
    (4, 4, 4, 4, 2, 16, 20),    # one query head per key head, two new tokens, partial blocks
    (8, 1, 16, 2, 1, 64, 48),   # eight query heads per key head
    # Several blocks of chunks (8 chunks of 16 slots at two query heads a key
    # head, 6 at four) and a partial chunk after them, in the prompt and the own slots.
    (6, 2, 4, 2, 1, 300, 200),
    (6, 3, 8, 2, 1, 300, 200)])
def test_attention_equals_xla(rows, groups, heads, kv_heads, t, prompt, slots):
  """The kernel against attention.shared_prefix_attention (a prompt shared
  by rows // groups rows) and, without the prompt, dense_attention, over
  the cache's values in float32. Sums are float32 on both sides; the output is bfloat16, so the bound is its
  rounding (a dropped part, a wrong mask or slot is O(1))."""
  q, prefix, own_k, own_v, mask = _attention_case(rows, groups, heads, kv_heads, t, prompt,
                                                  slots)
  assert cpu_decode.attends(q, own_k) == (t == 1)  # decoding's steps; the kernel takes any T
  got = jax.jit(cpu_decode.attention)(q, own_k, own_v, mask, prefix)
  want = jax.jit(attn.shared_prefix_attention)(q, _values(prefix[0]), _values(prefix[1]),
                                               prefix[2], _values(own_k), _values(own_v), mask)
  assert got.shape == want.shape and got.dtype == jnp.bfloat16
  assert_norm_close(got.astype(jnp.float32), want.astype(jnp.float32), bound=4e-3)
  np.testing.assert_allclose(np.asarray(got[3], np.float32), np.asarray(want[3], np.float32),
                             rtol=1e-2, atol=1e-2)  # the row that sees nothing, on its own
  got = jax.jit(cpu_decode.attention)(q, own_k, own_v, mask)
  want = jax.jit(attn.dense_attention)(q, _values(own_k), _values(own_v), mask)
  assert_norm_close(got.astype(jnp.float32), want.astype(jnp.float32), bound=4e-3)


def test_what_the_attention_kernel_takes():
  q, _, own_k, _, _ = _attention_case(4, 1, 9, 3, 1, 16, 16)
  assert cpu_decode.attends(q, own_k)
  assert not cpu_decode.attends(q, _values(own_k))  # a float32 cache
  assert not cpu_decode.attends(q, _values(own_k).astype(jnp.bfloat16))  # bfloat16 as such
  assert not cpu_decode.attends(q.astype(jnp.float32), own_k)
  assert not cpu_decode.attends(jnp.zeros((4, 1, 9, 24), jnp.bfloat16), own_k)  # head size
  assert not cpu_decode.attends(jnp.zeros((4, 1, 27, 64), jnp.bfloat16), own_k)  # 9 per key head
  assert not cpu_decode.attends(jnp.zeros((4, 5, 9, 64), jnp.bfloat16), own_k)  # a prefill
  q, prefix, own_k, own_v, mask = _attention_case(4, 2, 9, 3, 1, 16, 16)
  with pytest.raises(ValueError, match=r'values are \(4, 3, 64, 16\); expected \(4, 3, 16, 64\)'):
    cpu_decode.attention(q, own_k, own_v.swapaxes(2, 3), mask)
  with pytest.raises(ValueError, match='prompt mask are'):
    cpu_decode.attention(q, own_k, own_v, mask, (*prefix[:2], prefix[2][:, :, :8]))


@pytest.fixture
def kernels_on(monkeypatch):
  """'auto' as on one CPU device with the kernels (the suite has 8 fake
  devices), and a count of the attention kernel's uses as traced."""
  monkeypatch.setattr(cpu_decode, '_auto', lambda dtype_name: dtype_name == 'bfloat16')
  uses = []
  real = cpu_decode.attention
  monkeypatch.setattr(cpu_decode, 'attention', lambda *a: uses.append(1) or real(*a))
  return uses


@pytest.mark.parametrize('scan_layers', [False, True])
def test_sampling_on_the_kernels_equals_the_full_forward(shallow_smollm2, kernels_on,
                                                         scan_layers):
  """Decoding on the kernels, over per-layer and stacked weights: the
  temperature-1 log-probs of what it samples are the trainer's (XLA's
  operations over the whole sequence), to test_sampling's bfloat16 bounds
  (decoding one token at a time rounds differently from a full forward)."""
  model = hf.load(shallow_smollm2, dtype='bfloat16')
  layers = model.decode_layers(scan_layers)
  layer0 = {name: value[0] for name, value in layers.items()} if scan_layers else layers[0]
  assert cpu_decode.is_packed(layer0['qkv']) and cpu_decode.is_packed(layer0['down'])
  assert cpu_decode.is_packed(model.head()[0])
  tokenizer = Tokenizer.from_dir(shallow_smollm2)
  prompts = _prompts(tokenizer, 3)
  tokens, mask = sampling.left_pad(prompts, tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=16, temperature=1.0, num_samples=2,
                                     stop_ids=tokenizer.stop_ids, scan_layers=scan_layers)
  out = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(3)))
  assert kernels_on, 'the decode step did not attend on the kernel'
  errors = []
  for row in range(6):
    completion = out.tokens[row][out.mask[row] == 1].tolist()
    full = _full_forward_logprobs(model, prompts[row // 2], completion)
    errors.append(np.abs(full - out.logprobs[row, :len(completion)]))
  errors = np.concatenate(errors)
  assert len(errors) >= 30
  assert errors.max() <= 0.4 and np.median(errors) <= 0.03, (errors.max(), np.median(errors))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_generate_on_prepared_weights_equals_preparing_its_own(shallow_smollm2, kernels_on,
                                                               monkeypatch, dtype):
  """`sampling.prepare` once, then several `generate` calls: the same tokens
  and log-probs as calls preparing their own weights, on the kernels' packed
  ones (bfloat16) and XLA's (float32), with no preparation in the calls;
  weights prepared for the other layer layout are refused."""
  model = hf.load(shallow_smollm2, dtype=dtype)
  tokenizer = Tokenizer.from_dir(shallow_smollm2)
  tokens, mask = sampling.left_pad(_prompts(tokenizer, 2), tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=2,
                                     stop_ids=tokenizer.stop_ids)
  own = [jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(seed)))
         for seed in (0, 1)]
  prepared = sampling.prepare(model, settings)
  assert cpu_decode.is_packed(prepared.head) == (dtype == 'bfloat16')

  def not_again(*args, **kwargs):
    raise AssertionError('generate prepared its weights again')
  monkeypatch.setattr(Decoder, 'decode_layers', not_again)
  jax.clear_caches()  # every call below is traced again
  for seed, want in zip((0, 1), own):
    got = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(seed),
                                           prepared=prepared))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
  with pytest.raises(ValueError, match='scan_layers'):
    sampling.generate(model, tokens, mask, dataclasses.replace(settings, scan_layers=True),
                      jax.random.key(0), prepared=prepared)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_stream_on_prepared_weights_equals_preparing_its_own(shallow_smollm2, kernels_on,
                                                             monkeypatch, dtype):
  """A conversation's turns on decode weights prepared once (the chat
  recipe): the same tokens as turns preparing their own, on the kernels'
  packed weights in a loop (bfloat16) and XLA's stacked ones (float32), with
  no preparation in the turns; weights for the other layout are refused."""
  model = hf.load(shallow_smollm2, dtype=dtype)
  tokenizer = Tokenizer.from_dir(shallow_smollm2)
  settings = sampling.for_one_call(model, sampling.SamplingConfig(
      max_new_tokens=6, temperature=1.0, stop_ids=(model.config.vocab_size,)))  # none sampled
  assert settings.scan_layers == (dtype == 'float32')
  prompts = _prompts(tokenizer, 2)
  own = [list(sampling.stream(model, prompt, settings, jax.random.key(seed)))
         for seed, prompt in enumerate(prompts)]
  prepared = sampling.prepare(model, settings)

  def not_again(*args, **kwargs):
    raise AssertionError('the stream prepared its weights again')
  monkeypatch.setattr(Decoder, 'decode_layers', not_again)
  jax.clear_caches()  # every call below is traced again
  for seed, (prompt, want) in enumerate(zip(prompts, own)):
    assert list(sampling.stream(model, prompt, settings, jax.random.key(seed),
                                prepared=prepared)) == want
  with pytest.raises(ValueError, match='scan_layers'):
    next(sampling.stream(model, prompts[0], dataclasses.replace(
        settings, scan_layers=not settings.scan_layers), prepared=prepared))


def test_the_chat_recipe_prepares_once_for_every_turn(shallow_smollm2, monkeypatch, capsys):
  """Two turns of an interactive chat: both prefills on the weights prepared
  once, neither preparing its own."""
  import io
  from jpost import trainers
  config = recipe('chat').get_config(None).unlock()
  config.model.path, config.sampling.max_new_tokens = str(shallow_smollm2), 2
  calls = []
  for name in ('_prepare', '_stream_prefill'):
    real = getattr(sampling, name)
    monkeypatch.setattr(sampling, name, lambda *a, real=real, name=name: (
        calls.append(name) or real(*a)))
  monkeypatch.setattr('sys.stdin', io.StringIO('Hello!\nWhat is 2 + 2?\n'))
  trainers.get('chat')(config, None)
  assert calls == ['_prepare'] + ['_stream_prefill'] * 2
  assert capsys.readouterr().out.count('assistant> ') == 2


@pytest.mark.parametrize('dtype, scan_layers, scans', [
    ('bfloat16', None, False),  # on the kernels chat loops over the layers
    ('bfloat16', True, True),   # unless asked to scan
    ('float32', None, True)])   # on XLA's operations it scans, as before
def test_chat_streams_on_the_kernels_in_a_loop(shallow_smollm2, kernels_on, monkeypatch, dtype,
                                               scan_layers, scans):
  """`sampling.stream`'s layout by default: a scan over stacked layers on
  XLA's operations (it compiles sooner), a loop over the layers on the CPU
  kernels, whose packed weights a scan would copy out of the stack for every
  layer at every token (8x slower, bench/RESULTS.md)."""
  model = hf.load(shallow_smollm2, dtype=dtype)
  tokenizer = Tokenizer.from_dir(shallow_smollm2)
  seen = []
  real_step = sampling._stream_step
  monkeypatch.setattr(sampling, '_stream_step',
                      lambda graphdef, state, layers, *rest: seen.append(layers) or real_step(
                          graphdef, state, layers, *rest))
  settings = sampling.SamplingConfig(max_new_tokens=2, temperature=0.0, scan_layers=scan_layers,
                                     stop_ids=(model.config.vocab_size,))  # none is sampled
  tokens = list(sampling.stream(model, _prompts(tokenizer, 1)[0], settings))
  assert len(tokens) == 2 and seen
  assert isinstance(seen[0], dict) == scans  # stacked [L, ...] arrays, or a list of layers


@pytest.mark.parametrize('dtype, scan_layers, scans', [
    ('float32', None, True),     # one call on XLA's operations: the scan compiles sooner
    ('bfloat16', None, False),   # on the kernels: the loop, as in chat
    ('float32', False, False)])  # asked for
def test_the_generate_recipe_scans_its_one_call_unless_on_the_kernels(
    shallow_smollm2, kernels_on, monkeypatch, dtype, scan_layers, scans):
  """The generate recipe compiles its decode loop for one call: by default
  the scan over stacked layers, one block to compile instead of every layer
  (configs/generate.py, float32: 21.5 -> 14.0 s on the 2-core Zen 4 EPYC), where
  `generate` alone loops (it is called again with the same shapes)."""
  from jpost import trainers
  seen = []
  real = sampling.generate
  monkeypatch.setattr(sampling, 'generate', lambda model, tokens, mask, settings, *rest, **kw: (
      seen.append(settings.scan_layers) or real(model, tokens, mask, settings, *rest, **kw)))
  config = recipe('generate').get_config('tiny').unlock()
  config.model.path, config.model.dtype = str(shallow_smollm2), dtype
  config.sampling.max_new_tokens, config.sampling.scan_layers = 2, scan_layers
  records = trainers.get('generate')(config, None)
  assert seen == [scans] and len(records) == 2


@pytest.mark.parametrize('layout', [
    dict(qkv_bias=True, tie_embeddings=False, intermediate_size=256),
    dict(o_bias=True, intermediate_size=96, head_dim=32)])
def test_decoding_on_the_kernels_equals_xlas_for_other_layouts(kernels_on, layout):
  """A prefill and two decode steps on the kernels against XLA's operations,
  hidden states compared, for layouts SmolLM2 does not have: q/k/v biases
  (added after the fused norm and matmul) with an untied [D, V] head, and
  an o bias (its residual add stays on XLA) with an MLP whose 96 columns do
  not pack (gate, up and down stay on XLA's matmuls), head size 32. The
  weights are scaled up so that every layer moves the residual stream."""
  cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=3, num_heads=4,
                    num_kv_heads=2, dtype='bfloat16', **layout)
  graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  keys = iter(jax.random.split(jax.random.key(2), 64))

  def scaled(path, a):  # norms (and biases) random around 1, matrices 10x larger
    noise = jax.random.normal(next(keys), a.shape)
    return 1 + 0.3 * noise if a.ndim < 3 and 'embed' not in str(path) else a * 10
  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(scaled, state))
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 1, 512)
  mask = jnp.ones((3, 9), jnp.int32).at[0, :4].set(0)

  def run(kernels):
    model.config = dataclasses.replace(cfg, decode_kernels=kernels)
    layers = model.decode_layers()
    packed = [cpu_decode.is_packed(layers[0][name]) for name in ('qkv', 'o', 'gate_up', 'down')]

    @jax.jit  # as the sampler runs them: one program, not every operation compiled eagerly
    def steps(layers):
      cache = decoder.init_cache(model.config, 3, 12)
      hidden, pos, cache = sampling._prefill(model, tokens, mask, cache, layers)
      states = [hidden]
      for token in (5, 7):
        hidden, cache = sampling._decode(model, jnp.full((3,), token), pos + 1, cache, layers)
        pos = pos + 1
        states.append(hidden)
      return jnp.stack(states).astype(jnp.float32)
    return steps(layers), packed

  got, packed = run('auto')
  want, unpacked = run('xla')
  mlp_packs = layout['intermediate_size'] % 64 == 0  # down [96, 128] packs either way
  assert packed == [True, True, mlp_packs, True] and not any(unpacked)
  assert kernels_on, 'the decode steps did not attend on the kernel'
  assert_norm_close(got, want, bound=5e-2)  # 1.0-1.2e-2 here; a wrong norm weight 0.87


def test_cache_storage_follows_where_decoding_runs(kernels_on):
  """On CPU a bfloat16 cache is its bits where the kernels decode (the
  attention kernel reads them), float32 on XLA's path, and float32 models
  keep float32; the decoder writes and reads the bits as bfloat16."""
  assert decoder.cache_storage_dtype('bfloat16', 'auto') == jnp.uint16
  assert decoder.cache_storage_dtype('bfloat16', 'xla') == jnp.float32
  assert decoder.cache_storage_dtype('float32', 'auto') == jnp.float32
  new = jax.random.normal(jax.random.key(0), (2, 3, 4), jnp.bfloat16)
  stored = decoder._write_slots(jnp.zeros((2, 3, 9), jnp.uint16), new, (0, 0, 5))
  assert stored.dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(decoder._cache_view(stored, jnp.bfloat16)[..., 5:]),
                                np.asarray(new))
  assert not np.any(np.asarray(stored[..., :5]))


def test_where_auto_packs(kernels_on):
  """bfloat16 only, 'xla' never, and a kernel whose output columns are not
  whole blocks of 64 stays as it is."""
  assert cpu_decode.decodes_on_kernels('auto', jnp.bfloat16)
  assert not cpu_decode.decodes_on_kernels('auto', jnp.float32)
  assert not cpu_decode.decodes_on_kernels('xla', jnp.bfloat16)
  with pytest.raises(ValueError, match="decode_kernels='cpu'"):
    cpu_decode.decodes_on_kernels('cpu', jnp.bfloat16)
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=2, num_kv_heads=1, dtype='bfloat16')
  assert decoder._for_decoding(jnp.zeros((2, 64, 128), jnp.bfloat16), cfg).ndim == 4 + 1
  assert decoder._for_decoding(jnp.zeros((2, 64, 96), jnp.bfloat16), cfg).shape == (2, 64, 96)
  off = dataclasses.replace(cfg, decode_kernels='xla')
  assert decoder._for_decoding(jnp.zeros((2, 64, 128), jnp.bfloat16), off).shape == (2, 64, 128)
  with pytest.raises(ConfigError, match='decode_kernels'):
    dataclasses.replace(cfg, decode_kernels='kernel')


def test_on_several_devices_auto_keeps_xla():
  """A packed weight is not sharded: on a mesh (this suite's 8 devices)
  decoding keeps XLA's matmuls."""
  assert jax.device_count() > 1
  assert not cpu_decode.decodes_on_kernels('auto', jnp.bfloat16)


def test_without_a_compiler_auto_says_why_and_decodes_on_xla(without_a_compiler):
  """A fresh cache and no compiler, on one device: 'auto' says once why
  not, and decoding runs on XLA's matmuls."""
  script = (
      'import jax, jax.numpy as jnp\n'
      'from jpost.models import cpu_decode\n'
      'print("on kernels:", cpu_decode.decodes_on_kernels("auto", jnp.bfloat16),'
      ' cpu_decode.decodes_on_kernels("auto", jnp.bfloat16))\n'
      'print("reason:", cpu_decode.unavailable_reason())\n')
  result = without_a_compiler(script)
  assert 'on kernels: False False' in result.stdout, result.stdout
  assert 'no-such-compiler' in result.stdout, result.stdout
  assert result.stderr.count('decoding kernels are not available') == 1, result.stderr
