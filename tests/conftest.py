"""Test set-up: 8 fake CPU devices so sharding code runs on one machine, XLA
flags that compile fast (xla_env.py), and one compilation cache for the
whole session."""

import os
import shutil
import tempfile

from xla_env import xla_flags

os.environ.setdefault('XLA_FLAGS', xla_flags(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# `jpost.main` subprocesses start without asking for huge pages
# (jpost/host.py): a fault of a 2 MB page costs milliseconds of system time
# on the 2-core machines, which a long training run earns back and a test's
# few steps do not
# (tests/test_main.py and test_online.py: 133 -> 106 s, system time 58 -> 31 s).
# test_host.py still runs the restart itself.
os.environ.setdefault('JPOST_HUGE_PAGES', '0')
if os.environ.get('PYTEST_XDIST_WORKER'):
  # Two test workers share the cores: PyTorch's OpenMP threads (the reference
  # models) spin-wait for cores the other worker holds, and a 22 s test took
  # 171 s. One thread each keeps both workers busy without that.
  os.environ.setdefault('OMP_NUM_THREADS', '1')
  # XLA's thread pools do the same: each worker's XLA (and its subprocesses',
  # which inherit this) sized its pool to every core, and the workers' threads
  # contended for them. Each worker on a core of its own (round robin when
  # there are more workers than cores): on 2 cores the suite's test time
  # went from 12 min 0 s to 9 min 34 s and its user CPU time from 20.1 to
  # 14.6 min (bench/RESULTS.md); tests that run processes side by side
  # (client and server, two training processes) take longer, the rest less.
  if hasattr(os, 'sched_setaffinity'):  # Linux; elsewhere the workers share the cores
    _cpus = sorted(os.sched_getaffinity(0))
    _worker = int(os.environ['PYTEST_XDIST_WORKER'].removeprefix('gw'))
    os.sched_setaffinity(0, {_cpus[_worker % len(_cpus)]})

import pytest  # noqa: E402

_CACHE_ENV = 'JPOST_TEST_XLA_CACHE'


def pytest_configure(config):
  """XLA's compiled programs are kept in one folder for the session: tests
  that compile the same program (the same tiny model's step, in this process,
  in another test worker, or in a `jpost.main` subprocess) compile it once.
  The folder is new for each session, so a run measures a fresh machine, and
  it never touches the user's own cache. Workers inherit it from the main
  process through the environment."""
  if _CACHE_ENV not in os.environ:  # the main process (or the only one)
    folder = tempfile.mkdtemp(prefix='jpost-test-xla-')
    os.environ[_CACHE_ENV] = folder
    config._jpost_cache_to_remove = folder
  folder = os.environ[_CACHE_ENV]
  os.environ['JAX_COMPILATION_CACHE_DIR'] = folder
  # Cache every program, not only those that took a second to compile: most of
  # the suite's programs are small, and many compile again in another test.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  import jax
  from jpost.main import compilation_cache_is_safe
  if not compilation_cache_is_safe() and not _cache_one_device_programs_only():
    jax.config.update('jax_enable_compilation_cache', False)
    return
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _cache_one_device_programs_only():
  """With several CPU devices in this process, programs that span them may
  deadlock when loaded from the cache (`jpost.main.compilation_cache_is_safe`);
  a program on one device has no collectives. So only those use the cache:
  the key of every program on several devices is None, which is what jax's
  compiler reads as "not cached". jax's private hook; where it has moved, the
  cache stays off (False)."""
  from jax._src import compiler
  get_cache_key = getattr(compiler, '_get_cache_key', None)
  if get_cache_key is None:
    return False

  def one_device_cache_key(*args, devices, **kwargs):
    if devices.size > 1:
      return None
    return get_cache_key(*args, devices=devices, **kwargs)

  compiler._get_cache_key = one_device_cache_key
  return True


def pytest_unconfigure(config):
  folder = getattr(config, '_jpost_cache_to_remove', None)
  if folder:
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def without_a_compiler(tmp_path):
  """Runs a Python snippet in a fresh process on one CPU device with no C++
  compiler and an empty jpost cache (so jpost's kernels cannot be built);
  returns the finished process, stdout and stderr as text."""
  import subprocess
  import sys

  def run(script: str):
    env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'), JPOST_CACHE=str(tmp_path),
               XLA_FLAGS='', JAX_PLATFORMS='cpu')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result
  return run


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


@pytest.fixture(scope='session')
def shallow_smollm2(tmp_path_factory):
  """SmolLM2-135M-Instruct cut to its first 6 of 30 layers: real weights and
  tokenizer as an HF checkpoint directory, for tests of the sampler's mechanics
  (cache, log-probs, streaming, layer scan) that hold at any depth and cost a
  fifth as much here. Parity with transformers uses the whole model."""
  import json
  import shutil

  from safetensors.numpy import load_file, save_file

  from jpost.models import pretrained

  keep = 6
  source = pretrained.resolve('smollm2-135m-instruct')
  path = tmp_path_factory.mktemp('smollm2_6_layers')
  for name in ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json'):
    if (source / name).is_file():
      shutil.copy(source / name, path / name)
  config = json.loads((source / 'config.json').read_text())
  config['num_hidden_layers'] = keep
  (path / 'config.json').write_text(json.dumps(config, indent=2))
  tensors = load_file(source / 'model.safetensors')
  save_file({name: value for name, value in tensors.items()
             if not name.startswith('model.layers.') or int(name.split('.')[2]) < keep},
            path / 'model.safetensors', metadata={'format': 'pt'})
  return path


CHAR_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_char_tokenizer(path, extra_tokens=()):
  """A character-level ChatML tokenizer of 95 tokens (then `extra_tokens`,
  whole strings, as the last ids): with so small a vocabulary a random
  model's samples vary enough for RL to find a signal."""
  import json

  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<unk>']
  chars = sorted(set(' \n0123456789+-*/=?.,!:;#{}()\\\'"abcdefghijklmnopqrstuvwxyz'
                     'ABCDEFGHIJKLMNOPQRSTUVWXYZ'))
  vocab = {t: i for i, t in enumerate(specials + chars + list(extra_tokens))}
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


@pytest.fixture(scope='session')
def digit_share():
  """The toy verifiable task's reward (the share of digits in a completion),
  registered once per worker by the config file the subprocess tests use."""
  import digit_share_config  # noqa: F401  (registers 'digit_share')
  return 'digit_share'


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


@pytest.fixture
def one_device(monkeypatch):
  """A recipe's mesh (`config.mesh`, through `sharding.make_mesh`) holds only
  the first of this process's 8 CPU devices: a one-device user's mesh. The
  suite's 8 fake devices share one core and meet in rendezvous, so a tiny RL
  run's steps take ~2x as long on them (test_online.py's runs: 163 -> 115 s
  of worker time). Tests of learning, rewards and errors take this fixture;
  tests of the mesh, of resuming on it and of per-device figures keep all 8.
  Choices made by device count (jax.device_count(): the CPU kernels) stay as
  in the rest of the suite."""
  import jax

  from jpost import sharding
  every = sharding.make_mesh

  def first_device(shape=(), *, devices=None):
    return every(shape, devices=jax.devices()[:1] if devices is None else devices)
  monkeypatch.setattr(sharding, 'make_mesh', first_device)
