"""Every attention implementation that runs on CPU equals the materialised
reference ('xla'), forward and gradients, on packed rows, left padding, a
sliding window and GQA 3:1 (float32; bound: 1e-5 relative); the model with
each implementation and remat policy gives the reference's logits and
gradients. cuDNN's kernel needs a GPU: here, the spans it is given."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpost.models import attention as attn
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder
from norms import assert_norm_close

B, T, N, K, H = 2, 40, 6, 2, 8  # 6 query heads over 2 key/value heads: GQA 3:1


def _rows():
  """Row 0: three packed segments; row 1: left padding of 7, then one prompt."""
  seg = np.stack([np.repeat([1, 2, 3], [15, 10, 15]), np.repeat([0, 1], [7, 33])])
  pos = np.stack([np.concatenate([np.arange(15), np.arange(10), np.arange(15)]),
                  np.concatenate([np.zeros(7, int), np.arange(33)])])
  return jnp.asarray(pos), jnp.asarray(seg)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(B, K, H, T)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(B, K, T, H)), jnp.float32)
  return q, keys, values


def _reference(window):
  pos, seg = _rows()
  return lambda q, k, v: attn.dense_attention(q, k, v, attn.mask_of(pos, seg, pos, seg, window))


def _assert_matches(fn, ref, q, keys, values, seg):
  """Output and gradients of `fn` against `ref`, on real tokens only (a
  padding query's output is never read: no real token attends to it)."""
  real = np.asarray(seg) > 0
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape)) * real[..., None, None]
  # Jitted, as the model runs them: one program each, not an eager compile
  # of every small operation (this file ran 25% faster: 49.4 -> 36.9 s).
  assert_norm_close(np.asarray(jax.jit(fn)(q, keys, values))[real],
                    np.asarray(jax.jit(ref)(q, keys, values))[real], bound=1e-5)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * weights)
  for g, w in zip(jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, keys, values),
                  jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, keys, values)):
    assert_norm_close(g, w, bound=1e-5)


def _compare(fn, window):
  """`fn` against the reference on the packed and left-padded rows."""
  q, keys, values = _inputs()
  _assert_matches(fn, _reference(window), q, keys, values, _rows()[1])


# 3 blocks, the last padded; 1 block; 5 blocks of 8 with windows inside one
# block and across two (self-attention skips the tiles no query sees)
@pytest.mark.parametrize('block,window', [(16, None), (64, 5), (8, 5), (8, 12), (8, None)])
def test_blockwise_equals_the_reference(block, window):
  pos, seg = _rows()
  _compare(lambda q, k, v: attn.blockwise_attention(
      q, k, v, attn.Visibility(pos, seg, pos, seg), block=block, sliding_window=window), window)


def _many_segment_rows():
  """[2, 48] rows where every row has tiles to skip. Row 0: segments of 10, 6
  + 2 padding + 5 (one segment across a gap), 12, then 3 padding and 10.
  Row 1: a shared prefix of 12 (segment -1) under two completions of 14
  whose positions go on from it, then 8 padding."""
  seg0 = np.repeat([1, 2, 0, 2, 3, 0, 4], [10, 6, 2, 5, 12, 3, 10])
  pos0 = np.concatenate([np.arange(10), np.arange(6), [0, 0], np.arange(6, 11), np.arange(12),
                         [0, 0, 0], np.arange(10)])
  seg1 = np.repeat([-1, 1, 2, 0], [12, 14, 14, 8])
  pos1 = np.concatenate([np.arange(12), np.arange(12, 26), np.arange(12, 26), np.zeros(8, int)])
  return jnp.asarray(np.stack([pos0, pos1])), jnp.asarray(np.stack([seg0, seg1]))


def test_visible_spans_bound_every_visible_pair():
  """For random rows (segments with padding gaps, shared prefixes, padding
  runs), every key a query sees lies in [its first_seen, ...) and every
  query that sees a key lies before the key's last_seeing, against mask_of."""
  rng = np.random.default_rng(3)
  for _ in range(50):
    row = [-1] * int(rng.integers(1, 5)) if rng.random() < 0.3 else []
    segment = 1
    while len(row) < 40:
      if rng.random() < 0.25:
        row += [0] * int(rng.integers(1, 4))
        continue
      row += [segment] * int(rng.integers(1, 8))
      if rng.random() < 0.3:
        row += [0] * int(rng.integers(1, 3)) + [segment] * int(rng.integers(1, 4))
      segment += 1
    seg = jnp.asarray([row[:40]])
    index = jnp.arange(40)[None]  # causal by index, as in self-attention
    mask = np.asarray(attn.mask_of(index, seg, index, seg))[0]
    first_seen, last_seeing = (np.asarray(a)[0] for a in attn.visible_spans(seg))
    queries, keys = np.nonzero(mask)
    assert np.all(keys >= first_seen[queries]), row
    assert np.all(queries < last_seeing[keys]), row
    assert np.any(first_seen > 0), row  # a bound that skips something


