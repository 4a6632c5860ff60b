"""Arena votes -> training and evaluation files.

  python -m jpost.serve.export --db=runs/serve/arena.sqlite \\
      --preferences=runs/serve/prefs.jsonl --battles=runs/serve/battles.jsonl

`--preferences` rows train a reward model or DPO as they are
(`--config.data.train='("runs/serve/prefs.jsonl",)'`); `--battles` is the
battle log jpost.eval's leaderboard reads. Ties and both-bad votes go into
the battles but not the preferences; their counts are printed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jpost.serve import votes as votes_lib


def export(db: str | pathlib.Path, *, preferences: str | None = None,
           battles: str | None = None) -> dict:
  """Writes the requested files; returns the counts."""
  if not pathlib.Path(db).is_file():
    raise FileNotFoundError(f'{db}: no such vote database (the serve recipe writes '
                            'WORKDIR/arena.sqlite).')
  all_votes = votes_lib.VoteStore(db).all()
  counts = {'votes': len(all_votes)}
  if preferences:
    rows, kept = votes_lib.preference_rows(all_votes)
    votes_lib.write_jsonl(rows, preferences)
    counts |= kept
  if battles:
    votes_lib.write_jsonl(votes_lib.battle_rows(all_votes), battles)
    counts['battles'] = len(all_votes)
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m jpost.serve.export', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--db', required=True, help='the Arena vote database (arena.sqlite)')
  parser.add_argument('--preferences', help='write preference JSONL {prompt, chosen, rejected}')
  parser.add_argument('--battles', help='write battle-log JSONL {model_a, model_b, winner}')
  args = parser.parse_args(argv)
  if not (args.preferences or args.battles):
    parser.error('give --preferences and/or --battles.')
  try:
    counts = export(args.db, preferences=args.preferences, battles=args.battles)
  except FileNotFoundError as e:
    print(f'jpost.serve.export: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(counts))
  return 0


if __name__ == '__main__':
  sys.exit(main())
