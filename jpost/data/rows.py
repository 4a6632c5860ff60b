"""Validation and normalisation of user rows, and the bad-input policy.

Users bring rows in the formats TRL and the HF hub use: conversational
`messages`, `prompt`/`completion` (messages or plain text), preference
`prompt`/`chosen`/`rejected`, RL `prompt` plus extra columns, and step-labelled
solutions `prompt`/`steps`/`labels` for process reward models. Each
`normalize_*` function checks one row and returns one canonical dict, or raises
`RowError` saying what is wrong, where, and what to do. `RowFilter` turns those
errors into a hard stop or a counted skip, as the config chooses; a bad row is
never dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable

from jpost.errors import ConfigError, UserError

ROLES = ('system', 'user', 'assistant', 'tool')
POLICIES = ('error', 'skip')
# Added to every raw row by `sources.load_source`; never a content column.
WHERE_KEY = '_where'

_MESSAGES = ("a list of {'role': 'system'|'user'|'assistant'|'tool', "
             "'content': str} dicts")
_MESSAGE_HELP = 'give ' + _MESSAGES


class RowError(UserError, ValueError):
  """One bad input row. `reason` is a short slug for counting skips by kind."""

  def __init__(self, reason: str, where: str, what: str, todo: str):
    super().__init__(f'{where}: {what} ({todo})')
    self.reason = reason
    self.where = where
    self.what = what
    self.todo = todo

  def __reduce__(self):
    # Exceptions pickle by re-calling __init__ with `args` (here the message
    # alone); Grain workers send errors across processes, so rebuild by parts.
    return type(self), (self.reason, self.where, self.what, self.todo)


@dataclasses.dataclass(kw_only=True)
class RowFilter:
  """The bad-row policy: 'error' stops at the first bad row, 'skip' counts it.

  Mutable on purpose (it accumulates counts), and plain data so it pickles into
  Grain worker processes; each worker then counts its own rows.
  """

  policy: str = 'error'
  max_examples: int = 5
  _seen: int = dataclasses.field(default=0, init=False, repr=False)
  _by_reason: collections.Counter = dataclasses.field(
      default_factory=collections.Counter, init=False, repr=False)
  _examples: list = dataclasses.field(
      default_factory=list, init=False, repr=False)

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ConfigError(
          f'RowFilter policy {self.policy!r} is not one of {POLICIES} (use '
          "'error' to stop at the first bad row, 'skip' to count and drop "
          'bad rows)')
    if not isinstance(self.max_examples, int) or self.max_examples < 0:
      raise ValueError(
          f'RowFilter max_examples={self.max_examples!r} must be an int >= 0 '
          '(the number of skipped rows whose messages are kept for the report)')

  def apply(self, fn: Callable[[Any], Any], row: Any, where: str, *,
            new_row: bool = True) -> Any:
    """fn(row); on RowError: re-raise (policy error) or count, return None.

    `new_row=False` for a later stage of a row an earlier `apply` already
    counted as seen (e.g. normalising a row the reader tagged).
    """
    self._seen += new_row
    try:
      return fn(row)
    except RowError as e:
      if self.policy == 'error':
        raise
      self.record(e.reason, e.where, str(e))
      return None
    except Exception as e:
      # A bug rather than bad data: still stop, but say which row hit it.
      e.add_note(f'while processing the row at {where}')
      raise

  def record(self, reason: str, where: str, message: str) -> None:
    """Counts a skip decided elsewhere (e.g. a row dropped as too long).

    Meant for a row that already went through `apply`, so it moves one row
    from kept to skipped. Counts under either policy: such drops are chosen
    by their own config (e.g. truncation='drop'), not by this one.
    """
    self._by_reason[reason] += 1
    if len(self._examples) < self.max_examples:
      self._examples.append(
          {'reason': reason, 'where': where, 'message': message})

  def stats(self) -> dict[str, Any]:
    skipped = sum(self._by_reason.values())
    return {
        'policy': self.policy,
        'seen': self._seen,
        'kept': self._seen - skipped,
        'skipped': skipped,
        'skipped_by_reason': dict(sorted(self._by_reason.items())),
        'examples': [dict(e) for e in self._examples],
    }


def check_object(row: Any, *, where: str) -> dict:
  """Returns `row` if it is a dict (one JSON object), else raises RowError."""
  if not isinstance(row, dict):
    raise RowError(
        'not_an_object', where,
        f'row is a {type(row).__name__}, not an object/dict',
        'give each row as one JSON object (one per line in JSON Lines)')
  return row


def _get(row: dict, key: str, *, where: str, todo: str) -> Any:
  # Parquet turns a key missing from some rows into null, so None is missing.
  value = row.get(key)
  if value is None:
    keys = [k for k in row if k != WHERE_KEY]
    raise RowError('missing_key', where,
                   f'row has no {key!r} (its keys: {keys})', todo)
  return value


def _messages(value: Any, *, key: str, where: str) -> list[dict]:
  """Validates a message list; errors name the field and message index."""
  if not isinstance(value, list):
    raise RowError('bad_type', where,
                   f'{key!r} is a {type(value).__name__}, not a list of '
                   'messages', _MESSAGE_HELP)
  out = []
  for i, msg in enumerate(value):
    at = f'{key}[{i}]'
    if not isinstance(msg, dict):
      raise RowError('bad_type', where,
                     f'{at} is a {type(msg).__name__}, not a message dict',
                     _MESSAGE_HELP)
    for field in ('role', 'content'):
      if msg.get(field) is None:
        raise RowError('missing_key', where,
                       f'{at} has no {field!r} (its keys: {list(msg)})',
                       _MESSAGE_HELP + "; ShareGPT 'from'/'value' must be "
                       "renamed to 'role'/'content'")
    if msg['role'] not in ROLES:
      raise RowError('unknown_role', where,
                     f"{at}.role is {msg['role']!r}, not one of {ROLES}",
                     "rename it, e.g. 'human' -> 'user', 'gpt'/'bot' -> "
                     "'assistant'")
    if not isinstance(msg['content'], str):
      raise RowError('non_string_content', where,
                     f"{at}.content is a {type(msg['content']).__name__}, "
                     'not a string',
                     'jpost trains on text: join multi-part content into one '
                     'string')
    # Parquet gives every message the union of all messages' fields, null
    # where absent; templates test `'name' in message`, so drop the nulls.
    out.append({k: v for k, v in msg.items() if v is not None})
  return out


def _blank(value: str | list[dict]) -> bool:
  if isinstance(value, str):
    return not value.strip()
  return all(not m['content'].strip() for m in value)


def _as_messages(value: Any, *, key: str, role: str, where: str) -> list[dict]:
  """A message list, with a plain string taken as one message of `role`."""
  if isinstance(value, str):
    return [{'role': role, 'content': value}]
  return _messages(value, key=key, where=where)


def _check_text_or_messages(value: Any, *, key: str, where: str) -> None:
  if not isinstance(value, (str, list)):
    raise RowError('bad_type', where,
                   f'{key!r} is a {type(value).__name__}, not a string or a '
                   'list of messages',
                   f'give {key!r} as plain text or as {_MESSAGES}')


def _require_assistant(messages: list[dict], *, where: str) -> None:
  assistant = [m for m in messages if m['role'] == 'assistant']
  if not assistant:
    raise RowError('no_assistant_turn', where,
                   f'conversation of {len(messages)} messages has no '
                   'assistant message, so the assistant-only loss mask is '
                   'empty',
                   "add the assistant's reply, or use a mask mode that "
                   'trains on the whole sequence')
  if _blank(assistant):
    raise RowError('empty_completion', where,
                   'every assistant message is empty or whitespace',
                   "fill in the assistant's reply, or drop the row")


def normalize_sft(row: Any, *, where: str,
                  require_assistant: bool = False) -> dict[str, Any]:
  """Canonical SFT row: chat `messages` (+ `completion_start`) or text.

  Returns {'format': 'chat', 'messages': [...], 'completion_start': int|None}
  or {'format': 'text', 'prompt': str, 'completion': str}. Keys other than
  the format's own (an 'id', an 'answer') are ignored. `require_assistant`
  is for the assistant-only mask modes, where a row without an assistant
  message would train on nothing.
  """
  check_object(row, where=where)
  todo = ("give each row 'messages', or 'prompt' and 'completion' as text "
          'or message lists')
  if row.get('messages') is not None:
    clash = [k for k in ('prompt', 'completion') if row.get(k) is not None]
    if clash:
      raise RowError('conflicting_keys', where,
                     f"row has both 'messages' and {clash}, so which one to "
                     'train on is ambiguous', "keep either 'messages' or "
                     "'prompt'+'completion'")
    messages = _messages(row['messages'], key='messages', where=where)
    if _blank(messages):
      raise RowError('empty_conversation', where,
                     "'messages' is empty or holds only whitespace",
                     'drop the row or fill in the conversation')
    if require_assistant:
      _require_assistant(messages, where=where)
    return {'format': 'chat', 'messages': messages, 'completion_start': None}

  if row.get('prompt') is None and row.get('completion') is None:
    keys = [k for k in row if k != WHERE_KEY]
    raise RowError('missing_key', where,
                   "row has neither 'messages' nor 'prompt'/'completion' "
                   f'(its keys: {keys})', todo)
  prompt = _get(row, 'prompt', where=where, todo=todo)
  completion = _get(row, 'completion', where=where, todo=todo)
  _check_text_or_messages(prompt, key='prompt', where=where)
  _check_text_or_messages(completion, key='completion', where=where)
  if isinstance(prompt, str) and isinstance(completion, str):
    if _blank(completion):
      raise RowError('empty_completion', where,
                     "'completion' is empty or whitespace",
                     'fill in the completion, or drop the row')
    return {'format': 'text', 'prompt': prompt, 'completion': completion}

  # Mixed rows: plain text is the user's prompt or the assistant's reply.
  prompt = _as_messages(prompt, key='prompt', role='user', where=where)
  completion = _as_messages(completion, key='completion', role='assistant',
                            where=where)
  if _blank(completion):
    raise RowError('empty_completion', where,
                   f"'completion' ({len(completion)} messages) is empty or "
                   'holds only whitespace',
                   'fill in the completion, or drop the row')
  messages = prompt + completion
  if require_assistant:
    _require_assistant(messages, where=where)
  return {'format': 'chat', 'messages': messages,
          'completion_start': len(prompt)}


def _common_prefix_len(a: list[dict], b: list[dict]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _split_conversations(chosen: list[dict], rejected: list[dict], *,
                         where: str) -> tuple[list, list, list]:
  """(prompt, chosen, rejected) from two conversations sharing a prefix."""
  n = _common_prefix_len(chosen, rejected)
  for key, conv in (('chosen', chosen), ('rejected', rejected)):
    if n == len(conv):
      raise RowError('empty_completion', where,
                     f'{key!r} adds no messages after the {n} it shares with '
                     'the other response',
                     "give both 'chosen' and 'rejected' a response")
    if conv[n]['role'] != 'assistant':
      raise RowError('no_common_prompt', where,
                     f"without 'prompt', the response is taken to start at "
                     f'message {n} where chosen and rejected first differ, '
                     f"but {key}[{n}] is a {conv[n]['role']!r} message",
                     "add a 'prompt' column, or make both conversations "
                     'identical up to the first assistant response')
  return chosen[:n], chosen[n:], rejected[n:]


def normalize_preference(row: Any, *, where: str) -> dict[str, Any]:
  """Canonical preference row {'format', 'prompt', 'chosen', 'rejected',
  'margin'}.

  'text' when all three are strings, else 'chat' with message lists (a
  string prompt becomes a user message, a string response an assistant
  one). Without 'prompt', chosen and rejected must be whole conversations;
  the prompt is their longest common prefix. 'margin' (0 when absent): how
  much more chosen is preferred, a finite number (the reward model's loss
  subtracts it, as Llama 2's did).
  """
  check_object(row, where=where)
  return _normalize_pair(row, where=where) | {'margin': _margin(row, where=where)}


def _margin(row: dict, *, where: str) -> float:
  value = row.get('margin', 0.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise RowError('bad_margin', where, f"'margin' is {value!r}, not a finite number",
                   "give how much more 'chosen' is preferred as a number, or drop the column")
  return float(value)


def _normalize_pair(row: dict, *, where: str) -> dict[str, Any]:
  todo = "give each row 'chosen' and 'rejected' (and usually 'prompt')"
  chosen = _get(row, 'chosen', where=where, todo=todo)
  rejected = _get(row, 'rejected', where=where, todo=todo)
  prompt = row.get('prompt')
  _check_text_or_messages(chosen, key='chosen', where=where)
  _check_text_or_messages(rejected, key='rejected', where=where)

  if prompt is None:
    if isinstance(chosen, str) or isinstance(rejected, str):
      raise RowError('missing_key', where,
                     "row has no 'prompt' and 'chosen'/'rejected' are plain "
                     'text, so there is nothing to condition on',
                     "add a 'prompt', or give 'chosen' and 'rejected' as "
                     'whole conversations that share the prompt messages')
    chosen = _messages(chosen, key='chosen', where=where)
    rejected = _messages(rejected, key='rejected', where=where)
    if chosen == rejected:
      raise _equal(where)
    prompt, chosen, rejected = _split_conversations(chosen, rejected,
                                                    where=where)
    _check_responses(chosen, rejected, where=where)
    return {'format': 'chat', 'prompt': prompt, 'chosen': chosen,
            'rejected': rejected}

  _check_text_or_messages(prompt, key='prompt', where=where)
  if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
    fmt = 'text'
  else:
    fmt = 'chat'
    prompt = _as_messages(prompt, key='prompt', role='user', where=where)
    chosen = _as_messages(chosen, key='chosen', role='assistant', where=where)
    rejected = _as_messages(rejected, key='rejected', role='assistant',
                            where=where)
  _check_responses(chosen, rejected, where=where)
  return {'format': fmt, 'prompt': prompt, 'chosen': chosen,
          'rejected': rejected}


def _check_responses(chosen, rejected, *, where: str) -> None:
  for key, value in (('chosen', chosen), ('rejected', rejected)):
    if _blank(value):
      raise RowError('empty_completion', where,
                     f'{key!r} response is empty or whitespace',
                     'fill in both responses, or drop the row')
  if chosen == rejected:
    raise _equal(where)


def _equal(where: str) -> RowError:
  return RowError('chosen_equals_rejected', where,
                  "'chosen' and 'rejected' are identical, so the pair carries "
                  'no preference', 'drop the row or fix the pairing')


def normalize_prompt(row: Any, *, where: str) -> dict[str, Any]:
  """Canonical RL prompt row {'format', 'prompt', 'extra'}.

  `extra` holds every other column unchanged (answer, rubric, tests, ...);
  it travels to the reward functions.
  """
  check_object(row, where=where)
  prompt = _get(row, 'prompt', where=where,
                todo="give each row a 'prompt' (text or a message list)")
  _check_text_or_messages(prompt, key='prompt', where=where)
  if isinstance(prompt, str):
    fmt = 'text'
  else:
    fmt = 'chat'
    prompt = _messages(prompt, key='prompt', where=where)
  if _blank(prompt):
    raise RowError('empty_prompt', where,
                   "'prompt' is empty or whitespace, so there is nothing to "
                   'generate from', 'fill in the prompt, or drop the row')
  extra = {k: v for k, v in row.items() if k not in ('prompt', WHERE_KEY)}
  return {'format': fmt, 'prompt': prompt, 'extra': extra}


_STEPS_TODO = ("give 'steps' as a list of non-empty strings and 'labels' as one number "
               'in [0, 1] per step (1 = the step is correct)')


def _step_label(value: Any, *, index: int, where: str) -> float:
  # JSON true/false are labels too; any other non-number (a '+'/'-' string, a
  # null) has to be mapped by the user, who knows what it meant.
  if isinstance(value, bool):
    return float(value)
  if not isinstance(value, (int, float)):
    raise RowError('bad_label', where,
                   f'labels[{index}] is a {type(value).__name__} ({value!r}), not a number',
                   "map it to a number in [0, 1] (e.g. Math-Shepherd '+' -> 1, '-' -> 0)")
  if not 0.0 <= value <= 1.0:  # also false for NaN
    raise RowError('bad_label', where, f'labels[{index}] is {value!r}, outside [0, 1]',
                   'give the probability that the step is correct (PRM800K ratings '
                   '-1/0/1: map -1 -> 0 and 0, 1 -> 1, or choose your own mapping)')
  return float(value)


def normalize_steps(row: Any, *, where: str) -> dict[str, Any]:
  """Canonical step-labelled row {'prompt': messages, 'steps', 'labels'}.

  Math-Shepherd / PRM800K style: a prompt (text, taken as one user message,
  or a message list), the solution as a list of steps, and one label per
  step in [0, 1] (hard 0/1 or a soft probability that the step is correct).
  Other columns are ignored.
  """
  check_object(row, where=where)
  todo = "give each row a 'prompt', 'steps' and 'labels'"
  prompt = _get(row, 'prompt', where=where, todo=todo)
  _check_text_or_messages(prompt, key='prompt', where=where)
  prompt = _as_messages(prompt, key='prompt', role='user', where=where)
  if _blank(prompt):
    raise RowError('empty_prompt', where, "'prompt' is empty or whitespace",
                   'fill in the prompt, or drop the row')
  steps = _get(row, 'steps', where=where, todo=todo)
  labels = _get(row, 'labels', where=where, todo=todo)
  for key, value in (('steps', steps), ('labels', labels)):
    if not isinstance(value, list):
      raise RowError('bad_type', where, f'{key!r} is a {type(value).__name__}, not a list',
                     _STEPS_TODO)
  if not steps:
    raise RowError('no_steps', where, "'steps' is an empty list, so there is nothing to "
                   'label', 'give at least one step, or drop the row')
  if len(steps) != len(labels):
    raise RowError('steps_labels_mismatch', where,
                   f'{len(steps)} steps but {len(labels)} labels',
                   'give exactly one label per step')
  for i, step in enumerate(steps):
    if not isinstance(step, str):
      raise RowError('bad_type', where, f'steps[{i}] is a {type(step).__name__}, not a string',
                     _STEPS_TODO)
    if not step.strip():
      # A blank step has no last token to read its score at.
      raise RowError('empty_step', where, f'steps[{i}] is empty or whitespace',
                     'remove the blank step (and its label), or fill it in')
  return {'prompt': prompt, 'steps': list(steps),
          'labels': [_step_label(v, index=i, where=where) for i, v in enumerate(labels)]}
