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


CHAR_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_char_tokenizer(path):
  """A character-level ChatML tokenizer of 95 tokens: with so small a
  vocabulary a random model's samples vary enough for RL to find a signal."""
  import json

  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<unk>']
  chars = sorted(set(' \n0123456789+-*/=?.,!:;#{}()\\\'"abcdefghijklmnopqrstuvwxyz'
                     'ABCDEFGHIJKLMNOPQRSTUVWXYZ'))
  vocab = {t: i for i, t in enumerate(specials + chars)}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r'[\s\S]'), behavior='isolated')
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens(specials[:3])
  path.mkdir(parents=True, exist_ok=True)
  backend.save(str(path / 'tokenizer.json'))
  (path / 'tokenizer_config.json').write_text(json.dumps({
      'eos_token': '<|im_end|>', 'bos_token': '<|im_start|>', 'pad_token': '<|endoftext|>',
      'chat_template': CHAR_TEMPLATE}))
  return len(vocab)


@pytest.fixture(scope='session')
def char_checkpoint(tmp_path_factory):
  """A random 2-layer Llama over a character vocabulary: RL tests on a toy
  verifiable task learn in seconds with it."""
  from flax import nnx

  from jpost.models import hf
  from jpost.models.config import ModelConfig
  from jpost.models.decoder import Decoder
  from jpost.tokenizer import Tokenizer

  path = tmp_path_factory.mktemp('char_llama')
  vocab_size = write_char_tokenizer(path)
  tokenizer = Tokenizer.from_dir(path)
  cfg = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, tie_embeddings=True,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  hf.save(Decoder(cfg, rngs=nnx.Rngs(0)), path, tokenizer=tokenizer)
  return path