@pytest.mark.parametrize('window', [None, 7])
def test_blockwise_skips_tiles_outside_the_segments_and_equals_the_reference(window):
  """Blocks of 8 over rows of many segments: query blocks start past key
  block 0 and key blocks end before the last query block, in both rows at
  once, and the output and gradients are the reference's."""
  pos, seg = _many_segment_rows()
  nb = 48 // 8
  first_block, end_block = attn._block_ranges(*(a.reshape(2, nb, 8).transpose(1, 0, 2)
                                                 for a in (pos, seg)), window)
  causal_tiles = nb * (nb + 1) // 2
  assert int(np.sum(np.arange(nb) + 1 - np.asarray(first_block))) < causal_tiles
  assert int(np.sum(np.asarray(end_block) - np.arange(nb))) < causal_tiles
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 48, N, H)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(2, K, H, 48)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(2, K, 48, H)), jnp.float32)
  fn = lambda q, k, v: attn.blockwise_attention(q, k, v, attn.Visibility(pos, seg, pos, seg),
                                                block=8, sliding_window=window)
  ref = lambda q, k, v: attn.dense_attention(q, k, v, attn.mask_of(pos, seg, pos, seg, window))
  _assert_matches(fn, ref, q, keys, values, seg)


@pytest.mark.parametrize('window,given_mask', [(None, False), (5, False), (None, True)])
def test_one_block_of_self_attention_in_two_halves_equals_the_reference(monkeypatch, window,
                                                                       given_mask):
  """Self-attention over one key block of at least HALVED_MIN_LEN keys runs
  as two halves of the queries, the first over the first half of the keys:
  row 0's second segment (tokens 15-24) straddles the split at 20."""
  monkeypatch.setattr(attn, 'HALVED_MIN_LEN', 16)
  original, parts = attn._halves, []

  def recorded(t):  # (first query, end query, keys) of each part
    parts.append(original(t))
    return parts[-1]
  monkeypatch.setattr(attn, '_halves', recorded)
  pos, seg = _rows()
  mask = attn.mask_of(pos, seg, pos, seg, window) if given_mask else None
  visible = attn.Visibility(pos, seg, pos, seg, mask)
  _compare(lambda q, k, v: attn.blockwise_attention(q, k, v, visible, block=64,
                                                    sliding_window=window), window)
  assert parts and all(p == ((0, T // 2, T // 2), (T // 2, T, T)) for p in parts)


@pytest.mark.parametrize('block,self_attention', [(64, True), (16, False)])
def test_blockwise_follows_a_given_mask(block, self_attention):
  """A mask made once before the layers (Visibility.mask) is the one applied:
  the packed rows' mask with random keys hidden, as one block of
  self-attention and as three blocks (the last padded) of other keys."""
  q, keys, values = _inputs()
  pos, seg = _rows()
  hidden = np.random.default_rng(2).random((B, T, T)) < 0.3
  mask = attn.mask_of(pos, seg, pos, seg) & jnp.asarray(~hidden | np.eye(T, dtype=bool))
  k_pos, k_seg = (pos, seg) if self_attention else (pos + 0, seg + 0)  # other arrays: not self
  visible = attn.Visibility(pos, seg, k_pos, k_seg, mask)
  assert attn._is_self_attention(q, keys, visible) == self_attention
  fn = lambda q, k, v: attn.blockwise_attention(q, k, v, visible, block=block)
  ref = lambda q, k, v: attn.dense_attention(q, k, v, mask)
  _assert_matches(fn, ref, q, keys, values, seg)


@pytest.mark.parametrize('t', [1, 3])
def test_shared_prefix_attention_equals_the_reference_over_copied_prefixes(t):
  """Two groups of 3 rows sharing a prefix each (GQA 3:1), random masks over
  prefix and own keys: the same as `dense_attention` over every row's copy
  of its prefix followed by its own keys; one token a row (a decode step)
  and three."""
  rng = np.random.default_rng(5)
  g, rows, p, s = 2, 3, 11, 7
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q = normal(g * rows, t, N, H)
  prefix_keys, prefix_values = normal(g, K, H, p), normal(g, K, p, H)
  keys, values = normal(g * rows, K, H, s), normal(g * rows, K, s, H)
  prefix_mask = jnp.asarray(rng.random((g * rows, t, p)) < 0.6)
  mask = jnp.asarray(rng.random((g * rows, t, s)) < 0.6).at[:, :, 0].set(True)
  got = attn.shared_prefix_attention(q, prefix_keys, prefix_values, prefix_mask, keys, values, mask)
  copied = lambda a: jnp.repeat(a, rows, axis=0)
  want = attn.dense_attention(q, jnp.concatenate([copied(prefix_keys), keys], axis=-1),
                              jnp.concatenate([copied(prefix_values), values], axis=-2),
                              jnp.concatenate([prefix_mask, mask], axis=-1))
  chex.assert_shape(got, (g * rows, t, N, H))
  assert_norm_close(got, want, bound=1e-6)
  # Each group reads its own prefix: another group's prefix changes nothing.
  moved = attn.shared_prefix_attention(q, prefix_keys.at[1].set(0), prefix_values, prefix_mask,
                                       keys, values, mask)
  np.testing.assert_array_equal(moved[:rows], got[:rows])
  assert not np.allclose(moved[rows:], got[rows:])


def test_pallas_kernel_equals_the_reference_in_interpret_mode():
  pos, seg = _rows()
  _compare(lambda q, k, v: attn.pallas_attention(
      q, k, v, attn.Visibility(pos, seg, pos, seg), interpret=True, block=16), None)


def _mask_of_spans(lengths, starts, t):
  """cuDNN's packed layout as its API documents it: query i sees key j when
  both lie in one segment [start, start + length) and j <= i."""
  idx = np.arange(t)
  mask = np.zeros((len(lengths), t, t), bool)
  for row, (row_lengths, row_starts) in enumerate(zip(lengths, starts)):
    for length, start in zip(row_lengths, row_starts):
      if length >= 0:
        inside = (idx >= start) & (idx < start + length)
        mask[row] |= inside[:, None] & inside[None, :] & (idx[None, :] <= idx[:, None])
  return mask


def test_cudnn_segment_spans_give_the_reference_visibility():
  """The kernel itself needs a GPU (bench/attention_check.py in bench/gpu.sh
  compares it with 'xla'); here: the spans it is given describe exactly the
  reference's mask for real queries on packed rows with left and trailing
  padding; every token lies in one span (a query in none gets NaN gradients
  from cuDNN), padding runs see only padding; and a row with more spans than
  the limit is flagged."""
  pos, seg = _rows()
  # A third row: two packed samples, then trailing padding.
  seg = jnp.concatenate([seg, jnp.repeat(jnp.array([[1, 2, 0]]), jnp.array([20, 12, 8]),
                                         axis=1, total_repeat_length=T)])
  pos = jnp.concatenate([pos, jnp.concatenate([jnp.arange(20), jnp.arange(12),
                                               jnp.zeros(8, jnp.int32)])[None]])
  lengths, starts, overflow = jax.jit(attn.segment_spans, static_argnums=1)(seg, 4)
  np.testing.assert_array_equal(lengths, [[15, 10, 15, -1], [7, 33, -1, -1], [20, 12, 8, -1]])
  np.testing.assert_array_equal(starts, [[0, 15, 25, -1, -1], [0, 7, -1, -1, -1],
                                         [0, 20, 32, -1, -1]])
  np.testing.assert_array_equal(overflow, [False, False, False])
  spans = _mask_of_spans(np.asarray(lengths), np.asarray(starts), T)
  real = np.asarray(seg) > 0
  reference = np.asarray(attn.mask_of(pos, seg, pos, seg))
  np.testing.assert_array_equal(spans[real], reference[real])
  assert spans[np.arange(3)[:, None], np.arange(T), np.arange(T)].all()  # each sees itself
  assert not (spans & ~real[:, :, None] & real[:, None, :]).any()  # padding sees no real key
  lengths, starts, overflow = attn.segment_spans(seg, 2)
  np.testing.assert_array_equal(overflow, [True, False, True])
  np.testing.assert_array_equal(lengths, [[15, 10], [7, 33], [20, 12]])
  # Whether jax places GQA keys right in the packed layout is asked at trace
  # time (jax 0.10's offsets follow the queries' head count: K/V get repeated).
  assert jax.jit(lambda: jnp.asarray(attn._cudnn_key_token_stride()))() in (8, 16)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="attention='cudnn' needs a GPU"):
      attn.attend(*_inputs(), attn.Visibility(pos, seg, pos, seg), implementation='cudnn',
                  block=16)
  with pytest.raises(ValueError, match='attention_max_segments'):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                num_kv_heads=1, attention_max_segments=0)


def test_blockwise_holds_no_score_matrix():
  """The compiled blockwise gradient's temporaries stay below one
  [B, N, T, T] float32 score matrix at a length where that matrix dominates."""
  t, block = 2048, 256
  q = jnp.zeros((1, t, N, H))
  keys, values = jnp.zeros((1, K, H, t)), jnp.zeros((1, K, t, H))
  ids = jnp.ones((1, t), jnp.int32)
  pos = jnp.arange(t)[None]
  visible = attn.Visibility(pos, ids, pos, ids)

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
    return grad.lower(q, keys, values).compile().memory_analysis().temp_size_in_bytes
  scores = N * t * t * 4
  blockwise = temp_bytes(lambda q, k, v: attn.blockwise_attention(q, k, v, visible, block=block))
  dense = temp_bytes(lambda q, k, v: attn.dense_attention(q, k, v, visible.dense_mask()))
  # Each key block's scores, probabilities and their gradients: a few
  # [N, T, block] arrays, against the reference's [N, T, T] several times.
  assert dense > scores and blockwise < scores / 2, (dense, blockwise, scores)


def test_auto_picks_by_backend_length_and_window():
  gpu = dict(key_len=4096, block=512, sliding_window=None, backend='gpu')
  assert attn.choose('auto', **gpu, dtype='bfloat16', capability=9.0) == 'cudnn'  # Hopper
  assert attn.choose('auto', **gpu, dtype='float16', capability=10.0) == 'cudnn'
  assert attn.choose('auto', **gpu, dtype='float32', capability=9.0) == 'pallas'  # cuDNN: 16-bit
  assert attn.choose('auto', **gpu, dtype='bfloat16', capability=8.0) == 'pallas'  # an A100
  assert attn.choose('auto', **gpu) == 'pallas'  # dtype unknown
  assert attn.choose('auto', key_len=4096, block=512, sliding_window=64,
                     backend='gpu') == 'blockwise'
  assert attn.choose('auto', key_len=4096, block=512, sliding_window=None,
                     backend='cpu') == 'blockwise'
  # On CPU even one block goes blockwise: its recomputing backward is the faster one there.
  assert attn.choose('auto', key_len=256, block=512, sliding_window=None,
                     backend='cpu') == 'blockwise'
  assert attn.choose('auto', key_len=256, block=512, sliding_window=None, backend='gpu') == 'xla'
  assert attn.choose('xla', key_len=9999, block=8, sliding_window=None) == 'xla'
  with pytest.raises(ValueError, match='attention='):
    attn.choose('flash', key_len=1, block=1, sliding_window=None)
  with pytest.raises(ValueError, match="attention='flash'"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                num_kv_heads=1, attention='flash')
  with pytest.raises(ValueError, match='remat='):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                num_kv_heads=1, remat='some')


