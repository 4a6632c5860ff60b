"""The sampler: greedy parity with transformers, log-probs equal to the
trainer's, sampling statistics, stop/truncation bookkeeping, bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jpost import ops, sampling
from jpost.models import hf, pretrained
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder
from jpost.tokenizer import Tokenizer

QUESTIONS = ['What is the capital of France?', 'Hi',
             'Name a colour of the sky on a clear day, and explain why it has that colour.',
             'What is 12 * 7?', 'Write a haiku about autumn leaves.',
             'List three prime numbers.', 'Who wrote Hamlet? Answer in one sentence.',
             'Translate "thank you" into French, German and Spanish, one per line.']


@pytest.fixture(scope='module')
def checkpoint():
  return pretrained.resolve('smollm2-135m-instruct')


@pytest.fixture(scope='module')
def tokenizer(checkpoint):
  return Tokenizer.from_dir(checkpoint)


@pytest.fixture(scope='module')
def model(shallow_smollm2):
  """The first 6 layers of SmolLM2 (tests/conftest.py): real weights for the
  sampler's mechanics, which hold at any depth."""
  return hf.load(shallow_smollm2)


def _prompts(tokenizer, n=len(QUESTIONS)):
  return [tokenizer.encode_chat([{'role': 'user', 'content': q}], add_generation_prompt=True).ids
          for q in QUESTIONS[:n]]


def test_greedy_matches_transformers_left_padded(checkpoint, tokenizer):
  """The whole model: 3 of the 8 answers end within 32 tokens, 5 are cut.
  transformers generates the same left-padded batch (its positions come from
  the attention mask) and, for the most padded prompt, that prompt alone."""
  model = hf.load(checkpoint)
  prompts = _prompts(tokenizer)
  tokens, mask = sampling.left_pad(prompts, tokenizer.pad_id)
  assert len({len(p) for p in prompts}) > 4  # real left padding
  n = 32
  out = jax.device_get(sampling.generate(
      model, tokens, mask,
      sampling.SamplingConfig(max_new_tokens=n, temperature=0.0, stop_ids=tokenizer.stop_ids)))
  reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
  greedy = dict(max_new_tokens=n, do_sample=False, eos_token_id=list(tokenizer.stop_ids),
                pad_token_id=tokenizer.pad_id)
  with torch.no_grad():
    batch = reference.generate(torch.tensor(np.asarray(tokens)),
                               attention_mask=torch.tensor(np.asarray(mask)), **greedy)
  width, ended = tokens.shape[1], 0
  for row in range(len(prompts)):
    ref_new = batch[row, width:].tolist()
    stops = [i for i, t in enumerate(ref_new) if t in tokenizer.stop_ids]
    ref_new = ref_new[:stops[0] + 1] if stops else ref_new  # padding follows a stop
    ours = out.tokens[row][out.mask[row] == 1].tolist()
    assert ours == ref_new, (row, tokenizer.decode(ours), tokenizer.decode(ref_new))
    # Bookkeeping: stop token inside the mask, nothing after it; truncation flag.
    assert out.lengths[row] == len(ours)
    if ours[-1] in tokenizer.stop_ids:
      ended += 1
      assert not out.truncated[row] and out.mask[row, len(ours):].sum() == 0
    else:
      assert out.truncated[row] and len(ours) == n
  assert 0 < ended < len(prompts)  # both cases are exercised
  shortest = min(range(len(prompts)), key=lambda r: len(prompts[r]))
  with torch.no_grad():
    alone = reference.generate(torch.tensor([prompts[shortest]]), **greedy)
  ours = out.tokens[shortest][out.mask[shortest] == 1].tolist()
  assert ours == alone[0, len(prompts[shortest]):].tolist()


@nnx.jit
def _forward_logprobs(model, ids):
  logits = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))
  return ops.token_logprobs(logits, ids[:, 1:])


