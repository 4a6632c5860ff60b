"""Shared by the recipes that sample from a model: prompts in, texts out."""

from __future__ import annotations

import numpy as np

from jpost import sampling
from jpost.errors import ConfigError


def prompt_text(prompt) -> str:
  """What a reward or judge sees as the prompt: the text, or the last user message."""
  if isinstance(prompt, str):
    return prompt
  users = [m['content'] for m in prompt if m['role'] == 'user']
  return users[-1] if users else prompt[-1]['content']


def completion_texts(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Decoded completions without their stop token."""
  stops = set(tokenizer.stop_ids)
  texts = []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    ids = [int(t) for t in row[:int(n)]]
    if ids and ids[-1] in stops:
      ids = ids[:-1]
    texts.append(tokenizer.decode(ids))
  return texts


def sampling_config(cfg, tokenizer, *, num_samples: int | None = None) -> sampling.SamplingConfig:
  """A SamplingConfig from a config's `sampling` block."""
  return sampling.SamplingConfig(
      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
      top_p=cfg.top_p, min_p=cfg.get('min_p', 0.0),
      num_samples=cfg.num_samples if num_samples is None else num_samples,
      stop_ids=tuple(tokenizer.stop_ids), scan_layers=cfg.get('scan_layers'))


def check_answer_key(config) -> None:
  """config.answer_key (which column holds the gold answer: maj@k in eval,
  the labels' `answer` in prm_labels) and the math verifier's own
  `rewards.math.answer_key` must name one column, or the two would grade
  against different ones."""
  math = config.rewards.get('math')
  if math is None:
    return
  verifier_key = math.get('answer_key', 'answer')
  if verifier_key != config.answer_key:
    raise ConfigError(
        f'config.answer_key={config.answer_key!r} but config.rewards.math.answer_key='
        f'{verifier_key!r}: the verifier would grade against another column than the rest; '
        'set both to the column that holds the gold answer.')