def _model_grads(attention, remat):
  cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2,
                    num_heads=N, num_kv_heads=K, sliding_window=24, attention=attention,
                    attention_block=16, remat=remat)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  pos, seg = _rows()
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (B, T)))
  real = (seg > 0)[..., None]

  @nnx.jit
  def grads(model):
    def loss(model):
      logits = model(tokens, pos, seg)
      return jnp.sum(jnp.where(real, logits, 0.0) ** 2) / 1e3, logits
    return nnx.value_and_grad(loss, has_aux=True)(model)
  (_, logits), grads = grads(model)
  return np.asarray(logits)[np.asarray(seg) > 0], jax.tree.leaves(nnx.state(grads))


def test_model_with_each_implementation_and_remat_matches_the_reference():
  """A 2-layer GQA 3:1 model with a sliding window (24) on packed and padded
  rows: 'blockwise' (3 key blocks) and 'auto' (which picks it here) under each
  remat policy give the materialised model's logits and gradients."""
  ref_logits, ref_grads = _model_grads('xla', 'none')
  for attention, remat in (('blockwise', 'dots'), ('auto', 'full')):
    logits, grads = _model_grads(attention, remat)
    assert_norm_close(logits, ref_logits, bound=1e-5)
    for g, w in zip(grads, ref_grads):
      assert_norm_close(g, w, bound=1e-4)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_remat_policies_recompute_what_they_say(dtype):
  """Matmuls in the gradient of one block: a forward has 9 (q, k, v, o, gate,
  up, down, and attention's scores and weighted values), a backward two per
  forward matmul. 'full' runs the forward again except `down` (its output is
  not needed): 8 more than 'none'; 'dots' keeps the weight matmuls' outputs
  and runs only attention's 2 again. The two norms' weight gradients add
  one ones-vector matmul each (decoder.scale_features). (`dense` is a custom_vjp, opaque to
  JAX's dot-finding policies: before it was named for the policy, 'dots'
  recomputed as much as 'full'. In bfloat16 on CPU the named values are
  kept as their bits, which the policies must still find.)"""
  from jpost.models import decoder, remat
  pos, seg = _rows()
  counts = {}
  for policy in ('none', 'dots', 'full'):
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=1,
                      num_heads=N, num_kv_heads=K, attention='xla', remat=policy, dtype=dtype)
    layer = {k: v[0] for k, v in Decoder(cfg, rngs=nnx.Rngs(0)).stacked_layers().items()}
    cos, sin = decoder.rope_tables(pos, cfg)
    block = remat.remat(lambda x, p: decoder.decoder_block(
        x, p, cos, sin, attn.Visibility(pos, seg, pos, seg), cfg)[0], cfg)
    grad = jax.grad(lambda x, p: jnp.sum(block(x, p).astype(jnp.float32) ** 2),
                    argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(grad)(jnp.ones((B, T, 48), dtype), layer))
    counts[policy] = jaxpr.count('dot_general[')
  assert counts['none'] == 9 * 3 + 2, counts
  assert counts['dots'] == counts['none'] + 2, counts
  assert counts['full'] == counts['none'] + 8, counts


