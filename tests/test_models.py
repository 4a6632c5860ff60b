"""Decoder parity with transformers for every supported family, plus checkpoint
round trips and strict-loading errors."""

import functools
import json

import chex
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jpost.models import hf
from jpost.models.config import ModelConfig
from norms import assert_norm_close

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    'llama2': (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    'llama3': (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    'llama_bias': (transformers.LlamaConfig, dict(attention_bias=True)),
    'smollm2': (transformers.LlamaConfig, dict(rope_theta=100000.0, tie_word_embeddings=True)),
    'mistral': (transformers.MistralConfig, dict(sliding_window=5)),
    'qwen2': (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    'qwen3': (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=False)),
}


def _hf_model(family: str, seed: int = 0):
  config_cls, extra = FAMILIES[family]
  config = config_cls(**(_COMMON | extra))
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  # Random biases and norm scales too: zeros and ones would hide mapping bugs.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """(name, transformers model, its save_pretrained dir)."""
  model = _hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, path


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens)[None])).logits[0].numpy()


@nnx.jit
def _forward(model, tokens, positions, segment_ids):
  return model(tokens, positions, segment_ids)


def _dense(tokens):
  tokens = np.asarray(tokens)[None]
  positions = np.arange(tokens.shape[1])[None]
  return tokens, positions, np.ones_like(tokens)


def test_logits_match_transformers(family):
  name, ref, path = family
  model = hf.load(path)
  tokens = np.random.RandomState(1).randint(0, VOCAB, 24)
  out = np.asarray(_forward(model, *_dense(tokens)))
  chex.assert_shape(out, (1, 24, VOCAB))
  np.testing.assert_allclose(out[0], _hf_logits(ref, tokens), atol=1e-4, rtol=0)


def test_left_padded_batch_matches_unpadded(family):
  """Each row, left-padded into one batch, gives its own unpadded logits."""
  _, ref, path = family
  model = hf.load(path)
  rng = np.random.RandomState(2)
  lengths, width = (11, 7, 3), 12
  tokens = np.zeros((3, width), np.int32)
  positions = np.zeros((3, width), np.int32)
  segments = np.zeros((3, width), np.int32)
  samples = [rng.randint(3, VOCAB, n) for n in lengths]
  for row, sample in enumerate(samples):
    tokens[row, width - len(sample):] = sample
    positions[row, width - len(sample):] = np.arange(len(sample))
    segments[row, width - len(sample):] = 1
  out = np.asarray(_forward(model, tokens, positions, segments))
  assert np.isfinite(out).all()  # padding rows must not produce NaN
  for row, sample in enumerate(samples):
    np.testing.assert_allclose(out[row, width - len(sample):], _hf_logits(ref, sample),
                               atol=1e-4, rtol=0)


def test_packed_row_matches_separate_samples(family):
  _, ref, path = family
  model = hf.load(path)
  rng = np.random.RandomState(3)
  first, second = rng.randint(3, VOCAB, 9), rng.randint(3, VOCAB, 6)
  tokens = np.concatenate([first, second, [0, 0]])[None]
  positions = np.concatenate([np.arange(9), np.arange(6), [0, 0]])[None]
  segments = np.array([[1] * 9 + [2] * 6 + [0, 0]])
  out = np.asarray(_forward(model, tokens, positions, segments))[0]
  np.testing.assert_allclose(out[:9], _hf_logits(ref, first), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out[9:15], _hf_logits(ref, second), atol=1e-4, rtol=0)


def test_export_loads_in_transformers(family, tmp_path):
  name, ref, path = family
  model = hf.load(path)
  hf.save(model, tmp_path / 'export')
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'export').eval()
  tokens = np.random.RandomState(4).randint(0, VOCAB, 10)
  np.testing.assert_allclose(_hf_logits(again, tokens), _hf_logits(ref, tokens), atol=1e-5)
  assert again.config.tie_word_embeddings == ref.config.tie_word_embeddings


