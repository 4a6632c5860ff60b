"""Canonical rows -> token ids and loss masks, from the tokenizer's message spans.

A target message contributes its output tokens (its content, and reasoning
the template renders before it) and its end-of-turn token (PITFALLS:
inferring masks from pad == eos drops the real EOS and the model never
learns to stop). Masks come from `Tokenizer.encode_chat` spans, so they
work for any chat template. Rows longer than `max_len` follow the truncation
policy; every truncation is reported to the caller, never silent.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jpost.data.rows import RowError
from jpost.errors import ConfigError
from jpost.tokenizer import ChatSpanError, Tokenizer

MASK_MODES = ('auto', 'completion', 'assistant', 'last_assistant', 'all')
TRUNCATION = ('drop', 'truncate_left', 'truncate_right')


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskConfig:
  """How a row becomes a training sequence.

  mask_mode: 'completion' (the completion messages of prompt/completion rows),
    'assistant' (every assistant turn), 'last_assistant' (only the last one;
    earlier turns are context), 'all' (every token), or 'auto' (completion for
    prompt/completion rows, assistant for `messages` rows).
  truncation: for rows longer than max_len: 'drop' the row (counted),
    'truncate_left' (cut the prompt from the left; rows whose targets alone
    exceed max_len are dropped), 'truncate_right' (cut the end, targets too).
  """

  max_len: int
  mask_mode: str = 'auto'
  truncation: str = 'drop'

  def __post_init__(self):
    if self.mask_mode not in MASK_MODES:
      raise ConfigError(f'mask_mode {self.mask_mode!r} unknown; use one of {MASK_MODES}.')
    if self.truncation not in TRUNCATION:
      raise ConfigError(f'truncation {self.truncation!r} unknown; use one of {TRUNCATION}.')
    if self.max_len < 2:
      raise ConfigError(f'max_len must be at least 2, got {self.max_len}.')


def target_messages(example: dict, mode: str) -> list[int]:
  """Indices of the messages whose tokens are targets under `mode`."""
  messages, start = example['messages'], example['completion_start']
  if mode == 'auto':
    mode = 'assistant' if start is None else 'completion'
  assistants = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
  if mode == 'completion':
    if start is None:
      raise ConfigError(
          "mask_mode='completion' needs prompt/completion rows; for `messages` rows "
          "use 'assistant', 'last_assistant' or 'auto'.")
    return list(range(start, len(messages)))
  if mode == 'assistant':
    return assistants
  if mode == 'last_assistant':
    return assistants[-1:]
  return list(range(len(messages)))


def _encode_chat(tokenizer: Tokenizer, messages: list[dict], *, where: str, **kwargs):
  try:
    return tokenizer.encode_chat(messages, **kwargs)
  except ChatSpanError as e:  # the row's content, not the template, is at fault
    raise RowError('unlocatable_content', where, str(e),
                   "rewrite the message, or skip such rows with policy='skip'") from e


def encode_sft(example: dict, tokenizer: Tokenizer, mask_mode: str = 'auto'):
  """(tokens, loss_mask) int32 arrays of one canonical SFT example, untruncated."""
  where = example.get('_where', '?')
  if example['format'] == 'text':
    prompt = tokenizer.encode(example['prompt'], add_special_tokens=True)
    completion = tokenizer.encode(example['completion']) + [tokenizer.eos_id]
    tokens = prompt + completion
    if mask_mode == 'all':
      mask = [1] * len(tokens)
    else:
      mask = [0] * len(prompt) + [1] * len(completion)
    return np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
  encoding = _encode_chat(tokenizer, example['messages'], where=where)
  mask = np.zeros(len(encoding.ids), np.int32)
  if mask_mode == 'all':
    mask[:] = 1
  else:
    targets = target_messages(example, mask_mode)
    if not targets:
      raise RowError('no_assistant_turn', where,
                     f'mask_mode={mask_mode!r} finds no target message in this conversation',
                     'add an assistant turn, or choose another mask_mode')
    for i in targets:
      span = encoding.spans[i]
      if span.eot is None:  # a template that ends turns in plain text
        raise ConfigError(
            f"{where}: the chat template ends message {i} ({example['messages'][i]['role']}) "
            'with no special token, so no target token would teach the model to stop and '
            'its answers would run on to the token limit. Give the tokenizer a chat template '
            "that ends each turn with a special token (e.g. SmolLM2's <|im_end|>), or use "
            'prompt/completion text rows, whose targets end with eos.')
      # The output (reasoning the template renders before the content, the
      # content), any whitespace the template puts before the end-of-turn
      # token, and that token: it is how the model learns to stop.
      mask[span.output_start:span.eot + 1] = 1
    if not mask.any():
      raise RowError('empty_completion', where, 'the target messages encode to no tokens',
                     'give non-empty assistant content')
  return np.asarray(encoding.ids, np.int32), mask


def truncate(tokens, mask, config: MaskConfig, *, where: str):
  """Applies the truncation policy; returns (tokens, mask, was_truncated)."""
  n = config.max_len
  if len(tokens) <= n:
    return tokens, mask, False
  too_long = RowError('too_long', where,
                      f'row has {len(tokens)} tokens, more than max_len={n}',
                      'raise max_len or choose truncation=truncate_left/truncate_right')
  if config.truncation == 'drop':
    raise too_long
  if config.truncation == 'truncate_right':
    tokens, mask = tokens[:n], mask[:n]
  else:
    first_target = int(np.argmax(mask)) if mask.any() else len(mask)
    if len(tokens) - first_target > n:  # the targets alone do not fit
      raise too_long
    tokens, mask = tokens[-n:], mask[-n:]
  if not mask.any():
    raise RowError('too_long', where, f'no target token left within max_len={n}',
                   'raise max_len or shorten the prompt')
  return tokens, mask, True


def encode_prompt(example: dict, tokenizer: Tokenizer) -> np.ndarray:
  """Prompt tokens ending with the generation prompt (assistant header)."""
  if example['format'] == 'text':
    return np.asarray(tokenizer.encode(example['prompt'], add_special_tokens=True), np.int32)
  ids = _encode_chat(tokenizer, example['prompt'], where=example.get('_where', '?'),
                     add_generation_prompt=True).ids
  return np.asarray(ids, np.int32)


def encode_response(example: dict, response_key: str, tokenizer: Tokenizer):
  """(tokens, loss_mask) of prompt + one response of a preference row; the
  mask covers the response only (its content and end-of-turn tokens)."""
  if example['format'] == 'text':
    sft = {'format': 'text', 'prompt': example['prompt'], 'completion': example[response_key],
           '_where': example.get('_where')}
    return encode_sft(sft, tokenizer, 'completion')
  prompt = example['prompt']
  sft = {'format': 'chat', 'messages': prompt + example[response_key],
         'completion_start': len(prompt), '_where': example.get('_where')}
  return encode_sft(sft, tokenizer, 'completion')
