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


@pytest.fixture
def chat_server(monkeypatch):
  """serve(reply) -> base URL of a real local OpenAI-compatible chat endpoint.

  reply(request_body: dict) -> (HTTP status, message content or error body).
  Proxies are unset so the judge client talks to it directly."""
  import http.server
  import json
  import threading

  for name in ('http_proxy', 'HTTP_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(name, raising=False)
  servers = []

  def serve(reply):
    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        status, content = reply(body)
        if status == 200:
          content = json.dumps({'object': 'chat.completion', 'choices': [{
              'index': 0, 'message': {'role': 'assistant', 'content': content},
              'finish_reason': 'stop'}]})
        payload = content.encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      def log_message(self, *args):
        pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    servers.append(httpd)
    return f'http://127.0.0.1:{httpd.server_address[1]}/v1'

  yield serve
  for httpd in servers:
    httpd.shutdown()
    httpd.server_close()