def _block_gradient_matmuls(attention: str, policy: str, block: int = 512) -> int:
  from jpost.models import decoder, remat
  pos, seg = _rows()
  cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=1,
                    num_heads=N, num_kv_heads=K, attention=attention, remat=policy,
                    attention_block=block)
  layer = {k: v[0] for k, v in Decoder(cfg, rngs=nnx.Rngs(0)).stacked_layers().items()}
  cos, sin = decoder.rope_tables(pos, cfg)
  block = remat.remat(lambda x, p: decoder.decoder_block(
      x, p, cos, sin, attn.Visibility(pos, seg, pos, seg), cfg)[0], cfg)
  grad = jax.grad(lambda x, p: jnp.sum(block(x, p) ** 2), argnums=(0, 1))
  return str(jax.make_jaxpr(grad)(jnp.ones((B, T, 48)), layer)).count('dot_general[')


def test_dots_keeps_the_blockwise_attention_output():
  """Under 'dots' the blockwise path's output and log-sum-exp are kept
  (named 'attention'), so its backward recomputes no forward block: as many
  matmuls as with nothing recomputed, in one key block (T = 40) and in
  query x key tiles of 16 (self-attention's path). 'xla' has no such name
  and runs its 2 forward matmuls again; 'full' runs the blockwise forward
  again too. Keeping them made the SmolLM2 SFT step 8-11% faster
  (bench/RESULTS.md)."""
  for block in (512, 16):
    blockwise = {policy: _block_gradient_matmuls('blockwise', policy, block)
                 for policy in ('none', 'dots', 'full')}
    assert blockwise['dots'] == blockwise['none'], (block, blockwise)
    assert blockwise['full'] > blockwise['dots'] + 2, (block, blockwise)
  assert _block_gradient_matmuls('xla', 'dots') == _block_gradient_matmuls('xla', 'none') + 2


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dots_recomputes_no_attention_forward_in_the_compiled_gradient(dtype):
  """The compiled gradient of a model whose rows take the halved path (one
  key block of T >= HALVED_MIN_LEN keys) under 'dots' runs none of the
  attention's forward again: no exp, max or matmul in the rematerialised
  computation. In bfloat16 on CPU the kept output is named as its bits
  inside the custom_vjp's forward rule; named through `remat.saved` (a
  custom_jvp, opaque there) it was not kept and the softmax ran twice."""
  t = 2 * attn.HALVED_MIN_LEN
  cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2,
                    num_heads=N, num_kv_heads=K, attention='blockwise', remat='dots',
                    dtype=dtype)
  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (B, t)))
  pos, seg = jnp.tile(jnp.arange(t), (B, 1)), jnp.ones((B, t), jnp.int32)

  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens, pos, seg)
    return jnp.sum(logits.astype(jnp.float32) ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  rematted = [line for line in hlo.splitlines() if 'rematted_computation' in line]
  assert rematted  # the policy recomputes the elementwise work (RoPE, norms)
  for op in ('exponential(', 'reduce_max', ' dot('):
    assert not [line for line in rematted if op in line], op


def _stacks_written_through_float32(hlo: str) -> int:
  """Dynamic-update-slices in compiled HLO whose target is a float32
  conversion of another array: a write that converts the whole array."""
  count = 0
  for computation in re.split(r'\n(?=%|ENTRY)', hlo):
    converted = set(re.findall(r'%(convert[.\d]*) = f32', computation))
    count += sum(target in converted
                 for target in re.findall(r'dynamic-update-slice\(%([\w.\-]+)', computation))
  return count


def test_bfloat16_layer_stack_keeps_saved_values_without_float32_copies():
  """The scan over layers stacks what remat keeps into [L, ...] arrays, and
  XLA:CPU writes a 16-bit float array inside a loop by converting all of it
  to float32 and back. Kept as bits (remat.saved), the compiled bfloat16
  gradient under 'full' and 'dots' writes no stack that way; under 'none'
  (JAX keeps the values itself) it still does, which shows the check finds
  such writes. A bitcast is exact: on this small model the three policies
  give the same gradients to the bit (on SmolLM2 their fusions round a few
  values differently)."""
  pos, seg = _rows()
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (B, T)))
  results = {}
  for policy in ('none', 'dots', 'full'):
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=3,
                      num_heads=N, num_kv_heads=K, attention='xla', remat=policy,
                      dtype='bfloat16')
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens, pos, seg)
      return jnp.sum(logits.astype(jnp.float32) ** 2) / 1e3, logits

    grads = jax.jit(jax.grad(loss, has_aux=True))
    hlo = grads.lower(params).compile().as_text()
    results[policy] = (_stacks_written_through_float32(hlo), grads(params))
  assert results['none'][0] > 0
  assert results['dots'][0] == results['full'][0] == 0
  for policy in ('dots', 'full'):
    chex.assert_trees_all_close(results[policy][1], results['none'][1], atol=0, rtol=0)


