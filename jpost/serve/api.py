"""The OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions,
/v1/completions (streamed as server-sent events with `stream`), and
/health + /metrics with each engine's slots and counters.

Every error is OpenAI's JSON shape with a 4xx status: a client library
raises its usual exception types (NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jpost.serve import engine as engine_lib
from jpost.serve import params
from jpost.serve.params import ApiError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServedModel:
  name: str
  engine: engine_lib.Engine
  tokenizer: object


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  api_key: str | None = None  # when set, every route needs `Authorization: Bearer <key>`
  max_body_bytes: int = 1 << 20
  max_concurrent_requests: int = 256  # across models, running and waiting; more get 429


class Server:
  """What the routes share: the served models and the count of open requests."""

  def __init__(self, models: dict[str, ServedModel], config: ServerConfig):
    if not models:
      raise ValueError('no models to serve.')
    self.models = models
    self.config = config
    self.open_requests = 0

  def model(self, body: dict) -> ServedModel:
    name = body.get('model')
    if not isinstance(name, str) or not name:
      raise ApiError(400, 'model: give the name of a served model.', param='model',
                     code='invalid_value')
    if name not in self.models:
      raise ApiError(404, f'The model {name!r} does not exist; served models: '
                     f'{sorted(self.models)}.', param='model', code='model_not_found')
    return self.models[name]

  async def events(self, served: ServedModel, prompt_ids: list[int], s: params.Settings):
    """Yields the engine's events for one request until each choice has
    ended; if the consumer stops early (its client went away), the request
    is cancelled and its slots are freed at the next step."""
    context = served.engine.config.cache_len
    if not prompt_ids:
      raise ApiError(400, 'The prompt is empty.', param='prompt', code='invalid_value')
    max_tokens = s.max_tokens if s.max_tokens is not None else context - len(prompt_ids)
    if len(prompt_ids) + max(max_tokens, 1) > context:
      asked = '' if s.max_tokens is None else f' and max_tokens asks for {max_tokens} more'
      raise ApiError(400, f"This model's maximum context length is {context} tokens; the "
                     f'prompt has {len(prompt_ids)}{asked}. Shorten the prompt or lower '
                     'max_tokens.', param='messages',
                     code='context_length_exceeded')
    if self.open_requests >= self.config.max_concurrent_requests:
      raise ApiError(429, f'Too many concurrent requests (limit '
                     f'{self.config.max_concurrent_requests}); retry later.',
                     kind='rate_limit_exceeded', code='rate_limit_exceeded')
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    request = engine_lib.Request(
        prompt_ids=list(prompt_ids), max_tokens=max_tokens, n=s.n, temperature=s.temperature,
        top_p=s.top_p, seed=None if s.seed is None else s.seed % (1 << 31), stop=s.stop,
        logprobs=s.logprobs, top_logprobs=s.top_logprobs,
        emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    try:
      served.engine.submit(request)
    except engine_lib.QueueFull as e:
      raise ApiError(429, f'The server is busy: {e} Retry later.', kind='rate_limit_exceeded',
                     code='rate_limit_exceeded') from None
    self.open_requests += 1
    remaining = s.n
    try:
      while remaining:
        event = await queue.get()
        if isinstance(event, engine_lib.Failure):
          raise ApiError(500, event.message, kind='server_error', code='engine_failure')
        remaining -= isinstance(event, engine_lib.ChoiceEnd)
        yield event
    finally:
      self.open_requests -= 1
      if remaining:
        request.cancelled = True
        served.engine.wake()


def _error_response(error: ApiError) -> JSONResponse:
  return JSONResponse(error.body(), status_code=error.status)


async def read_json(request: Request, limit: int) -> dict:
  """The request body as a JSON object, at most `limit` bytes."""
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, f'Request body is over the limit of {limit} bytes.',
                     code='request_too_large')
    chunks.append(chunk)
  try:
    body = json.loads(b''.join(chunks))
    # JSON may escape a lone UTF-16 surrogate ("\ud800"), which is no text:
    # the tokenizer would fail on it deep inside the request.
    json.dumps(body, ensure_ascii=False).encode('utf-8')
  except (ValueError, UnicodeError) as e:
    raise ApiError(400, f'The body is not valid JSON text: {e}.', code='invalid_json') from None
  if not isinstance(body, dict):
    raise ApiError(400, 'The body must be a JSON object.', code='invalid_json')
  return body


def _token_text(data: bytes) -> str:
  """A token as OpenAI shows it: its text, or `bytes:\\xe4\\xbd` when it holds
  part of a UTF-8 character (its `bytes` field lets a client join such parts)."""
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    return 'bytes:' + ''.join(f'\\x{b:02x}' for b in data)


def _token_logprob(info: engine_lib.TokenInfo) -> dict:
  return {'token': _token_text(info.data), 'logprob': info.logprob, 'bytes': list(info.data),
          'top_logprobs': [{'token': _token_text(b), 'logprob': lp, 'bytes': list(b)}
                           for b, lp in info.top]}


def _completion_logprobs(tokens: list[engine_lib.TokenInfo], offset: int) -> dict:
  """Legacy completions' logprobs; a token's text_offset is where its first
  whole character starts in the text (the parts of one character share it)."""
  decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
  offsets, at = [], offset
  for info in tokens:
    offsets.append(at)
    at += len(decoder.decode(info.data))
  return {'tokens': [_token_text(t.data) for t in tokens],
          'token_logprobs': [t.logprob for t in tokens],
          'top_logprobs': ([{_token_text(b): lp for b, lp in t.top} for t in tokens]
                           if any(t.top for t in tokens) else None),
          'text_offset': offsets}


def _sse(payload) -> str:
  return f'data: {json.dumps(payload)}\n\n'


async def _respond(server: Server, served: ServedModel, prompt_ids, s: params.Settings, chat: bool):
  """A complete response object, or a streaming response of chunks."""
  ident = ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex
  created = int(time.time())
  kind = 'chat.completion' if chat else 'text_completion'
  head = {'id': ident, 'created': created, 'model': served.name}
  events = server.events(served, prompt_ids, s)
  first = await anext(events)  # errors before the first token are plain HTTP errors

  async def all_events():
    yield first
    async for event in events:
      yield event

  def usage(completion_tokens):
    return {'prompt_tokens': len(prompt_ids), 'completion_tokens': completion_tokens,
            'total_tokens': len(prompt_ids) + completion_tokens}

  if not s.stream:
    texts, tokens, ends = [''] * s.n, [[] for _ in range(s.n)], {}
    async for event in all_events():
      if isinstance(event, engine_lib.Delta):
        texts[event.choice] += event.text
        tokens[event.choice] += event.tokens
      else:
        ends[event.choice] = event
    choices = []
    for i in range(s.n):
      choice = {'index': i, 'finish_reason': ends[i].finish_reason, 'logprobs': None}
      if chat:
        choice['message'] = {'role': 'assistant', 'content': texts[i]}
        if s.logprobs:
          choice['logprobs'] = {'content': [_token_logprob(t) for t in tokens[i]]}
      else:
        choice['text'] = texts[i]
        if s.logprobs:
          choice['logprobs'] = _completion_logprobs(tokens[i], 0)
      choices.append(choice)
    total = sum(e.completion_tokens for e in ends.values())
    return JSONResponse({**head, 'object': kind, 'choices': choices, 'usage': usage(total)})

  chunk_kind = 'chat.completion.chunk' if chat else 'text_completion'

  def chunk(choices, **extra):
    return _sse({**head, 'object': chunk_kind, 'choices': choices, **extra})

  async def body():
    total, offsets = 0, [0] * s.n
    try:
      if chat:
        yield chunk([{'index': i, 'delta': {'role': 'assistant', 'content': ''},
                      'finish_reason': None, 'logprobs': None} for i in range(s.n)])
      async for event in all_events():
        if isinstance(event, engine_lib.Delta):
          logprobs = None
          if chat:
            if s.logprobs:
              logprobs = {'content': [_token_logprob(t) for t in event.tokens]}
            yield chunk([{'index': event.choice, 'delta': {'content': event.text},
                          'finish_reason': None, 'logprobs': logprobs}])
          else:
            if s.logprobs:
              logprobs = _completion_logprobs(list(event.tokens), offsets[event.choice])
            offsets[event.choice] += len(event.text)
            yield chunk([{'index': event.choice, 'text': event.text, 'finish_reason': None,
                          'logprobs': logprobs}])
        else:
          total += event.completion_tokens
          end = {'index': event.choice, 'finish_reason': event.finish_reason, 'logprobs': None}
          yield chunk([end | ({'delta': {}} if chat else {'text': ''})])
      if s.include_usage:
        yield chunk([], usage=usage(total))
      yield 'data: [DONE]\n\n'
    except ApiError as e:  # the engine failed mid-stream: the client sees why
      yield _sse(e.body())

  return StreamingResponse(body(), media_type='text/event-stream',
                           headers={'Cache-Control': 'no-cache'})


def create_app(server: Server) -> FastAPI:
  app = FastAPI(title='jpost', docs_url=None, redoc_url=None, openapi_url=None)
  app.state.server = server

  @app.middleware('http')
  async def guard(request: Request, call_next):
    """The API key and the body size limit, before any route runs."""
    key = server.config.api_key
    if key and request.headers.get('authorization', '') != f'Bearer {key}':
      return _error_response(ApiError(
          401, 'Missing or wrong API key: send "Authorization: Bearer <key>".',
          code='invalid_api_key'))
    length = request.headers.get('content-length')
    if length is not None and (not length.isdigit() or int(length) > server.config.max_body_bytes):
      return _error_response(ApiError(
          413, f'Request body is over the limit of {server.config.max_body_bytes} bytes.',
          code='request_too_large'))
    return await call_next(request)

  @app.exception_handler(ApiError)
  async def api_error(request, error: ApiError):
    return _error_response(error)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, error):
    return _error_response(ApiError(error.status_code, str(error.detail), code=None))

  @app.get('/health')
  async def health():
    return {'status': 'ok', 'open_requests': server.open_requests,
            'models': {name: m.engine.metrics() for name, m in server.models.items()}}

  @app.get('/metrics')
  async def metrics():
    return await health()

  @app.get('/v1/models')
  async def list_models():
    return {'object': 'list', 'data': [
        {'id': name, 'object': 'model', 'created': 0, 'owned_by': 'jpost'}
        for name in server.models]}

  @app.post('/v1/chat/completions')
  async def chat_completions(request: Request):
    body = await read_json(request, server.config.max_body_bytes)
    served = server.model(body)
    messages = params.messages(body)
    s = params.settings(body, chat=True, max_n=served.engine.config.slots)
    try:
      ids = served.tokenizer.encode_chat(messages, add_generation_prompt=True).ids
    except ValueError as e:
      raise ApiError(400, f'messages: {e}', param='messages', code='invalid_value') from None
    return await _respond(server, served, ids, s, chat=True)

  @app.post('/v1/completions')
  async def completions(request: Request):
    body = await read_json(request, server.config.max_body_bytes)
    served = server.model(body)
    prompt = params.prompt(body)
    s = params.settings(body, chat=False, max_n=served.engine.config.slots)
    if isinstance(prompt, str):
      # With the tokenizer's own special tokens (Llama's bos), as transformers
      # and vLLM encode a completions prompt and jpost's text rows are trained.
      ids = served.tokenizer.encode(prompt, add_special_tokens=True)
    else:
      ids = prompt
      if max(ids) >= served.tokenizer.vocab_size:
        raise ApiError(400, f'prompt: token id {max(ids)} is outside the vocabulary of '
                       f'{served.tokenizer.vocab_size}.', param='prompt', code='invalid_value')
    return await _respond(server, served, ids, s, chat=False)

  return app
