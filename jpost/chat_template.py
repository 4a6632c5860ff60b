"""Chat templates rendered with jinja2 exactly as transformers renders them
(mirrors transformers.utils.chat_template_utils: sandboxed environment,
trim_blocks/lstrip_blocks, its tojson, raise_exception and strftime_now,
the {% generation %} tag, and its message clean-up)."""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

# transformers copies reasoning given under any of these names to all of them.
REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')


class _GenerationTag(jinja2.ext.Extension):
  """Accepts `{% generation %}...{% endgeneration %}` and renders the body."""

  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
    return jinja2.nodes.CallBlock(
        self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _TemplateDict:
  # Same limited `dict` global as transformers: no attribute access to break out.
  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  # Rejects underscore attributes, as transformers does, to keep the sandbox shut.
  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(
          f'chat templates cannot set underscore attributes on a namespace ({name!r}).')


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise_exception
  env.globals['strftime_now'] = _strftime_now
  env.globals['dict'] = _TemplateDict()
  env.globals['namespace'] = _TemplateNamespace
  return env.from_string(template)


def template_message(message: dict) -> dict:
  # transformers drops None values (templates test for missing keys) and
  # aliases reasoning fields; doing the same keeps renders identical.
  message = {k: v for k, v in message.items() if v is not None}
  reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
  if reasoning is not None:
    message = {'thinking': reasoning, **message, 'reasoning_content': reasoning}
  return message


def validate_messages(messages: Any) -> list[dict]:
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(
        f'messages must be a non-empty list of {{"role": ..., "content": ...}} dicts, '
        f'got {type(messages).__name__} {str(messages)[:80]!r}.')
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f'message {i} must be a dict with "role" and "content", '
                       f'got {type(message).__name__}.')
    if not isinstance(message.get('role'), str):
      raise ValueError(f'message {i} needs a string "role" (keys: {sorted(message)}).')
    if not isinstance(message.get('content'), str):
      raise ValueError(
          f'message {i} ({message["role"]}) needs a string "content", got '
          f'{type(message.get("content")).__name__}; join multi-part content into one string.')
  return list(messages)