def test_chunked_lm_head_equals_whole_logits_with_gradients():
  """ops.head_logprobs over 3 chunks of 16 positions (the last padded) equals
  the whole [B, T, V] logits' log-probs and entropies, and their gradients."""
  from jpost import ops
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(B, T, 12)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(12, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (B, T)))
  weights = jnp.asarray(rng.normal(size=(B, T)))
  logits_of = lambda h, head_: h @ head_ / 0.7
  logits_fn = lambda h: logits_of(h, head)
  objective = lambda logp, ent: jnp.sum(logp * weights) + jnp.sum(ent * weights[:, ::-1])

  def loss(chunk):
    def f(hidden, head_):
      logp, ent = ops.head_logprobs(lambda h: logits_of(h, head_), hidden, targets,
                                    chunk=chunk, entropy='loss')
      return objective(logp, ent), (logp, ent)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, head)

  def by_log_softmax(hidden, head_):  # the textbook formulas, whole logits
    all_logp = jax.nn.log_softmax(logits_of(hidden, head_), axis=-1)
    logp = jnp.take_along_axis(all_logp, targets[..., None], axis=-1)[..., 0]
    return objective(logp, -jnp.sum(jnp.exp(all_logp) * all_logp, axis=-1))

  (_, (logp, ent)), grads = loss(16)
  (_, (ref_logp, ref_ent)), ref_grads = loss(0)
  logits = np.asarray(logits_fn(hidden), np.float64)
  all_logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.take_along_axis(all_logp, np.asarray(targets)[..., None], -1)[..., 0]
  assert_norm_close(logp, want, bound=1e-6)
  assert_norm_close(ref_logp, want, bound=1e-6)
  want_ent = -(np.exp(all_logp) * all_logp).sum(-1)
  assert_norm_close(ent, want_ent, bound=1e-6)
  assert_norm_close(ref_ent, want_ent, bound=1e-6)
  textbook_grads = jax.grad(by_log_softmax, argnums=(0, 1))(hidden, head)
  for g, w, t in zip(grads, ref_grads, textbook_grads):
    assert_norm_close(g, w, bound=1e-5)
    assert_norm_close(g, t, bound=1e-5)
  # 'metric' entropy carries no gradient; 'none' returns the log-probs alone.
  g = jax.grad(lambda h: jnp.sum(ops.head_logprobs(logits_fn, h, targets, chunk=16,
                                                   entropy='metric')[1]))(hidden)
  assert not np.any(np.asarray(g))
  assert ops.head_logprobs(logits_fn, hidden, targets, chunk=16).shape == (B, T)