def test_export_writes_the_source_generation_config(tiny_checkpoint, tmp_path):
  """transformers' generate stops only at generation_config.json's eos ids
  (Llama-3-Instruct's <|eot_id|> is listed only there): the export keeps the
  source's file, and drops a stale one when the source has none."""
  import shutil

  from jpost.tokenizer import Tokenizer
  source = tmp_path / 'source'
  shutil.copytree(tiny_checkpoint, source)
  settings = {'bos_token_id': 1, 'eos_token_id': [2, 0], 'do_sample': True,
              'temperature': 0.6, 'top_p': 0.9}
  (source / 'generation_config.json').write_text(json.dumps(settings))
  model, tokenizer = hf.load(source), Tokenizer.from_dir(source)
  hf.save(model, tmp_path / 'export', tokenizer=tokenizer)
  loaded = transformers.GenerationConfig.from_pretrained(tmp_path / 'export')
  assert (loaded.eos_token_id, loaded.temperature, loaded.top_p) == ([2, 0], 0.6, 0.9)
  assert Tokenizer.from_dir(tmp_path / 'export').stop_ids == (2, 0)
  (source / 'generation_config.json').unlink()
  hf.save(model, tmp_path / 'export', tokenizer=Tokenizer.from_dir(source))
  assert not (tmp_path / 'export' / 'generation_config.json').exists()


def test_sharded_export_round_trip(tmp_path):
  ref = _hf_model('qwen3')
  ref.save_pretrained(tmp_path / 'hf', max_shard_size='40KB')
  assert (tmp_path / 'hf' / 'model.safetensors.index.json').is_file()
  model = hf.load(tmp_path / 'hf')
  hf.save(model, tmp_path / 'jp', max_shard_bytes=40_000)
  index = json.loads((tmp_path / 'jp' / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 1
  again = hf.load(tmp_path / 'jp')
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)),
                               nnx.to_flat_state(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'jp').eval()
  tokens = np.arange(3, 20)
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(ref, tokens), atol=1e-5)


def test_bfloat16_compute_close_to_float32(tmp_path):
  ref = _hf_model('llama2')
  ref.save_pretrained(tmp_path)
  tokens = _dense(np.arange(3, 30))
  full = np.asarray(_forward(hf.load(tmp_path), *tokens))
  half = np.asarray(_forward(hf.load(tmp_path, dtype='bfloat16'), *tokens))
  assert half.dtype == np.float32  # logits stay float32 for the losses
  assert np.abs(half - full).max() < 0.1 * np.abs(full).max()


def test_sharded_params_give_same_logits(tmp_path):
  """Parameters laid out over a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices."""
  from jpost import sharding
  ref = _hf_model('qwen3')
  ref.save_pretrained(tmp_path)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  model = hf.load(tmp_path, mesh=mesh)
  q = model.layers.q.get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  tokens, positions, segments = (np.tile(a, (4, 1)) for a in _dense(np.arange(3, 19)))
  with sharding.activation_rules(mesh):
    out = np.asarray(_forward(model, tokens, positions, segments))
  np.testing.assert_allclose(out[2], _hf_logits(ref, np.arange(3, 19)), atol=1e-4)


# --- bad input ----------------------------------------------------------------

@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('llama')
  _hf_model('llama2').save_pretrained(path)
  return path


def _copy_with(src, dst, tensors_fn=None, config_fn=None):
  from safetensors.numpy import load_file, save_file
  dst.mkdir()
  tensors = load_file(src / 'model.safetensors')
  save_file(tensors_fn(tensors) if tensors_fn else tensors, dst / 'model.safetensors',
            metadata={'format': 'pt'})
  config = json.loads((src / 'config.json').read_text())
  (dst / 'config.json').write_text(config_fn(config) if config_fn else json.dumps(config))
  return dst


def _without(name):
  def fn(t):
    t.pop(name)
    return t
  return fn


@pytest.mark.parametrize('case, make, message', [
    ('missing dir', lambda src, dst: dst / 'nowhere', r'does not exist'),
    ('missing tensor', lambda src, dst: _copy_with(src, dst, _without('model.layers.1.mlp.up_proj.weight')),
     r'missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight'),
    ('unexpected tensor', lambda src, dst: _copy_with(
        src, dst, lambda t: t | {'model.layers.2.mlp.up_proj.weight': t['model.layers.1.mlp.up_proj.weight']}),
     r'unexpected tensors \(1\): model\.layers\.2\.mlp\.up_proj\.weight'),
    ('shape mismatch', lambda src, dst: _copy_with(
        src, dst, lambda t: t | {'model.norm.weight': np.ones(63, np.float32)}),
     r'model\.norm\.weight has shape \(63,\), expected \(64,\)'),
    ('unsupported model_type', lambda src, dst: _copy_with(
        src, dst, config_fn=lambda c: json.dumps(c | {'model_type': 'gpt2'})),
     r"model_type 'gpt2' is not supported"),
    ('malformed config', lambda src, dst: _copy_with(
        src, dst, config_fn=lambda c: json.dumps(c)[:-5]), r'config\.json is not valid JSON \(line 1'),
    ('missing config field', lambda src, dst: _copy_with(
        src, dst, config_fn=lambda c: json.dumps({k: v for k, v in c.items() if k != 'hidden_size'})),
     r"missing required field\(s\) \['hidden_size'\]"),
    ('tied head differs', lambda src, dst: _copy_with(
        src, dst, config_fn=lambda c: json.dumps(c | {'tie_word_embeddings': True})),
     r'lm_head\.weight differs from model\.embed_tokens\.weight'),
])
def test_bad_checkpoints_raise_clear_errors(llama_dir, tmp_path, case, make, message):
  path = make(llama_dir, tmp_path / 'bad')
  with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
    hf.load(path)
  assert str(path) in str(info.value)  # the error names where the problem is


