"""Human evaluation round trip: import filled rating sheets, check them
against the export's key, and aggregate them with inter-rater agreement.

The sheets come from `export_pointwise_sheet` / `export_pairwise_sheet`
(jpost.eval.sheets, re-exported here). Import maps the blind A/B choices back
to the original responses: a pairwise outcome is '1' (response_1 is better),
'2', 'tie' or 'both_bad', as in jpost.eval.pairwise.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np

from jpost.data.rows import RowError, RowFilter
from jpost.eval import agreement
from jpost.eval import pairwise
from jpost.eval import sheets
from jpost.eval.sheets import (SheetFiles, export_pairwise_sheet,  # noqa: F401
                               export_pointwise_sheet)

KINDS = ('pointwise', 'pairwise')


@dataclasses.dataclass(frozen=True, kw_only=True)
class RatingRecord:
  """One rater's ratings of one item, checked against the key.

  pointwise: `scores` maps each criterion to a whole number in the scale;
             `models` is (model,) when the key names one, else ().
  pairwise:  `verdict` is what the rater chose on the blind sheet ('A', 'B',
             'tie', 'both_bad'); `outcome` the same choice by identity ('1',
             '2', 'tie', 'both_bad'); `models` is (model_1, model_2).
  `where` is 'file:line' of the row.
  """

  kind: str
  item_id: str
  rater: str
  where: str
  models: tuple[str, ...] = ()
  scores: dict[str, int] = dataclasses.field(default_factory=dict)
  verdict: str | None = None
  outcome: str | None = None
  comment: str = ''

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'RatingRecord: kind={self.kind!r} is not one of {KINDS}')
    if self.kind == 'pointwise' and (not self.scores or self.verdict):
      raise ValueError('RatingRecord: a pointwise record needs scores and no '
                       'verdict')
    if self.kind == 'pairwise':
      if self.verdict not in pairwise.VERDICTS:
        raise ValueError(f'RatingRecord: verdict={self.verdict!r} is not one '
                         f'of {pairwise.VERDICTS}')
      if self.outcome not in pairwise.OUTCOMES or len(self.models) != 2:
        raise ValueError('RatingRecord: a pairwise record needs an outcome in '
                         f'{pairwise.OUTCOMES} and two models')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ratings:
  """What `import_ratings` read: the records, and the skip counts (the
  RowFilter stats: seen, kept, skipped, skipped_by_reason, examples)."""

  records: tuple[RatingRecord, ...]
  skipped: dict[str, Any]


# ----------------------------------------------------------------- import


def _read_rows(path: pathlib.Path,
               needed: Sequence[str]) -> Iterator[tuple[int, Any]]:
  """(line, row) pairs; a CSV row's line is where its record starts. A CSV
  header without the `needed` columns raises ValueError."""
  if path.suffix == '.jsonl':
    with path.open(encoding='utf-8-sig') as f:
      for line, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          yield line, json.loads(text)
        except json.JSONDecodeError as e:
          yield line, RowError('bad_json', f'{path}:{line}',
                               f'not valid JSON ({e.msg})',
                               'fix the line or export the sheet again')
    return
  with path.open(encoding='utf-8-sig', newline='') as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
      raise ValueError(f'{path}: empty file, no header row')
    missing = [c for c in needed if c not in reader.fieldnames]
    if missing:
      raise ValueError(f'{path}:1: no {missing} column(s) in the header; rate '
                       'on the exported sheet without renaming its columns')
    start = reader.line_num + 1
    for row in reader:
      yield start, row
      start = reader.line_num + 1


def _text(row: dict, key: str) -> str:
  value = row.get(key)
  return '' if value is None else str(value).strip()


def _score(value: Any, criterion: str, scale: Sequence[int],
           where: str) -> int:
  low, high = scale
  todo = f'give a whole number from {low} to {high}'
  if value is None or (isinstance(value, str) and not value.strip()):
    raise RowError('missing_rating', where, f'{criterion!r} is empty', todo)
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise RowError('bad_rating', where, f'{criterion}={value!r} is not a '
                   'number', todo) from None
  if not math.isfinite(number):  # 'nan', 'inf', '1e400': int() would raise
    raise RowError('bad_rating', where, f'{criterion}={value!r} is not a finite '
                   'number', todo)
  if number != int(number) or isinstance(value, bool):
    raise RowError('bad_rating', where, f'{criterion}={value!r} is not a whole '
                   'number', todo)
  if not low <= number <= high:
    raise RowError('out_of_range', where, f'{criterion}={value!r} is outside '
                   f'the scale {low}..{high}', todo)
  return int(number)


def _verdict(value: Any, where: str) -> str:
  todo = "write one of 'A', 'B', 'tie', 'both_bad'"
  text = '' if value is None else str(value).strip()
  if not text:
    raise RowError('missing_rating', where, 'verdict is empty', todo)
  norm = text.lower().replace(' ', '_').replace('-', '_')
  verdict = {'a': 'A', 'b': 'B', 'tie': 'tie', 'both_bad': 'both_bad'}.get(norm)
  if verdict is None:
    raise RowError('bad_verdict', where, f'verdict {text!r} is not a choice',
                   todo)
  return verdict


def _record(row: Any, key: dict, rater_default: str, where: str,
            seen: dict) -> RatingRecord:
  if isinstance(row, RowError):
    raise row
  if not isinstance(row, dict):
    raise RowError('not_an_object', where, f'row is a {type(row).__name__}',
                   'keep one JSON object per line')
  item_id = _text(row, 'id')
  if item_id not in key['items']:
    raise RowError('unknown_id', where, f'id {item_id!r} is not in the key',
                   'rate only the exported items and keep the id column as '
                   'it was')
  rater = _text(row, 'rater') or rater_default
  if (item_id, rater) in seen:
    raise RowError('duplicate', where, f'rater {rater!r} rated {item_id!r} '
                   f'twice (first at {seen[item_id, rater]})',
                   'keep one rating per rater and item')
  entry = key['items'][item_id]
  comment = _text(row, 'comment')
  if key['kind'] == 'pointwise':
    scores = {c: _score(row.get(c), c, key['scale'], where)
              for c in key['criteria']}
    model = entry.get('model')
    record = RatingRecord(kind='pointwise', item_id=item_id, rater=rater,
                          where=where, scores=scores, comment=comment,
                          models=() if model is None else (str(model),))
  else:
    verdict = _verdict(row.get('verdict'), where)
    a = entry['a']
    b = '2' if a == '1' else '1'
    outcome = {'A': a, 'B': b}.get(verdict, verdict)
    record = RatingRecord(kind='pairwise', item_id=item_id, rater=rater,
                          where=where, verdict=verdict, outcome=outcome,
                          comment=comment,
                          models=(entry['model_1'], entry['model_2']))
  seen[item_id, rater] = where
  return record


def import_ratings(paths: str | pathlib.Path | Sequence[str | pathlib.Path], *,
                   key: str | pathlib.Path, policy: str = 'error') -> Ratings:
  """Reads filled sheets (CSV or JSONL) and checks every row against `key`.

  key: the .key.json from the export (or the exported sheet path, whose key
  sits next to it). A row's rater is its 'rater' cell, or the file name
  without suffix when that is empty (one file per rater). Row errors (a
  missing rating, a score out of range or not whole, an unknown verdict, an
  unknown id, the same rater twice on one item) name file:line; with
  policy='error' the first one raises RowError, with policy='skip' the row is
  skipped and counted in `Ratings.skipped`. A CSV header missing a rating
  column always raises ValueError (in JSONL a missing key is a missing
  rating).
  """
  if isinstance(paths, (str, pathlib.Path)):
    paths = [paths]
  keydata = sheets.load_key(key)
  needed = (['id'] + list(keydata['criteria'])
            if keydata['kind'] == 'pointwise' else ['id', 'verdict'])
  rows_filter = RowFilter(policy=policy)
  records, seen = [], {}
  for path in map(pathlib.Path, paths):
    if path.suffix not in ('.csv', '.jsonl'):
      raise ValueError(f'{path}: ratings must be a .csv or .jsonl file')
    for line, row in _read_rows(path, needed):
      where = f'{path}:{line}'
      record = rows_filter.apply(
          lambda r, w=where, d=path.stem: _record(r, keydata, d, w, seen),
          row, where)
      if record is not None:
        records.append(record)
  return Ratings(records=tuple(records), skipped=rows_filter.stats())


# -------------------------------------------------------------- aggregate


def _check_kind(records: Sequence[RatingRecord]) -> str:
  if not records:
    raise ValueError('aggregate: no rating records given')
  kinds = {r.kind for r in records}
  if len(kinds) > 1:
    raise ValueError(f'aggregate: records mix kinds {sorted(kinds)}; '
                     'aggregate pointwise and pairwise ratings separately')
  return kinds.pop()


def _by_item(records: Sequence[RatingRecord]) -> dict[str, list[RatingRecord]]:
  out: dict[str, list[RatingRecord]] = {}
  for r in records:
    first = out.setdefault(r.item_id, [r])[0]
    if r is first:
      continue
    if r.models != first.models or set(r.scores) != set(first.scores):
      raise ValueError(f'aggregate: item {r.item_id!r} at {r.where} has other '
                       f'models or criteria than at {first.where}; aggregate '
                       'ratings of one export (one key) at a time')
    out[r.item_id].append(r)
  return out


def _agreement(votes: list[list], categories: Sequence, level: str) -> dict:
  multi = [v for v in votes if len(v) >= 2]
  if not multi:
    return {'fleiss_kappa': float('nan'), 'krippendorff_alpha': float('nan'),
            'items_with_2plus_raters': 0}
  table = agreement.count_table(multi, categories)
  return {'fleiss_kappa': agreement.fleiss_kappa(table),
          'krippendorff_alpha': agreement.krippendorff_alpha(multi,
                                                             level=level),
          'items_with_2plus_raters': len(multi)}


def aggregate(records: Sequence[RatingRecord]) -> dict[str, Any]:
  """Per-item consensus and inter-rater agreement.

  pairwise: each item's outcome is the strict majority of its raters
  (pairwise.majority_vote: 'tie' without one), `battles` turns those into a
  battle log for the leaderboard, and agreement is Fleiss' kappa and nominal
  Krippendorff's alpha over the raters' outcomes.
  pointwise: per item and criterion the median, mean and count of scores;
  per criterion the mean of item means, per model (when the key named them)
  the mean of its item means, and agreement as interval Krippendorff's alpha
  (the main figure for Likert data) and Fleiss' kappa treating each scale
  point as a category (exact agreement only).
  Agreement uses items with 2 or more ratings; NaN when there are none.
  """
  kind = _check_kind(records)
  items = _by_item(records)
  raters = sorted({r.rater for r in records})
  if kind == 'pairwise':
    out_items, battles = {}, []
    for item_id, rs in items.items():
      outcomes = [r.outcome for r in rs]
      consensus = pairwise.majority_vote(outcomes)
      out_items[item_id] = {
          'outcome': consensus, 'n': len(rs),
          'votes': {o: outcomes.count(o) for o in pairwise.OUTCOMES}}
      battles.append(pairwise.to_battle(*rs[0].models, consensus,
                                        item_id=item_id))
    votes = [[r.outcome for r in rs] for rs in items.values()]
    return {'kind': kind, 'raters': raters, 'items': out_items,
            'battles': battles,
            'agreement': _agreement(votes, pairwise.OUTCOMES, 'nominal')}
  criteria = list(records[0].scores)
  if any(set(r.scores) != set(criteria) for r in records):
    raise ValueError('aggregate: records rate different criteria; aggregate '
                     'ratings of one export (one key) at a time')
  out_items = {}
  for item_id, rs in items.items():
    out_items[item_id] = {
        c: {'median': float(np.median([r.scores[c] for r in rs])),
            'mean': float(np.mean([r.scores[c] for r in rs])), 'n': len(rs)}
        for c in criteria}
  per_criterion = {}
  for c in criteria:
    votes = [[r.scores[c] for r in rs] for rs in items.values()]
    values = sorted({v for vs in votes for v in vs})
    per_criterion[c] = {
        'mean': float(np.mean([out_items[i][c]['mean'] for i in out_items])),
        'agreement': _agreement(votes, values, 'interval')}
  by_model: dict[str, list[str]] = {}
  for item_id, rs in items.items():
    if rs[0].models:
      by_model.setdefault(rs[0].models[0], []).append(item_id)
  per_model = {
      model: {c: float(np.mean([out_items[i][c]['mean'] for i in ids]))
              for c in criteria}
      for model, ids in by_model.items()}
  return {'kind': kind, 'raters': raters, 'items': out_items,
          'criteria': per_criterion, 'models': per_model}
