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
