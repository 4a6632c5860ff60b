"""Chat backends for LLM judges: `chat(messages: list[dict]) -> str`.

  openai_chat  any OpenAI-compatible /chat/completions endpoint (stdlib urllib)
  local_chat   a jpost model loaded in this process, sampled with jpost.sampling
"""

from __future__ import annotations

import collections
import json
import os
import threading
import urllib.error
import urllib.request
import zlib

EXCERPT = 300  # characters of a bad reply quoted in errors


class JudgeError(Exception):
  """The judge backend failed (HTTP error, unreachable, malformed reply).
  `status` is the HTTP status or None; `retryable` says whether trying again
  may help (5xx, 429, network errors)."""

  def __init__(self, message: str, *, status: int | None = None, retryable: bool = True):
    super().__init__(message)
    self.status = status
    self.retryable = retryable


def openai_chat(base_url: str, model: str, *, temperature: float = 0.0, seed: int = 0,
                max_tokens: int = 512, timeout: float = 60.0,
                api_key_env: str | None = 'OPENAI_API_KEY'):
  """POSTs OpenAI chat-completions requests to `{base_url}/chat/completions`.

  The bearer token is read from the environment variable `api_key_env` at
  each call (none is sent when it is unset), never stored in a config.
  """
  url = base_url.rstrip('/') + '/chat/completions'

  def chat(messages: list[dict]) -> str:
    body = json.dumps({'model': model, 'messages': messages, 'temperature': temperature,
                       'seed': seed, 'max_tokens': max_tokens}).encode()
    headers = {'Content-Type': 'application/json'}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
      headers['Authorization'] = f'Bearer {key}'
    request = urllib.request.Request(url, data=body, headers=headers, method='POST')
    try:
      with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      excerpt = e.read()[:EXCERPT].decode(errors='replace')
      raise JudgeError(f'{url} answered HTTP {e.code}: {excerpt}', status=e.code,
                       retryable=e.code >= 500 or e.code == 429) from None
    except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout
      raise JudgeError(f'{url} is unreachable: {e}') from None
    try:
      content = json.loads(payload)['choices'][0]['message']['content']
    except (ValueError, KeyError, IndexError, TypeError):
      content = None
    if not isinstance(content, str):
      excerpt = payload[:EXCERPT].decode(errors='replace')
      raise JudgeError(f'{url} reply is not an OpenAI chat completion: {excerpt}',
                       status=200)
    return content
  return chat


def local_chat(model_path: str, *, temperature: float = 0.0, seed: int = 0,
               max_new_tokens: int = 512, dtype: str = 'float32'):
  """A jpost model as judge. Calls are serialised; the sampling key is
  derived from `seed`, the conversation and how often it was asked before,
  so replies replay exactly and a retry gets a fresh sample."""
  import jax
  import ml_collections

  from jpost import sampling
  from jpost.trainers.generate import load_model_and_tokenizer

  model, tokenizer = load_model_and_tokenizer(ml_collections.ConfigDict(
      dict(path=str(model_path), dtype=dtype, param_dtype=dtype)))
  settings = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                     stop_ids=tuple(tokenizer.stop_ids))
  # Prepared once for every question: a short verdict costs a call less
  # than packing the model's weights for it again would.
  prepared = sampling.prepare(model, settings)
  lock = threading.Lock()
  asked = collections.Counter()

  def chat(messages: list[dict]) -> str:
    conversation = zlib.crc32(json.dumps(messages, sort_keys=True).encode()) & 0x7fffffff
    with lock:
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), conversation),
                               asked[conversation])
      asked[conversation] += 1
      ids = tokenizer.encode_chat(messages, add_generation_prompt=True).ids
      # To a multiple of 64 positions: one compilation per bucket, not one
      # per question length (each took ~1.7 s for SmolLM2).
      tokens, mask = sampling.left_pad(
          [ids], tokenizer.pad_id, multiple=64,
          max_width=model.config.max_position_embeddings - max_new_tokens)
      out = jax.device_get(sampling.generate(model, tokens, mask, settings, key,
                                             prepared=prepared))
    new = [int(t) for t in out.tokens[0][:int(out.lengths[0])]]
    return tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])
  return chat