@pytest.mark.parametrize('chunk', [0, 20, 16, 8])  # whole; pieces of 2 x 20, 2 x 16, 2 x 8
def test_weighted_head_takes_the_same_gradient_in_the_forward_pass(chunk):
  """ops.head_weighted_logprobs (the SFT loss's head: the gradient taken in
  the forward pass, the logits computed once) equals autodiff through the
  plain log-probs: value, log-probs and the gradients of hidden and head,
  scaled by the loss's cotangent; the log-probs carry no gradient."""
  from jpost import ops
  rng = np.random.default_rng(5)
  hidden = jnp.asarray(rng.normal(size=(B, T, 12)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)  # [V, D], as a tied embedding
  targets = jnp.asarray(rng.integers(0, 50, (B, T)))
  weights = jnp.asarray(rng.uniform(size=(B, T)) * (rng.uniform(size=(B, T)) > 0.3), jnp.float32)
  logits_fn = lambda h, w: jnp.einsum('btd,vd->btv', h, w)

  def fused(hidden, head):
    value, logp = ops.head_weighted_logprobs(logits_fn, head, hidden, targets, weights,
                                             chunk=chunk)
    return -3.0 * value + jnp.sum(logp), logp  # the log-probs' term adds no gradient

  def reference(hidden, head):
    logp = ops.head_logprobs(lambda h: logits_fn(h, head), hidden, targets)
    return -3.0 * jnp.sum(weights * logp), logp

  (value, logp), grads = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(hidden, head)
  (ref_value, ref_logp), ref_grads = jax.value_and_grad(
      reference, argnums=(0, 1), has_aux=True)(hidden, head)
  chex.assert_shape(logp, (B, T))
  # Log-probs where a token has weight, 0 where it has none (not computed).
  assert_norm_close(logp, jnp.where(weights != 0, ref_logp, 0.0), bound=1e-6)
  assert not np.any(np.asarray(logp)[np.asarray(weights) == 0])
  assert_norm_close(value - jnp.sum(logp), ref_value, bound=1e-6)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, (hidden, head))
  for g, w in zip(grads, ref_grads):
    assert_norm_close(g, w, bound=1e-5)
  # Undifferentiated (evaluation), the same value and log-probs.
  eval_value, eval_logp = jax.jit(fused)(hidden, head)
  assert_norm_close(eval_value, value, bound=1e-6)
  assert_norm_close(eval_logp, logp, bound=1e-6)