def _full_forward_logprobs(model, prompt, completion):
  ids = prompt + completion
  # Padded on the right to a multiple of 32 tokens, so that one compiled
  # forward serves every row: in a causal model the tokens after a sequence
  # change none of its logits.
  width = -(-len(ids) // 32) * 32
  padded = jnp.asarray([ids + [0] * (width - len(ids))])
  return np.asarray(_forward_logprobs(model, padded))[0, len(prompt) - 1:len(ids) - 1]


# float32 with the scan: test_decode_variants_sample_the_same_tokens below.
@pytest.mark.parametrize('dtype, max_err, median_err, scan_layers', [
    ('float32', 1e-4, 1e-5, False), ('bfloat16', 0.4, 0.03, False),
    ('bfloat16', 0.4, 0.03, True)])
def test_sampler_logprobs_equal_full_forward(shallow_smollm2, tokenizer, dtype, max_err, median_err,
                                             scan_layers):
  """The temperature-1 log-probs the sampler returns are the trainer's, with
  either decode step (the scan with the cache in the model's dtype, as chat
  streams on a GPU).

  bfloat16: the cached decode and the full forward round differently (one
  token at a time vs. a whole sequence). Measured over 96 positions on the
  whole model: median 0.011 nat, p95 0.10, max 0.22 (float32: max 3e-5);
  with the scan and a bfloat16 cache, median 0.013, max 0.17. On the 6
  layers this test runs: median 0.014, p95 0.083, max 0.13 (float32: max
  1.6e-5); scan: median 0.008, max 0.08. Hence PPO/GRPO should recompute old
  log-probs with the trainer in bfloat16 runs.
  """
  model = hf.load(shallow_smollm2, dtype=dtype)
  prompts = _prompts(tokenizer, 3)
  tokens, mask = sampling.left_pad(prompts, tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=40,
                                     num_samples=2, stop_ids=tokenizer.stop_ids)
  settings = dataclasses.replace(settings, scan_layers=scan_layers)
  variant = dict(cache_dtype=dtype) if scan_layers else {}
  out = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(3), **variant))
  assert out.tokens.shape == (6, 16)
  errors = []
  for row in range(6):
    completion = out.tokens[row][out.mask[row] == 1].tolist()
    full = _full_forward_logprobs(model, prompts[row // 2], completion)
    errors.append(np.abs(full - out.logprobs[row, :len(completion)]))
    # Sampling with top-k renormalises: its log-probs are >= the raw ones.
    assert (out.sampling_logprobs[row, :len(completion)] >= out.logprobs[row, :len(completion)] - 1e-5).all()
  errors = np.concatenate(errors)
  assert errors.max() <= max_err and np.median(errors) <= median_err, (errors.max(), np.median(errors))


def test_samples_sharing_a_prompt_see_its_sliding_window():
  """The samples of a prompt read its cache once (shared, not copied); with a
  sliding window of 12 over prompts of 20 and 9 tokens, the window slides
  off the shared prompt as the answers grow: log-probs still equal the full
  forward's (float32)."""
  cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, sliding_window=12, max_position_embeddings=64)
  model = Decoder(cfg, rngs=nnx.Rngs(6))
  rng = np.random.default_rng(7)
  prompts = [rng.integers(1, 31, 20).tolist(), rng.integers(1, 31, 9).tolist()]
  tokens, mask = sampling.left_pad(prompts, 0)
  settings = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, num_samples=3,
                                     stop_ids=(31,))
  out = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(2)))
  assert len({tuple(t) for t in out.tokens}) > 2  # the samples differ
  for row in range(6):
    completion = out.tokens[row][out.mask[row] == 1].tolist()
    full = _full_forward_logprobs(model, prompts[row // 3], completion)
    np.testing.assert_allclose(out.logprobs[row, :len(completion)], full, atol=1e-5)


def _filtered_logprobs(logits, token, temperature, top_k, top_p):
  """log p(token) under logits / temperature, top-k then top-p, by hand (numpy)."""
  scaled = logits.astype(np.float64) / temperature
  order = np.argsort(-scaled)
  keep = np.zeros(scaled.shape, bool)
  keep[order[:top_k or len(scaled)]] = True
  probs = np.exp(scaled - scaled.max()) * keep
  probs /= probs.sum()
  before = np.cumsum(probs[order]) - probs[order]  # mass strictly before, descending
  keep[order[before >= top_p]] = False
  return scaled[token] - np.log(np.sum(np.exp(scaled[keep] - scaled.max()))) - scaled.max()


@pytest.mark.parametrize('top_k, top_p', [(0, 1.0), (20, 0.8)])
def test_sampling_logprobs_are_the_tempered_filtered_distribution(model, tokenizer, top_k, top_p):
  """`sampling_logprobs` are those of the distribution drawn from: the
  temperature applied (in one place only: the trainer's log-probs divide by
  it too, test_online.py), then top-k and top-p, computed here by hand from a
  full forward pass. Without a filter they are the trainer's log-probs."""
  prompts = _prompts(tokenizer, 2)
  tokens, mask = sampling.left_pad(prompts, tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=top_k, top_p=top_p,
                                     num_samples=2, stop_ids=tokenizer.stop_ids)
  out = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(5)))
  errors = []
  for row in range(4):
    completion = out.tokens[row][out.mask[row] == 1].tolist()
    ids = np.asarray(prompts[row // 2] + completion)[None]
    logits = np.asarray(model(ids, np.arange(ids.shape[1])[None], np.ones_like(ids)))[0]
    start = len(prompts[row // 2]) - 1
    want = [_filtered_logprobs(logits[start + j], completion[j], 0.7, top_k, top_p)
            for j in range(len(completion))]
    errors.append(np.abs(out.sampling_logprobs[row, :len(completion)] - want))
  errors = np.concatenate(errors)
  assert errors.max() < 1e-4, errors  # float32 (measured: max 1.4e-5 and 1.8e-5)


def test_cache_bytes_are_those_of_the_caches_generate_makes(model):
  """What the RL recipes print before a rollout (online.py): 3 prompts of 40
  positions, held once, and 4 samples of each with 60 slots of their own."""
  cfg = model.config  # 6 layers, 3 KV heads of 64 dims, float32 on CPU
  make = functools.partial(sampling._empty_cache_program, cfg, cache_dtype=None, stacked=False,
                           rows=None)
  held = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((make(3, 40)(), make(12, 60)())))
  one = lambda rows, slots: 2 * 6 * rows * 3 * 64 * slots * 4 + 2 * rows * slots * 4 + 4
  by_hand = one(3, 40) + one(12, 60)  # k, v; positions, segments; index
  assert sampling.rollout_cache_bytes(cfg, 3, 40, 4, 60) == held == by_hand
  assert sampling.cache_bytes(cfg, 12, 60) == one(12, 60)


def test_samples_of_a_prompt_differ_and_seed_replays(tokenizer, model):
  tokens, mask = sampling.left_pad(_prompts(tokenizer, 1), tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=4,
                                     stop_ids=tokenizer.stop_ids)
  a = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(7)))
  b = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(7)))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert len({tuple(row) for row in a.tokens}) > 1


