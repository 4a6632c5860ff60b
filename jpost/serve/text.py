"""Turning a growing list of token ids into text that can be sent: stop
strings, and characters not yet complete (a multi-byte character split over
tokens decodes as U+FFFD until its last byte arrives)."""

from __future__ import annotations

REPLACEMENT = '\ufffd'


def stop_position(text: str, stops: tuple[str, ...]) -> int | None:
  """Index where the earliest stop string starts in `text`, or None."""
  found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
  return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
  """How many characters at the end of `text` must wait for the next token:
  an unfinished character, or a suffix that may still become a stop string."""
  hold = len(text) - len(text.rstrip(REPLACEMENT))
  for stop in stops:
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
      if text.endswith(stop[:size]):
        hold = max(hold, size)
        break
  return hold


def releasable(text: str, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
  """(the prefix of `text` that may be sent now, whether a stop string was
  found). A stop string and what follows it are never sent; at the end
  (`final`), nothing is held back."""
  at = stop_position(text, stops)
  if at is not None:
    return text[:at], True
  if final:
    return text, False
  return text[:len(text) - held_back(text, stops)], False