def test_weighted_head_without_any_weight_runs_no_piece():
  """A batch without a weighted token (every target masked) runs none of
  the compacted head's pieces (logits of NaN would reach the value if one
  ran): value, log-probs and gradients all zero."""
  from jpost import ops
  rng = np.random.default_rng(6)
  hidden = jnp.asarray(rng.normal(size=(B, T, 12)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (B, T)))
  logits_fn = lambda h, w: jnp.einsum('btd,vd->btv', h, w) * jnp.nan
  fn = lambda h, w: ops.head_weighted_logprobs(logits_fn, w, h, targets, jnp.zeros((B, T)),
                                               chunk=8)
  (value, logp), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(hidden, head)
  assert float(value) == 0.0 and not np.any(np.asarray(logp))
  assert not any(np.any(np.asarray(g)) for g in grads)


def test_prefill_over_the_cache_goes_blockwise_and_samples_the_same(monkeypatch):
  """Generation with 'blockwise' (key blocks of 16 over the 45-slot prompt
  cache, a sliding window of 24, GQA 3:1, left-padded prompts of 45 and 31 tokens)
  prefills through the blockwise path and samples the reference's tokens with
  its log-probs; decode steps (one token) keep the dense mask."""
  from jpost import sampling
  calls = []
  traced = attn.blockwise_attention
  monkeypatch.setattr(attn, 'blockwise_attention',
                      lambda q, *a, **kw: calls.append(q.shape[1]) or traced(q, *a, **kw))
  rng = np.random.default_rng(4)
  prompts = [rng.integers(1, 63, 45).tolist(), rng.integers(1, 63, 31).tolist()]
  tokens, mask = sampling.left_pad(prompts, 0)
  settings = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=2,
                                     stop_ids=(63,))
  out = {}
  for attention in ('xla', 'blockwise'):
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=N, num_kv_heads=K, sliding_window=24, attention=attention,
                      attention_block=16, max_position_embeddings=128)
    out[attention] = jax.device_get(sampling.generate(
        Decoder(cfg, rngs=nnx.Rngs(0)), tokens, mask, settings, jax.random.key(1)))
  assert calls and set(calls) == {45}, calls  # the prefill's 45 queries, not a decode step
  np.testing.assert_array_equal(out['blockwise'].tokens, out['xla'].tokens)
  np.testing.assert_allclose(out['blockwise'].logprobs, out['xla'].logprobs, atol=1e-5)


