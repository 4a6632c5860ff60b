"""Test set-up: 8 fake CPU devices so sharding code runs on one machine."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
  """A randomly initialised 2-layer Llama with SmolLM2's real tokenizer, saved
  as an HF checkpoint directory: real files, fast to train on 2 cores."""
  from flax import nnx

  from jpost.models import hf, pretrained
  from jpost.models.config import ModelConfig
  from jpost.models.decoder import Decoder
  from jpost.tokenizer import Tokenizer

  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, tie_embeddings=True,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  path = tmp_path_factory.mktemp('tiny_llama')
  hf.save(Decoder(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tokenizer)
  return path
