"""An OpenAI-compatible server and the Arena over jpost's own sampler.

  python -m jpost.main --config=configs/serve.py --workdir=runs/serve
  python -m jpost.main --config=configs/serve.py:tiny --workdir=runs/serve_tiny \\
      --config.models.smollm2=runs/sft/hf

Then: `openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-')`, or
http://127.0.0.1:8000/arena in a browser (two models or more). `models` maps
the names clients ask for to an HF checkpoint directory, a .gguf file, an
embedded name ('smollm2-135m-instruct') or a trained run's `hf/` folder.
Votes are kept in `arena.db` (default workdir/arena.sqlite); export them
with `python -m jpost.serve.export --db=runs/serve/arena.sqlite ...`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'serve'
  c.models = ml_collections.ConfigDict({'smollm2-135m-instruct': 'smollm2-135m-instruct'})
  c.dtype = 'float32'
  c.host = '127.0.0.1'  # loopback only; '0.0.0.0' exposes the server to the network
  c.port = 8000
  # The name of an environment variable holding the API key clients must send
  # as `Authorization: Bearer <key>` (the key itself never goes in a config); '' = none.
  c.api_key_env = ''
  c.max_body_bytes = 1 << 20
  c.max_concurrent_requests = 256
  # Continuous batching: `slots` rows decode together, a request joins at the
  # next step; 'static' waits for a full batch (or static_wait_s) and runs it out.
  c.engine = ml_collections.ConfigDict(dict(
      slots=16, cache_len=2048, mode='continuous', static_wait_s=0.05, max_waiting=256))
  c.arena = ml_collections.ConfigDict(dict(
      enabled=True, db='', max_tokens=256, temperature=0.7))
  if arg == 'tiny':
    c.port = 0  # a free port, printed at start
    c.engine.slots = 4
    c.engine.cache_len = 256
    c.arena.max_tokens = 32
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "tiny" or nothing.')
  return c.lock()
