"""Step-labelled solutions -> tokens with a target at the last token of each step.

A process reward model (PRM) scores every step of a solution. A row renders,
through the tokenizer's chat template, as the prompt (a user turn, or the
row's messages) and one assistant turn whose content is the steps joined by
a separator ('\\n' by default). The PRM is read at the last token of each
step: causal attention has then seen the whole step and nothing after it.

Step ends come from character offsets, not from separator token ids: a
separator often merges with its neighbours (Qwen3 encodes '.\\n' as one
token; SmolLM2 glues a ' ' separator onto the next word), so there may be
no separator token to find. Instead:

1. The character where each step's last non-whitespace character sits is
   known in the assistant content ('\\n'.join(steps)) by construction.
2. The content is located in the rendered conversation inside the assistant
   message's span (`Tokenizer.encode_chat`): verbatim, or with its outer
   whitespace trimmed for templates that trim (Llama 3).
3. Each such character maps to the token that contains it, from the token
   offsets of the rendered text. That token may also hold the separator (or
   more), which is fine: it is the first position that has seen the step.

Two steps whose last characters fall in one token cannot both be read there;
such a row is an error (`merged_step_ends`), never a guess.

Rows longer than `max_len` are cut on the right: the steps that end inside
the window keep their targets, the rest are dropped with the tokens (and
counted by the pipeline); a row in which no step ends inside the window is a
'too_long' error. Tokens after the last step's end never change a score.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from jpost.data.rows import RowError
from jpost.tokenizer import Tokenizer

DEFAULT_SEPARATOR = '\n'


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepEncoding:
  """One solution encoded for a PRM.

  tokens: [T] int32, the rendered conversation (cut to max_len if given).
  step_ends: [S'] int32, token index of the last token of each step that ends
    within the tokens, in step order; S' <= num_steps.
  num_steps: S, the number of steps given.
  """

  tokens: np.ndarray
  step_ends: np.ndarray
  num_steps: int

  @property
  def steps_cut(self) -> int:
    """Steps that ended past max_len and have no position."""
    return self.num_steps - len(self.step_ends)


def prompt_messages(prompt) -> list[dict]:
  """A prompt given as text or as chat messages -> chat messages."""
  if isinstance(prompt, str):
    return [{'role': 'user', 'content': prompt}]
  return list(prompt)


def _last_chars(steps: list[str], separator: str) -> list[int]:
  """Offset in separator.join(steps) of each step's last non-space character."""
  out, cursor = [], 0
  for step in steps:
    out.append(cursor + len(step.rstrip()) - 1)
    cursor += len(step) + len(separator)
  return out


def _content_start(text: str, lo: int, hi: int, content: str, *, where: str) -> int:
  """Where `content` starts in text[lo:hi] (the assistant message's span):
  the last verbatim occurrence, else (a trimming template) the last occurrence
  of its stripped text, moved back by the whitespace that was trimmed."""
  at = text.rfind(content, lo, hi)
  if at >= 0:
    return at
  stripped = content.strip()
  at = text.rfind(stripped, lo, hi)
  if at < 0:
    raise RowError('template_rewrites_steps', where,
                   'the chat template does not print the joined steps as the assistant '
                   f'content (looked for {stripped[:60]!r} in the assistant turn)',
                   'use a template that prints assistant content as given, or remove '
                   'the text the template rewrites (e.g. <think> blocks for Qwen3)')
  return at - (len(content) - len(content.lstrip()))


def encode_steps(prompt, steps: list[str], tokenizer: Tokenizer, *,
                 separator: str = DEFAULT_SEPARATOR, max_len: int | None = None,
                 where: str = '?') -> StepEncoding:
  """Tokens of prompt + steps (one assistant turn) and each step's last token.

  `prompt` is text (one user message) or a message list; `steps` non-blank
  strings. With `max_len`, tokens are cut to max_len and only the steps
  ending inside are kept (see the module docstring). Used by the training
  pipeline and by the PRM scorer, so both encode a solution alike.
  """
  for i, step in enumerate(steps):
    if not isinstance(step, str) or not step.strip():
      raise RowError('empty_step', where, f'steps[{i}] is {step!r}: not a non-blank string',
                     'drop blank steps, e.g. [s for s in text.split(sep) if s.strip()]')
  if not steps:
    raise RowError('no_steps', where, 'no steps given', 'give at least one step')
  content = separator.join(steps)
  messages = prompt_messages(prompt) + [{'role': 'assistant', 'content': content}]
  encoding = tokenizer.encode_chat(messages)
  # Token start characters of the same text encode_chat tokenised.
  ids, starts = tokenizer.encode_with_offsets(encoding.text)
  if ids != encoding.ids:
    raise AssertionError(f'{where}: offsets encoding differs from encode_chat')
  text, span = encoding.text, encoding.spans[-1]
  char = lambda token: starts[token] if token < len(starts) else len(text)
  end_token = span.eot if span.eot is not None else span.end
  base = _content_start(text, char(span.start), char(end_token), content, where=where)

  step_ends = [bisect.bisect_right(starts, base + c) - 1 for c in _last_chars(steps, separator)]
  for i in range(1, len(step_ends)):
    if step_ends[i] <= step_ends[i - 1]:
      raise RowError('merged_step_ends', where,
                     f'steps[{i - 1}] and steps[{i}] end in the same token '
                     f'({tokenizer.id_to_token(ids[step_ends[i]])!r}), so one position '
                     'cannot hold both scores',
                     'merge the two steps, or use a separator that separates them '
                     "(e.g. '\\n')")
  tokens = np.asarray(ids, np.int32)
  step_ends = np.asarray(step_ends, np.int32)
  if max_len is not None:
    tokens, step_ends = tokens[:max_len], step_ends[step_ends < max_len]
  return StepEncoding(tokens=tokens, step_ends=step_ends, num_steps=len(steps))


def training_fields(encoding: StepEncoding, labels, *, length: int,
                    where: str = '?') -> dict[str, np.ndarray]:
  """One row of a PRM batch, padded to `length`.

  tokens, positions, segment_ids (0 = padding) int32 [length]; step_targets
  float32 (the step's label at its last token, 0 elsewhere) and step_mask
  int32 (1 exactly at the step ends that fit). Raises 'too_long' when no
  step ends inside the tokens.
  """
  n, kept = len(encoding.tokens), len(encoding.step_ends)
  if n > length:
    raise ValueError(f'{where}: {n} tokens do not fit in length {length}; encode with '
                     'max_len=length')
  if kept == 0:
    raise RowError('too_long', where,
                   f'no step ends within max_len={length} tokens (the prompt and the '
                   'first step are longer)', 'raise max_len or shorten the prompt')
  targets = np.zeros(length, np.float32)
  mask = np.zeros(length, np.int32)
  targets[encoding.step_ends] = np.asarray(labels, np.float32)[:kept]
  mask[encoding.step_ends] = 1
  pad = lambda x: np.pad(x, (0, length - n))
  return {'tokens': pad(encoding.tokens), 'positions': pad(np.arange(n, dtype=np.int32)),
          'segment_ids': pad(np.ones(n, np.int32)), 'step_targets': targets,
          'step_mask': mask}
