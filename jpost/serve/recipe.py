"""The `serve` recipe: load the configured models, start one engine each,
and serve the OpenAI API and the Arena with uvicorn until interrupted.

  python -m jpost.main --config=configs/serve.py --workdir=runs/serve
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import sys
import threading
import time

import uvicorn

from jpost.errors import ConfigError
from jpost.serve import api, arena as arena_lib, engine as engine_lib, votes as votes_lib
from jpost.trainers import register


def load_models(models: dict[str, str], *, dtype: str, engine_config: engine_lib.EngineConfig
                ) -> dict[str, api.ServedModel]:
  """name -> ServedModel for each name -> path (HF dir, .gguf, embedded name, a run's hf/)."""
  from jpost.models import hf, pretrained
  from jpost.tokenizer import Tokenizer

  if not models:
    raise ConfigError('config.models is empty: map at least one name to a model path, e.g. '
                      "--config.models='{\"smollm2\": \"smollm2-135m-instruct\"}'.")
  served = {}
  for name, path in models.items():
    resolved = pretrained.resolve(path)
    model = hf.load(resolved, dtype=dtype, param_dtype=dtype)
    tokenizer = Tokenizer.from_dir(resolved)
    if tokenizer.chat_template is None:
      raise ConfigError(f'model {name!r} ({path}) has no chat template; the chat API needs one.')
    limit = model.config.max_position_embeddings
    if engine_config.cache_len > limit:  # one setting for models of several context lengths
      print(f'serve: model {name!r}: engine.cache_len {engine_config.cache_len} -> {limit}, '
            'its max_position_embeddings', file=sys.stderr, flush=True)
    config = dataclasses.replace(engine_config, cache_len=min(engine_config.cache_len, limit))
    served[name] = api.ServedModel(name=name, engine=engine_lib.Engine(model, tokenizer, config),
                                   tokenizer=tokenizer)
  return served


def build_app(served: dict[str, api.ServedModel], server_config: api.ServerConfig,
              *, arena_db: str | os.PathLike | None = None,
              arena_config: arena_lib.ArenaConfig | None = None):
  """The FastAPI app over started engines; with `arena_db`, the Arena too."""
  server = api.Server(served, server_config)
  app = api.create_app(server)
  if arena_db is not None:
    arena = arena_lib.Arena(server, votes_lib.VoteStore(arena_db),
                            arena_config or arena_lib.ArenaConfig())
    arena_lib.add_routes(app, arena)
  return app


def bound_socket(host: str, port: int) -> socket.socket:
  """A listening socket (port 0: a free one), so the port is known before serving."""
  sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise ConfigError(f'cannot listen on {host}:{port}: {e.strerror}; pick another '
                      '--config.port (0 picks a free one).') from None
  sock.listen(2048)  # connections made before the server runs wait in the backlog
  return sock


class Background:
  """An app served by uvicorn in a thread of this process (tests, benches)."""

  def __init__(self, app, host: str = '127.0.0.1', port: int = 0):
    self.sock = bound_socket(host, port)
    self.url = f'http://{host}:{self.sock.getsockname()[1]}'
    self.server = uvicorn.Server(uvicorn.Config(app, log_level='warning', lifespan='off'))
    self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [self.sock]},
                                   daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started and time.monotonic() < deadline and self.thread.is_alive():
      time.sleep(0.01)
    if not self.server.started:
      raise RuntimeError(f'the server at {self.url} did not start.')

  def stop(self):
    self.server.should_exit = True
    self.thread.join(timeout=30)
    self.sock.close()


def engine_config(config) -> engine_lib.EngineConfig:
  try:
    return engine_lib.EngineConfig(slots=config.engine.slots, cache_len=config.engine.cache_len,
                                   mode=config.engine.mode,
                                   static_wait_s=config.engine.static_wait_s,
                                   max_waiting=config.engine.max_waiting)
  except ValueError as e:
    raise ConfigError(f'config.engine: {e}') from None


@register('serve')
def run(config, workdir: str | None):
  api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
  if config.api_key_env and not api_key:
    raise ConfigError(f'config.api_key_env={config.api_key_env!r} names an environment variable '
                      'that is not set; set it to the key clients must send, or set '
                      "--config.api_key_env='' to serve without a key.")
  served = load_models(dict(config.models), dtype=config.dtype,
                       engine_config=engine_config(config))
  for model in served.values():
    model.engine.start()
  arena_db = None
  if config.arena.enabled:
    arena_db = config.arena.db or (pathlib.Path(workdir or '.') / 'arena.sqlite')
  app = build_app(served, api.ServerConfig(
      api_key=api_key, max_body_bytes=config.max_body_bytes,
      max_concurrent_requests=config.max_concurrent_requests),
      arena_db=arena_db, arena_config=arena_lib.ArenaConfig(
          max_tokens=config.arena.max_tokens, temperature=config.arena.temperature))
  sock = bound_socket(config.host, config.port)
  host, port = sock.getsockname()[:2]
  print(f'serving {sorted(served)} at http://{host}:{port}/v1'
        + (f', Arena at http://{host}:{port}/arena (votes in {arena_db})' if arena_db else ''),
        file=sys.stderr, flush=True)
  uvicorn.Server(uvicorn.Config(app, log_level='warning')).run(sockets=[sock])
  for model in served.values():
    model.engine.stop()