# --- statistics on a tiny model ------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
  cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=64)
  model = Decoder(cfg, rngs=nnx.Rngs(5))
  model.final_norm.set_value(model.final_norm.get_value() * 8)  # peaky logits
  return model


@pytest.mark.parametrize('settings', [
    dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.6),
    dict(temperature=1.2, min_p=0.4), dict(temperature=1.0, top_k=8, top_p=0.9)])
def test_empirical_frequencies_match_filtered_softmax(tiny, settings):
  prompt = np.array([[3, 9, 4]])
  logits = tiny(prompt, np.arange(3)[None], np.ones((1, 3), np.int32))[0, -1]
  config = sampling.SamplingConfig(max_new_tokens=1, num_samples=20000, stop_ids=(31,), **settings)
  expected = np.asarray(jax.nn.softmax(sampling.filter_logits(logits, config)))
  out = jax.device_get(sampling.generate(tiny, prompt, np.ones_like(prompt), config, jax.random.key(0)))
  draws = out.tokens[:, 0]
  freq = np.bincount(draws, minlength=32) / draws.size
  # Total variation; sampling noise alone is ~0.01 at 20k draws over <= 32 tokens.
  assert 0.5 * np.abs(freq - expected).sum() < 0.025
  assert (freq[expected < 1e-9] == 0).all()  # never outside top-k / nucleus / min-p set
  assert (expected > 1e-9).sum() < 32 or settings == dict(temperature=1.0)


def test_greedy_tokens_are_argmax_ties_nan_and_inf_included():
  """sampling.greedy_tokens (a max, then the least index holding it) picks
  what jnp.argmax picks: the first of tied maxima, the first NaN of a row
  with NaNs, 0 in a row all -inf."""
  logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32)
  logits[1, [40, 7, 250]] = 9.0  # tied maxima: the first, 7
  logits[2, [100, 30]] = np.nan  # NaN wins, the first one
  logits[3] = -np.inf
  logits[4] = 0.0
  logits[5, 299] = np.inf
  got = np.asarray(jax.jit(sampling.greedy_tokens)(jnp.asarray(logits)))
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
  np.testing.assert_array_equal(got[1:], [7, 30, 0, 0, 299])
  assert got.dtype == np.int32


def test_filter_logits_hand_computed():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  def kept(**kw):
    out = sampling.filter_logits(logits, sampling.SamplingConfig(stop_ids=(0,), **kw))
    return np.asarray(out > -1e29).tolist()
  assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
  assert kept(top_p=0.81) == [True, True, True, False]
  assert kept(top_p=0.1) == [True, False, False, False]  # the top token always stays
  assert kept(top_k=3) == [True, True, True, False]
  assert kept(top_k=50) == [True] * 4  # past the vocabulary: no filter (transformers clamps)
  assert kept(min_p=0.5) == [True, True, False, False]  # p >= 0.5 * 0.5
  np.testing.assert_allclose(
      jax.nn.softmax(sampling.filter_logits(logits, sampling.SamplingConfig(stop_ids=(0,), temperature=2.0))),
      np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum(), rtol=1e-5)


# --- bad input -------------------------------------------------------------------