def test_config_validation_messages():
  with pytest.raises(ValueError, match='multiple of num_kv_heads'):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=3, num_kv_heads=2)
  with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=2, num_kv_heads=1, rope_scaling={'rope_type': 'yarn', 'factor': 2.0})
  with pytest.raises(ValueError, match=r"'llama3' needs the number\(s\) \['low_freq_factor', "
                                       r"'high_freq_factor', 'original_max_position_embeddings'\]"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=2, num_kv_heads=1, rope_scaling={'rope_type': 'llama3', 'factor': 8.0})


def test_auto_compute_dtype_follows_the_matmul_hardware():
  """'auto' is bfloat16 on accelerators and on CPUs with bfloat16 matmul
  instructions, float32 on CPUs that would convert around every matmul."""
  from jpost.models import config
  assert config.dtype_for('gpu', frozenset()) == 'bfloat16'
  assert config.dtype_for('tpu', frozenset()) == 'bfloat16'
  assert config.dtype_for('cpu', frozenset({'avx2', 'fma'})) == 'float32'  # e.g. an EPYC, no AVX-512
  assert config.dtype_for('cpu', frozenset({'avx512f', 'avx512_bf16'})) == 'bfloat16'
  assert config.dtype_for('cpu', frozenset({'amx_tile', 'amx_bf16'})) == 'bfloat16'
  assert config.dtype_for('cpu', frozenset({'asimd', 'bf16'})) == 'bfloat16'  # Arm
  here = config.dtype_for(jax.default_backend(), config.cpu_flags())
  auto = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                     num_heads=2, num_kv_heads=1, dtype='auto')
  assert auto.dtype == here == config.resolve_dtype('auto')
  assert config.resolve_dtype('float16') == 'float16'


