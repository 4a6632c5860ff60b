"""The `generate` recipe: load a chat model and print its answers to prompts."""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax

from jpost import sampling
from jpost.models import hf, pretrained
from jpost.tokenizer import Tokenizer
from jpost.trainers import register


def load_model_and_tokenizer(model_config):
  """Decoder and Tokenizer from `config.model` (path or embedded name, dtypes)."""
  path = pretrained.resolve(model_config.path)
  model = hf.load(path, dtype=model_config.dtype, param_dtype=model_config.param_dtype)
  return model, Tokenizer.from_dir(path)


@register('generate')
def run(config, workdir: str | None):
  model, tokenizer = load_model_and_tokenizer(config.model)
  conversations = []
  for prompt in config.prompts:
    messages = [{'role': 'system', 'content': config.system_prompt}] if config.system_prompt else []
    conversations.append(messages + [{'role': 'user', 'content': prompt}])
  prompt_ids = [tokenizer.encode_chat(m, add_generation_prompt=True).ids for m in conversations]
  tokens, mask = sampling.left_pad(prompt_ids, tokenizer.pad_id)
  # One call: its compile time counts more than its speed per token.
  settings = sampling.for_one_call(model, sampling.SamplingConfig(
      max_new_tokens=config.sampling.max_new_tokens,
      temperature=config.sampling.temperature, stop_ids=tuple(tokenizer.stop_ids),
      scan_layers=config.sampling.get('scan_layers')))
  start = time.perf_counter()
  completions = jax.device_get(
      sampling.generate(model, tokens, mask, settings, jax.random.key(config.seed)))
  out, out_mask = completions.tokens, completions.mask
  seconds = time.perf_counter() - start
  records = []
  for prompt, row, row_mask in zip(config.prompts, out, out_mask):
    ids = [int(t) for t, m in zip(row, row_mask) if m]
    answer = tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids])
    records.append({'prompt': prompt, 'answer': answer, 'tokens': len(ids)})
    print(f'\n>>> {prompt}\n{answer}', flush=True)
  new_tokens = int(out_mask.sum())
  print(f'\n[{len(records)} prompts, {new_tokens} new tokens in {seconds:.1f}s '
        f'including compilation]', flush=True)
  if workdir:
    path = pathlib.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / 'generations.jsonl', 'w') as f:
      for record in records:
        f.write(json.dumps(record) + '\n')
    print(f'wrote {path / "generations.jsonl"}', file=sys.stderr)
  return records