@pytest.mark.parametrize('kw, message', [
    (dict(top_p=0.0), r'top_p must be in \(0, 1\]'), (dict(top_p=1.5), r'top_p must be in \(0, 1\]'),
    (dict(num_samples=0), 'num_samples must be >= 1'), (dict(max_new_tokens=0), 'max_new_tokens must be positive'),
    (dict(temperature=-1.0), 'temperature must be >= 0'), (dict(stop_ids=()), 'stop_ids is empty'),
])
def test_bad_settings(kw, message):
  with pytest.raises(ValueError, match=message):
    sampling.SamplingConfig(**({'stop_ids': (2,)} | kw))


def test_left_pad_to_a_bucket():
  """Right-aligned rows, the width rounded up to a multiple, capped by
  max_width unless the longest prompt is longer."""
  tokens, mask = sampling.left_pad([[5, 6, 7], [8]], 0, multiple=4)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert sampling.left_pad([[1] * 5], 0, multiple=64)[0].shape == (1, 64)
  assert sampling.left_pad([[1] * 5], 0, multiple=64, max_width=8)[0].shape == (1, 8)
  assert sampling.left_pad([[1] * 9], 0, multiple=64, max_width=8)[0].shape == (1, 9)


def test_bad_prompts(tiny):
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    sampling.left_pad([[1, 2], []], 0)
  settings = sampling.SamplingConfig(max_new_tokens=40, stop_ids=(2,))
  with pytest.raises(ValueError, match=r'prompt length 30 \+ max_new_tokens 40 exceeds the model context \(64'):
    sampling.generate(tiny, np.ones((1, 30), np.int32), np.ones((1, 30), np.int32), settings)
  with pytest.raises(ValueError, match=r'prompt row\(s\) \[1\] are empty'):
    sampling.generate(tiny, np.ones((2, 3), np.int32), np.array([[1, 1, 1], [0, 0, 0]]), settings)


@pytest.mark.parametrize('scan_layers', [None, False], ids=['default', 'layer_loop'])
def test_stream_yields_the_same_tokens_as_generate(tokenizer, model, scan_layers):
  prompt = _prompts(tokenizer, 1)[0]
  settings = sampling.SamplingConfig(max_new_tokens=20, temperature=0.0, stop_ids=tokenizer.stop_ids)
  streamed = list(sampling.stream(model, prompt,
                                  dataclasses.replace(settings, scan_layers=scan_layers)))
  tokens, mask = sampling.left_pad([prompt], tokenizer.pad_id)
  out = jax.device_get(sampling.generate(model, tokens, mask, settings))
  assert streamed == out.tokens[0][out.mask[0] == 1].tolist()


@pytest.mark.parametrize('scan_layers', [False, True], ids=['layer_loop', 'layer_scan'])
def test_prompts_spread_over_a_mesh_give_the_same_completions(tiny, scan_layers):
  from jax.sharding import NamedSharding, PartitionSpec
  from jpost import sharding
  mesh = sharding.make_mesh({'data': 4, 'tensor': 2})
  prompts = np.random.RandomState(0).randint(1, 31, (8, 5)).astype(np.int32)
  mask = np.ones_like(prompts)
  settings = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=10, stop_ids=(31,))
  local = jax.device_get(sampling.generate(tiny, prompts, mask, settings, jax.random.key(1)))
  spread = sampling.generate(tiny, prompts, mask,
                             dataclasses.replace(settings, scan_layers=scan_layers),
                             jax.random.key(1),
                             batch_sharding=NamedSharding(mesh, PartitionSpec('data')))
  assert len(spread.tokens.sharding.device_set) > 1
  np.testing.assert_array_equal(jax.device_get(spread.tokens), local.tokens)
  np.testing.assert_allclose(jax.device_get(spread.logprobs), local.logprobs, atol=1e-5)


def test_decode_variants_sample_the_same_tokens(model, tokenizer):
  """In float32 a scan over stacked layers (chat's default) samples the
  same tokens as the loop over layers (bfloat16 runs diverge after a few
  tokens, as any two roundings do; the test above bounds their log-probs)."""
  tokens, mask = sampling.left_pad(_prompts(tokenizer, 3), tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=2,
                                     stop_ids=tokenizer.stop_ids)
  loop, scan = (jax.device_get(sampling.generate(
      model, tokens, mask, dataclasses.replace(settings, scan_layers=scan_layers),
      jax.random.key(4))) for scan_layers in (False, True))
  np.testing.assert_array_equal(scan.tokens, loop.tokens)
  np.testing.assert_array_equal(scan.mask, loop.mask)
  # Fused differently, float32 sums round differently: 2e-5 measured.
  np.testing.assert_allclose(scan.logprobs, loop.logprobs, atol=1e-4)
