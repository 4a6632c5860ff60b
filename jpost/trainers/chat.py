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
    history.append({'role': 'user', 'content': text})
    key, sub = jax.random.split(key)
    print('assistant> ', end='', flush=True)
    answer = reply(model, tokenizer, history, settings, sub, prepared=prepared)
    history.append({'role': 'assistant', 'content': answer})
