"""Request bodies of the OpenAI routes checked into generation settings.

Pure functions: a bad field raises ApiError naming it, with the status and
the OpenAI error type a client expects.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from jpost.serve import programs


class ApiError(Exception):
  """An OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param,
                      'code': self.code}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  max_tokens: int | None  # None: as many as the context leaves
  n: int
  temperature: float
  top_p: float
  seed: int | None
  stop: tuple[str, ...]
  logprobs: bool
  top_logprobs: int
  stream: bool
  include_usage: bool


def _bad(param: str, message: str) -> ApiError:
  return ApiError(400, f'{param}: {message}', param=param, code='invalid_value')


def _number(body: dict, name: str, default, low, high, *, integer=False, low_open=False):
  value = body.get(name)
  if value is None:
    return default
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    raise _bad(name, f'expected {"an integer" if integer else "a number"}, got {value!r}.')
  if not math.isfinite(value):  # JSON's NaN would pass every comparison below
    raise _bad(name, f'expected a finite number, got {value!r}.')
  if (value <= low if low_open else value < low) or value > high:
    raise _bad(name, f'{value!r} is outside {"(" if low_open else "["}{low}, {high}].')
  return value


def _stop(body: dict) -> tuple[str, ...]:
  value = body.get('stop')
  if value is None:
    return ()
  if isinstance(value, str):
    value = [value]
  if (not isinstance(value, list) or len(value) > 4
      or not all(isinstance(s, str) and s for s in value)):
    raise _bad('stop', 'give a non-empty string or a list of at most 4 of them.')
  return tuple(value)


# Fields that would change the output if honoured, with the values that ask
# for nothing: anything else is refused, never silently dropped (a client
# asking for JSON output or a forced tool call must not get plain text).
_UNSUPPORTED = {
    'presence_penalty': (0,), 'frequency_penalty': (0,), 'repetition_penalty': (1,),
    'logit_bias': ({},), 'tools': ([],), 'functions': ([],), 'tool_choice': ('none',),
    'function_call': ('none',), 'response_format': ({'type': 'text'},),
    'top_k': (-1, 0), 'min_p': (0,), 'echo': (False,), 'suffix': ('',), 'best_of': (1,),
}


def settings(body: dict, *, chat: bool, max_n: int) -> Settings:
  """The generation settings of a chat or completions request body."""
  for name, neutral in _UNSUPPORTED.items():
    if body.get(name) is not None and body[name] not in neutral:
      raise _bad(name, f'is not supported by this server; leave it out (or {neutral[0]!r}).')
  stream = body.get('stream', False)
  if not isinstance(stream, bool) and stream is not None:
    raise _bad('stream', f'expected true or false, got {stream!r}.')
  options = body.get('stream_options') or {}
  if not isinstance(options, dict):
    raise _bad('stream_options', 'expected an object.')
  name = 'max_completion_tokens' if chat and body.get('max_completion_tokens') is not None \
      else 'max_tokens'
  max_tokens = _number(body, name, None, 1, 1 << 30, integer=True)
  if chat:
    logprobs = body.get('logprobs', False)
    if not isinstance(logprobs, bool) and logprobs is not None:
      raise _bad('logprobs', f'expected true or false, got {logprobs!r}.')
    top = _number(body, 'top_logprobs', 0, 0, programs.TOP_LOGPROBS, integer=True)
    if top and not logprobs:
      raise _bad('top_logprobs', 'needs logprobs set to true.')
  else:
    top = _number(body, 'logprobs', None, 0, programs.TOP_LOGPROBS, integer=True)
    logprobs, top = top is not None, top or 0
  return Settings(
      max_tokens=max_tokens,
      n=_number(body, 'n', 1, 1, max_n, integer=True),
      temperature=float(_number(body, 'temperature', 1.0, 0.0, 2.0)),
      top_p=float(_number(body, 'top_p', 1.0, 0.0, 1.0, low_open=True)),
      seed=_number(body, 'seed', None, -(1 << 63), (1 << 63) - 1, integer=True),
      stop=_stop(body), logprobs=bool(logprobs), top_logprobs=int(top), stream=bool(stream),
      include_usage=bool(options.get('include_usage', False)))


def messages(body: dict) -> list[dict]:
  """The chat messages as {role, content: str}; content parts of type text are joined."""
  value = body.get('messages')
  if not isinstance(value, list) or not value:
    raise _bad('messages', 'give a non-empty list of {"role", "content"} objects.')
  out = []
  for i, message in enumerate(value):
    where = f'messages[{i}]'
    if not isinstance(message, dict) or message.get('role') not in (
        'system', 'developer', 'user', 'assistant'):
      raise _bad(where, 'needs a role of "system", "developer", "user" or "assistant".')
    content = message.get('content')
    if isinstance(content, list):
      if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                 for p in content):
        raise _bad(f'{where}.content', 'only text parts ({"type": "text", "text": ...}) are supported.')
      content = ''.join(p['text'] for p in content)
    if not isinstance(content, str):
      raise _bad(f'{where}.content', 'expected a string.')
    # OpenAI's newer name for the system message; chat templates know "system".
    role = 'system' if message['role'] == 'developer' else message['role']
    out.append({'role': role, 'content': content})
  return out


def prompt(body: dict) -> str | list[int]:
  """A completions prompt: one string or one list of token ids."""
  value = body.get('prompt')
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
    value = value[0]
  if isinstance(value, str):
    if not value:
      raise _bad('prompt', 'is empty.')
    return value
  if (isinstance(value, list) and value
      and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
    return value
  raise _bad('prompt', 'give one string or one list of token ids (one prompt per request).')
