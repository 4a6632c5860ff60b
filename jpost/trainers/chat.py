"""The `chat` recipe: talk to any checkpoint, streaming its answer token by token.

One-shot with `config.prompt`, otherwise interactive on stdin: an empty line,
EOF or /exit ends, /reset forgets the conversation.
"""

from __future__ import annotations

import sys

import jax

from jpost import sampling
from jpost.trainers import register
from jpost.trainers.generate import load_model_and_tokenizer


def reply(model, tokenizer, messages, settings, key, out=sys.stdout, prepared=None) -> str:
  """Streams the assistant's answer to `out`; returns its text. `prepared`:
  the decode weights of the whole conversation (`sampling.stream`)."""
  prompt = tokenizer.encode_chat(messages, add_generation_prompt=True).ids
  ids, shown = [], ''
  for token in sampling.stream(model, prompt, settings, key, prepared=prepared):
    if token in tokenizer.stop_ids:
      break
    ids.append(token)
    # Decode the whole answer so far: a character may span several tokens.
    text = tokenizer.decode(ids)
    if not text.endswith('\ufffd'):
      out.write(text[len(shown):])
      out.flush()
      shown = text
  out.write(tokenizer.decode(ids)[len(shown):] + '\n')
  out.flush()
  return tokenizer.decode(ids)


def fit_context(tokenizer, messages: list[dict], *, kept: int, room: int):
  """(messages, how many were dropped): the oldest messages after the first
  `kept` (the system prompt) dropped, a turn at a time, until the prompt's
  bucket of 64 positions (`sampling.stream` pads to one) fits in `room`.
  With nothing left to drop but the last message, it is dropped too."""
  def fits(history):
    length = len(tokenizer.encode_chat(history, add_generation_prompt=True).ids)
    return -(-length // 64) * 64 <= room
  start = kept
  while start < len(messages) and not fits(messages[:kept] + messages[start:]):
    start += 1
    # Never open on an assistant turn: drop up to the next user message.
    while start < len(messages) - 1 and messages[start]['role'] != 'user':
      start += 1
  return messages[:kept] + messages[start:], start - kept


@register('chat')
def run(config, workdir):
  del workdir  # chat writes nothing
  model, tokenizer = load_model_and_tokenizer(config.model)
  s = config.sampling
  settings = sampling.for_one_call(model, sampling.SamplingConfig(
      max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
      min_p=s.min_p, stop_ids=tuple(tokenizer.stop_ids), scan_layers=s.get('scan_layers')))
  # The decode weights prepared once for every turn (the parameters never change here).
  prepared = sampling.prepare(model, settings)
  system = [{'role': 'system', 'content': config.system_prompt}] if config.system_prompt else []
  key = jax.random.key(config.seed)
  if config.prompt:
    reply(model, tokenizer, system + [{'role': 'user', 'content': config.prompt}], settings, key,
          prepared=prepared)
    return
  history = list(system)
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      print('you> ', end='', flush=True)
    line = sys.stdin.readline()
    text = line.strip()
    if not line or not text or text == '/exit':
      return
    if text == '/reset':
      history = list(system)
      continue
    history, dropped = fit_context(tokenizer, history + [{'role': 'user', 'content': text}],
                                   kept=len(system), room=model.config.max_position_embeddings
                                   - settings.max_new_tokens)
    if dropped:
      print(f'(the {dropped} oldest message(s) left the conversation: it outgrew the '
            "model's context)", file=sys.stderr)
    if len(history) == len(system):
      print('(that message alone is too long for the model; say something shorter)',
            file=sys.stderr)
      continue
    key, sub = jax.random.split(key)
    print('assistant> ', end='', flush=True)
    answer = reply(model, tokenizer, history, settings, sub, prepared=prepared)
    history.append({'role': 'assistant', 'content': answer})
