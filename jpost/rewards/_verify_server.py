"""The math-verify worker process: JSON lines in, JSON lines out.

Started by `jpost.rewards.equivalence` as `python -P <this file>`; it imports
only the standard library and math_verify. It prints {"ready": true} once
loaded, then answers each {"pred": str, "gold": str} line with
{"equal": bool} or {"error": str}. math_verify's own signal-based timeouts
are off: the parent enforces the deadline by killing this process.
"""

import json
import logging
import sys


def _parse(math_verify, text: str):
  # Wrapping in \boxed{} makes math_verify read bare LaTeX and plain text alike.
  return math_verify.parse('\\boxed{' + text + '}', parsing_timeout=None)


def main() -> None:
  logging.disable(logging.WARNING)  # math_verify warns that its timeout is off
  import math_verify
  out = sys.stdout
  out.write(json.dumps({'ready': True}) + '\n')
  out.flush()
  for line in sys.stdin:
    try:
      request = json.loads(line)
      gold = _parse(math_verify, request['gold'])
      pred = _parse(math_verify, request['pred'])
      equal = bool(gold) and bool(pred) and math_verify.verify(gold, pred, timeout_seconds=None)
      reply = {'equal': bool(equal)}
    except Exception as e:  # noqa: BLE001 -- reported to the parent, which counts it
      reply = {'error': f'{type(e).__name__}: {e}'}
    out.write(json.dumps(reply) + '\n')
    out.flush()


if __name__ == '__main__':
  main()