@pytest.mark.parametrize('w_is_fd', [False, True])  # [F, D]: the tied LM head
@pytest.mark.parametrize('d,f', [(8, 5), (5, 8)])  # the CPU transposes the narrower operand
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dense_gradient_matches_autodiff(dtype, d, f, w_is_fd):
  """`dense` has a hand-written backward (to keep bfloat16 matmuls on the fast
  float32-accumulating path); it must equal autodiff of the plain product,
  for a weight stored [D, F] and (the tied LM head, as [tokens, D] matmuls
  on the CPU) [F, D] with a float32 result."""
  from jpost.models.decoder import dense
  dense = functools.partial(dense, w_is_fd=w_is_fd, float32_out=w_is_fd)
  x = jax.random.normal(jax.random.key(0), (2, 3, d)).astype(dtype)
  # float32 master weight
  w = jax.random.normal(jax.random.key(1), (f, d) if w_is_fd else (d, f))
  cotangent = jax.random.normal(jax.random.key(2), (2, 3, f))
  out_dtype = 'float32' if w_is_fd else dtype

  def loss(fn, x, w):
    return (fn(x, w).astype(jax.numpy.float32) * cotangent).sum()

  reference = lambda x, w: (x.astype('float32') @ (w.T if w_is_fd else w)).astype(out_dtype)
  out, ref_out = dense(x, w), reference(x, w)
  assert out.dtype == jax.numpy.dtype(out_dtype) and out.shape == (2, 3, f)
  (dx, dw), (ref_dx, ref_dw) = (jax.grad(loss, argnums=(1, 2))(f, x, w)
                                for f in (dense, reference))
  chex.assert_trees_all_equal_dtypes((dx, dw), (x, w))
  # float32: rounding in another order, measured 0. bfloat16 rounds out and dx
  # to 8 bits: at most 2^-8 = 3.9e-3 relative per element, measured 3.2e-3 for
  # dx. A transposed or missing term is off by O(1).
  bound = 1e-6 if dtype == 'float32' else 1e-2
  assert_norm_close({'out': np.float32(out), 'dx': np.float32(dx), 'dw': dw},
                    {'out': np.float32(ref_out), 'dx': np.float32(ref_dx), 'dw': ref_dw},
                    bound=bound)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_swiglu_gradient_matches_autodiff(dtype):
  """`swiglu` (silu(gate) * up) has a hand-written backward, one elementwise
  pass; it must equal autodiff of the textbook formula in float32, over
  gates wide enough to reach sigmoid's flat tails."""
  from jpost.models.decoder import swiglu
  gate = (6 * jax.random.normal(jax.random.key(0), (4, 5, 16))).astype(dtype)
  up = jax.random.normal(jax.random.key(1), (4, 5, 16)).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(2), (4, 5, 16))

  def loss(fn, gate, up):
    return (fn(gate, up).astype(jax.numpy.float32) * cotangent).sum()

  reference = lambda g, u: jax.nn.silu(g.astype('float32')) * u.astype('float32')
  out = swiglu(gate, up)
  assert out.dtype == jax.numpy.dtype(dtype)
  grads = jax.grad(loss, argnums=(1, 2))(swiglu, gate, up)
  ref_grads = jax.grad(loss, argnums=(1, 2))(reference, gate, up)
  chex.assert_trees_all_equal_dtypes(grads, (gate, up))
  # float32: another order of the same operations. bfloat16: the output and
  # both gradients rounded once to 8 bits (at most 3.9e-3 relative each); a
  # wrong term in silu's derivative is off by O(1).
  bound = 1e-6 if dtype == 'float32' else 1e-2
  assert_norm_close({'out': np.float32(out), 'd_gate': np.float32(grads[0]),
                     'd_up': np.float32(grads[1])},
                    {'out': np.float32(reference(gate, up)), 'd_gate': np.float32(ref_grads[0]),
                     'd_up': np.float32(ref_grads[1])}, bound=bound)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_rope_gradient_matches_autodiff(dtype):
  """`apply_rope` has a hand-written backward (the inverse rotation); it must
  equal autodiff of the rotate-half formula in float32, at real positions of
  a packed row (positions restart) and a head size of 64."""
  import jax.numpy as jnp

  from jpost.models import decoder
  cfg = ModelConfig(vocab_size=8, hidden_size=128, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1)
  positions = jnp.asarray([list(range(7)) + list(range(5))] * 2)
  cos, sin = decoder.rope_tables(positions, cfg)
  x = jax.random.normal(jax.random.key(0), (2, 12, 2, 64)).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(1), (2, 12, 2, 64))

  def reference(x):
    x32, half = x.astype('float32'), x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return x32 * cos[:, :, None] + rotated * sin[:, :, None]

  loss = lambda fn: lambda x: (fn(x).astype('float32') * cotangent).sum()
  dx = jax.grad(loss(lambda x: decoder.apply_rope(x, cos, sin)))(x)
  assert dx.dtype == x.dtype
  # float32: the same products in another order. bfloat16: out and dx
  # rounded once to 8 bits; a rotation the wrong way round is off by O(1).
  bound = 1e-6 if dtype == 'float32' else 1e-2
  assert_norm_close({'out': np.float32(decoder.apply_rope(x, cos, sin)), 'dx': np.float32(dx)},
                    {'out': np.float32(reference(x)),
                     'dx': np.float32(jax.grad(loss(reference))(x))}, bound=bound)


def test_a_local_checkpoint_folder_wins_over_an_embedded_name(tiny_checkpoint, tmp_path,
                                                               monkeypatch):
  from jpost.models import pretrained
  name = 'smollm2-135m-instruct'
  assert name in pretrained.EMBEDDED
  monkeypatch.chdir(tmp_path)
  (tmp_path / name).mkdir()  # a folder of that name without a checkpoint: still the embedded
  embedded = pretrained.resolve(name)
  assert embedded != tmp_path / name and (embedded / 'config.json').is_file()
  for item in tiny_checkpoint.iterdir():  # now a checkpoint there: it is the one loaded
    (tmp_path / name / item.name).write_bytes(item.read_bytes())
  assert pretrained.resolve(name).resolve() == (tmp_path / name).resolve()
  assert hf.load(name).config.num_layers == 2