@pytest.mark.parametrize('chunk', [0, 8, 16, 20])  # whole; pieces of 16, 32 and 40 positions
def test_masked_head_equals_autodiff_through_the_whole_head(chunk, monkeypatch):
  """ops.head_masked_logprobs (DPO's head: only the masked positions
  computed, forward and backward, in pieces gathered from every row) equals
  autodiff through the whole logits for a loss that is not linear in the
  log-probs: log-probs, and the gradients of hidden and head. Positions
  outside the mask hold NaN hidden states: they must never be computed.
  Over a mesh (no compaction) the same."""
  from jpost import ops, sharding
  rng = np.random.default_rng(7)
  hidden = rng.normal(size=(B, T, 12)).astype(np.float32)
  head = jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (B, T)))
  mask = rng.uniform(size=(B, T)) < 0.3
  mask[1, :] = False
  mask[1, 5:7] = True  # 2 positions in the second row
  logits_fn = lambda h, w: jnp.einsum('btd,vd->btv', h, w) / 0.7
  safe = jnp.asarray(np.where(mask[..., None], hidden, 0.0))
  nan = jnp.asarray(np.where(mask[..., None], hidden, np.nan))

  def objective(logp):  # a sigmoid of row sums, as DPO's
    sums = jnp.sum(logp, axis=1)
    return jnp.sum(jax.nn.log_sigmoid(0.1 * (sums[0] - sums[1]))) + jnp.sum(logp ** 2) / 50

  def masked(hidden, head):
    logp = ops.head_masked_logprobs(logits_fn, head, hidden, targets, mask, chunk=chunk)
    return objective(logp), logp

  def reference(hidden, head):
    logp = ops.head_logprobs(lambda h: logits_fn(h, head), hidden, targets)
    return objective(jnp.where(mask, logp, 0.0)), jnp.where(mask, logp, 0.0)

  (ref_value, ref_logp), ref_grads = jax.value_and_grad(
      reference, argnums=(0, 1), has_aux=True)(safe, head)
  # Compacted (chunk > 0) the NaN positions are never read; whole, they would be.
  one_device = nan if chunk else safe
  with monkeypatch.context() as m:
    m.setattr(sharding, 'active_mesh_size', lambda: 2)
    (value_mesh, logp_mesh), grads_mesh = jax.value_and_grad(
        masked, argnums=(0, 1), has_aux=True)(safe, head)
  (value, logp), grads = jax.value_and_grad(masked, argnums=(0, 1), has_aux=True)(
      one_device, head)
  for v, lp, gs in ((value, logp, grads), (value_mesh, logp_mesh, grads_mesh)):
    chex.assert_shape(lp, (B, T))
    assert not np.any(np.asarray(lp)[~mask])
    assert_norm_close(lp, ref_logp, bound=1e-6)
    assert_norm_close(v, ref_value, bound=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(gs, (safe, head))
    assert np.all(np.isfinite(np.asarray(gs[0])))
    assert not np.any(np.asarray(gs[0])[~mask])
    for g, w in zip(gs, ref_grads):
      assert_norm_close(g, w, bound=1e-5)
  # Undifferentiated (evaluation, a reference pass): the same log-probs.
  assert_norm_close(jax.jit(masked)(one_device, head)[1], ref_logp, bound=1e-6)


@pytest.mark.parametrize('chunk', [8, 20])
@pytest.mark.parametrize('entropy', ['metric', 'loss'])
def test_masked_head_entropy_equals_autodiff_through_the_whole_head(chunk, entropy,
                                                                    monkeypatch):
  """With entropies (GRPO's and PPO's head: a metric, or a bonus in the
  loss), ops.head_masked_logprobs equals autodiff through the whole logits:
  log-probs, entropies (0 outside the mask) and the gradients of a loss of
  both; 'metric' entropies carry no gradient. Positions outside the mask
  hold NaN hidden states on one device. Over a mesh the same."""
  from jpost import ops, sharding
  rng = np.random.default_rng(9)
  hidden = rng.normal(size=(B, T, 12)).astype(np.float32)
  head = jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (B, T)))
  mask = rng.uniform(size=(B, T)) < 0.4
  logits_fn = lambda h, w: jnp.einsum('btd,vd->btv', h, w) / 0.7
  safe = jnp.asarray(np.where(mask[..., None], hidden, 0.0))
  nan = jnp.asarray(np.where(mask[..., None], hidden, np.nan))

  def objective(logp, ent):  # a clipped ratio and an entropy bonus, token by token
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp) * 0.9)
    return jnp.sum(jnp.minimum(ratio * 0.3, jnp.clip(ratio, 0.8, 1.2) * 0.3) + 0.05 * ent)

  def masked(hidden, head):
    logp, ent = ops.head_masked_logprobs(logits_fn, head, hidden, targets, mask, chunk=chunk,
                                         entropy=entropy)
    return objective(logp, ent), (logp, ent)

  def reference(hidden, head):
    logp, ent = ops.head_logprobs(lambda h: logits_fn(h, head), hidden, targets,
                                  entropy=entropy)
    logp, ent = jnp.where(mask, logp, 0.0), jnp.where(mask, ent, 0.0)
    return objective(logp, ent), (logp, ent)

  (ref_value, ref_out), ref_grads = jax.value_and_grad(
      reference, argnums=(0, 1), has_aux=True)(safe, head)
  with monkeypatch.context() as m:
    m.setattr(sharding, 'active_mesh_size', lambda: 2)
    mesh_run = jax.value_and_grad(masked, argnums=(0, 1), has_aux=True)(safe, head)
  one_device = jax.value_and_grad(masked, argnums=(0, 1), has_aux=True)(nan, head)
  for (value, out), grads in (one_device, mesh_run):
    for a, want in zip(out, ref_out):
      chex.assert_shape(a, (B, T))
      assert not np.any(np.asarray(a)[~mask])
      assert_norm_close(a, want, bound=1e-6)
    assert float(jnp.min(jnp.where(mask, out[1], 1.0))) > 0  # real entropies, not zeros
    assert_norm_close(value, ref_value, bound=1e-6)
    assert np.all(np.isfinite(np.asarray(grads[0])))
    for g, w in zip(grads, ref_grads):
      assert_norm_close(g, w, bound=1e-5)
  if entropy == 'metric':  # the entropies add nothing to the gradient
    no_bonus = jax.grad(lambda h: objective(
        ops.head_masked_logprobs(logits_fn, head, h, targets, mask, chunk=chunk), 0.0))(nan)
    assert_norm_close(one_device[1][0], no_bonus, bound=1e-6)


def test_masked_head_without_a_masked_position_runs_no_piece():
  from jpost import ops
  rng = np.random.default_rng(8)
  hidden = jnp.asarray(rng.normal(size=(B, T, 12)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (B, T)))
  logits_fn = lambda h, w: jnp.einsum('btd,vd->btv', h, w) * jnp.nan
  fn = lambda h, w: jnp.sum(ops.head_masked_logprobs(logits_fn, w, h, targets,
                                                     jnp.zeros((B, T), bool), chunk=8))
  value, grads = jax.value_and_grad(fn, argnums=(0, 1))(hidden, head)
  assert float(value) == 0.0
  assert not any(np.any(np.asarray(g)) for g in grads)
