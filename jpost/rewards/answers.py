"""Final answers in model text: extraction and the in-process numeric comparison.

`extract_answer` looks, in order, for
  1. the last complete `\\boxed{...}` or `\\fbox{...}` (braces matched by a
     scanner, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`),
  2. the last `#### answer` marker (GSM8K style; the rest of that line),
  3. the last number in the text (only with fallback='last_number').

`numbers_equal` decides plain numbers without sympy. Policy: commas between
digit groups, `$`, a trailing '.', surrounding braces and a trailing `%` are
ignored ('25%' equals '25', not '0.25'); `a/b` and `\\frac{a}{b}` are exact
fractions; two numbers are equal when exactly equal or within a relative
1e-6 (so '72.0' == '72', '3/4' == '0.75', '0.333333' == '1/3'). A number
with an exponent past +-MAX_EXPONENT ('1e99999999') is not a plain number
here: computing it exactly could hold the process for hours.
"""

from __future__ import annotations

import fractions
import re

_BOX_COMMANDS = ('\\boxed', '\\fbox')
_HASHES = re.compile(r'####[ \t]*([^\n]*)')
_LAST_NUMBER = re.compile(
    r'(?:(?<![\w)])-)?'  # a minus sign, unless it is a subtraction ('5-3')
    r'(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?'  # 1,234,567.89
    r'|\d+/\d+'  # 3/4
    r'|\d+(?:\.\d+)?'  # 12, 12.5
    r'|\.\d+)')  # .5
_PLAIN = re.compile(r'[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE]([-+]?\d+))?')
# An exact '1e99999999' is 10**99999999: minutes of big-integer arithmetic
# that hold the interpreter, so no timeout in this process could stop it.
# Exponents past this go to the verifier's subprocess, which can be killed.
MAX_EXPONENT = 1000
_GROUPED = re.compile(r'[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?')
_SLASH = re.compile(r'([-+]?\d+)/(\d+)')
_FRAC = re.compile(r'(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}')
RELATIVE_TOLERANCE = 1e-6


def boxed_contents(text: str) -> list[str]:
  """Contents of every complete `\\boxed{...}` / `\\fbox{...}`, in order.

  Nested braces are matched; `\\{` and `\\}` are escaped braces, not
  delimiters; a box left open (a truncated completion) is skipped.
  """
  found = []
  i = 0
  while True:
    start, command = _next_command(text, i)
    if start < 0:
      return found
    j = start + len(command)
    while j < len(text) and text[j] in ' \t':
      j += 1
    if j < len(text) and text[j] == '{':
      end = _matching_brace(text, j)
      if end >= 0:
        found.append(text[j + 1:end])
        i = end + 1
        continue
    i = start + len(command)


def _next_command(text: str, i: int) -> tuple[int, str]:
  best, best_command = -1, ''
  for command in _BOX_COMMANDS:
    k = text.find(command, i)
    # '\boxed' must not be the start of a longer command name like '\boxedx'.
    while k >= 0 and text[k + len(command):k + len(command) + 1].isalpha():
      k = text.find(command, k + 1)
    if k >= 0 and (best < 0 or k < best):
      best, best_command = k, command
  return best, best_command


def _matching_brace(text: str, open_at: int) -> int:
  """Index of the '}' closing the '{' at `open_at`, or -1 if never closed."""
  depth = 0
  i = open_at
  while i < len(text):
    char = text[i]
    if char == '\\':
      i += 2  # an escaped character, e.g. '\{', never opens or closes
      continue
    if char == '{':
      depth += 1
    elif char == '}':
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return -1


def hash_answers(text: str) -> list[str]:
  """The non-empty answers of every `#### answer` marker, in order."""
  return [m.group(1).strip() for m in _HASHES.finditer(text) if m.group(1).strip()]


def extract_answer(text: str, *, fallback: str = 'last_number') -> str | None:
  """The final answer in `text` (see the module docstring), or None."""
  if fallback not in ('last_number', 'none'):
    raise ValueError(f"fallback={fallback!r}; use 'last_number' or 'none'.")
  boxes = [box.strip() for box in boxed_contents(text) if box.strip()]
  if boxes:
    return boxes[-1]
  hashes = hash_answers(text)
  if hashes:
    return hashes[-1]
  if fallback == 'last_number':
    numbers = _LAST_NUMBER.findall(text)
    if numbers:
      return numbers[-1]
  return None


def parse_number(text: str) -> fractions.Fraction | None:
  """`text` as an exact number if it is a plain one (policy above), else None."""
  s = text.strip()
  for junk in ('\\$', '$', '\\!', '\\,', '\\;', '{,}', ' '):
    s = s.replace(junk, '')
  while s.startswith('{') and s.endswith('}') and _matching_brace(s, 0) == len(s) - 1:
    s = s[1:-1]
  s = s.rstrip('.')
  for percent in ('\\%', '%'):
    s = s.removesuffix(percent)
  if _GROUPED.fullmatch(s):
    s = s.replace(',', '')
  try:
    if m := _PLAIN.fullmatch(s):
      if m.group(1) and abs(int(m.group(1))) > MAX_EXPONENT:
        return None
      return fractions.Fraction(s)
    if m := _SLASH.fullmatch(s):
      return fractions.Fraction(int(m.group(1)), int(m.group(2)))
    if m := _FRAC.fullmatch(s):
      value = fractions.Fraction(int(m.group(2)), int(m.group(3)))
      return -value if m.group(1) else value
  except (ZeroDivisionError, ValueError):
    return None
  return None


def numbers_equal(pred: str, gold: str) -> bool | None:
  """True/False when both are plain numbers, None when sympy must decide."""
  a, b = parse_number(pred), parse_number(gold)
  if a is None or b is None:
    return None
  if a == b:
    return True
  return abs(a - b) <= RELATIVE_TOLERANCE * max(1, abs(b))
