"""SmolLM2-135M-Instruct from its GGUF: jpost against transformers' own GGUF
loading of the same file (an independent dequantisation and mapping)."""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jpost import assets
from jpost.models import gguf as jgguf
from jpost.models import hf, pretrained


@pytest.fixture(scope='module')
def gguf_file():
  return assets.fetch('smollm2-135m-instruct.gguf')


@pytest.fixture(scope='module')
def checkpoint():
  return pretrained.resolve('smollm2-135m-instruct')


@pytest.fixture(scope='module')
def reference(gguf_file):
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def model(checkpoint):
  return hf.load(checkpoint)


def test_config_read_from_gguf_metadata(checkpoint):
  config = json.loads((checkpoint / 'config.json').read_text())
  assert config['num_hidden_layers'] == 30 and config['hidden_size'] == 576
  assert config['num_attention_heads'] == 9 and config['num_key_value_heads'] == 3
  assert config['tie_word_embeddings'] is True and config['vocab_size'] == 49152
  assert config['rope_theta'] == 100000.0 and config['rms_norm_eps'] == pytest.approx(1e-5)


def test_unpermute_inverts_llama_cpp_permutation():
  heads, head_dim = 3, 8
  weight = np.arange(heads * head_dim * 5, dtype=np.float32).reshape(heads * head_dim, 5)
  # llama.cpp's convert script: reshape(n_head, 2, dim // n_head // 2, ...).swapaxes(1, 2)
  permuted = weight.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(weight.shape)
  np.testing.assert_array_equal(jgguf.unpermute_rotary(permuted, heads), weight)


def test_gguf_tensors_without_an_hf_name_are_an_error(gguf_file):
  """Every tensor in the file must map to an HF name: with a config of one
  layer fewer, layer 29's tensors would otherwise be dropped unread."""
  import gguf
  from jpost.errors import ConfigError
  reader = gguf.GGUFReader(gguf_file)
  config = jgguf.hf_config_from_gguf(reader, source='smollm2.gguf') | {'num_hidden_layers': 29}
  with pytest.raises(ConfigError, match=r"smollm2.gguf: GGUF tensors with no HF mapping: "
                                        r"\['blk\.29\."):
    jgguf.hf_tensors_from_gguf(reader, config, source='smollm2.gguf')


def test_weights_equal_transformers_gguf_loading(model, reference):
  state = reference.state_dict()
  ours = hf.params_to_hf(model)
  assert set(ours) == set(state) - {'lm_head.weight'}  # tied: one copy
  for name in ('model.layers.0.self_attn.q_proj.weight', 'model.layers.7.self_attn.k_proj.weight',
               'model.layers.29.mlp.down_proj.weight', 'model.embed_tokens.weight'):
    np.testing.assert_array_equal(ours[name], state[name].numpy(), err_msg=name)


def test_logits_match_transformers_on_chat_prompt(model, reference, checkpoint):
  from jpost.tokenizer import Tokenizer
  tokenizer = Tokenizer.from_dir(checkpoint)
  ids = tokenizer.encode_chat(
      [{'role': 'system', 'content': 'You are a concise assistant.'},
       {'role': 'user', 'content': 'What is the capital of France? Answer in 5 words.'}],
      add_generation_prompt=True).ids
  tokens = np.asarray(ids)[None]
  out = np.asarray(nnx.jit(lambda m, t, p, s: m(t, p, s))(
      model, tokens, np.arange(len(ids))[None], np.ones_like(tokens)))
  with torch.no_grad():
    ref = reference(torch.tensor(tokens)).logits.numpy()
  assert np.abs(out - ref).max() <= 1e-3
  assert (out[0, -1].argmax() == ref[0, -1].argmax())


def _tiny_gguf(path, *, rope: dict = {}, tokenizer_model: str = 'gpt2'):
  """A one-layer llama GGUF of random weights with the given rope.* metadata."""
  import gguf
  writer = gguf.GGUFWriter(path, 'llama')
  dim, ffn = 8, 16
  writer.add_block_count(1)
  writer.add_embedding_length(dim)
  writer.add_feed_forward_length(ffn)
  writer.add_head_count(2)
  writer.add_head_count_kv(2)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_context_length(64)
  writer.add_vocab_size(4)
  for key, value in rope.items():
    (writer.add_string if isinstance(value, str) else
     writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f'llama.rope.{key}', value)
  writer.add_tokenizer_model(tokenizer_model)
  writer.add_token_list(['<unk>', '<s>', '</s>', 'a'])
  writer.add_token_types([2, 3, 3, 1])
  rng = np.random.RandomState(0)
  shapes = {'token_embd': (4, dim), 'output_norm': (dim,)} | {
      f'blk.0.{name}': shape for name, shape in [
          ('attn_norm', (dim,)), ('attn_q', (dim, dim)), ('attn_k', (dim, dim)),
          ('attn_v', (dim, dim)), ('attn_output', (dim, dim)), ('ffn_norm', (dim,)),
          ('ffn_gate', (ffn, dim)), ('ffn_up', (ffn, dim)), ('ffn_down', (dim, ffn))]}
  for name, shape in shapes.items():
    writer.add_tensor(f'{name}.weight', rng.randn(*shape).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return gguf.GGUFReader(path)


@pytest.mark.parametrize('rope, scaling', [
    ({}, None),
    ({'scaling.type': 'none'}, None),
    ({'scaling.type': 'linear', 'scaling.factor': 4.0}, {'rope_type': 'linear', 'factor': 4.0}),
    ({'scale_linear': 2.0}, {'rope_type': 'linear', 'factor': 2.0}),  # the older key
])
def test_rope_scaling_read_from_gguf_metadata(tmp_path, rope, scaling):
  config = jgguf.hf_config_from_gguf(_tiny_gguf(tmp_path / 'x.gguf', rope=rope), source='x')
  assert config['rope_scaling'] == scaling and config['head_dim'] == 4
  hf.write_checkpoint({}, config, tmp_path / 'hf')
  read = transformers.AutoConfig.from_pretrained(tmp_path / 'hf').rope_scaling
  assert read == (scaling or {'rope_type': 'default'}) | {'rope_theta': 10000.0}


@pytest.mark.parametrize('rope, message', [
    ({'scaling.type': 'yarn', 'scaling.factor': 4.0}, r"RoPE scaling 'yarn'"),
    ({'dimension_count': 2}, r'rotates 2 of each head\'s 4 dimensions'),
])
def test_gguf_rope_settings_jpost_cannot_honour_are_errors(tmp_path, rope, message):
  """Dropped, they would put every position past the original context in the wrong place."""
  from jpost.errors import ConfigError
  with pytest.raises(ConfigError, match=message):
    jgguf.hf_config_from_gguf(_tiny_gguf(tmp_path / 'x.gguf', rope=rope), source='x')


def test_a_sentencepiece_gguf_is_refused_before_its_weights_are_converted(tmp_path):
  from jpost.errors import ConfigError
  _tiny_gguf(tmp_path / 'spm.gguf', tokenizer_model='llama')
  with pytest.raises(ConfigError, match=r"spm.gguf: GGUF tokenizer.ggml.model is 'llama'"):
    jgguf.convert(tmp_path / 'spm.gguf', tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
