"""Rating sheets for human evaluation: export, guidelines and the key file.

Each export writes three files next to each other:

  sheet.csv (or sheet.jsonl)  what raters fill in: id, prompt, response(s),
                              and empty rater / rating / comment columns
  sheet.guidelines.md         the instructions to send with the sheet
  sheet.key.json              kept by the organiser, never sent to raters:
                              the kind of sheet, the criteria and scale, and
                              per item the model(s) behind it

Raters are blind: pointwise sheets do not show which model wrote a response,
and pairwise sheets put the two responses in a random A/B order (seeded) that
only the key records. jpost.eval.human reads the filled sheets back.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np

KEY_FORMAT = 'jpost.human/1'
POINTWISE_TEXT = ('id', 'prompt', 'response')
PAIRWISE_TEXT = ('id', 'prompt', 'response_a', 'response_b')
_EXTRA = ('rater', 'comment', 'verdict')

CRITERIA_HELP = {
    'helpfulness': 'Does the response do what the prompt asked, completely '
                   'and usefully?',
    'factuality': 'Are its claims, numbers and reasoning correct? Mark it '
                  'down for anything false or made up.',
    'clarity': 'Is it well organised, easy to follow and of a fitting '
               'length?',
    'harmlessness': 'Does it avoid unsafe, offensive or inappropriate '
                    'content?',
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SheetFiles:
  """The files one export wrote."""

  sheet: pathlib.Path
  guidelines: pathlib.Path
  key: pathlib.Path


def _check_criteria(criteria: tuple[str, ...]) -> None:
  if not criteria:
    raise ValueError('criteria is empty; give at least one criterion name')
  for c in criteria:
    if not isinstance(c, str) or not c.strip():
      raise ValueError(f'criterion {c!r} must be a non-empty string')
    if c in POINTWISE_TEXT + _EXTRA:
      raise ValueError(f'criterion {c!r} clashes with a sheet column; rename '
                       'it')
  if len(set(criteria)) != len(criteria):
    raise ValueError(f'criteria {criteria} lists a name twice')


def _check_scale(scale: tuple[int, int]) -> None:
  ok = (len(scale) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                for v in scale) and scale[0] < scale[1])
  if not ok:
    raise ValueError(f'scale={scale!r} must be (low, high) whole numbers with '
                     'low < high, e.g. (1, 7)')


def pointwise_guidelines(criteria: Sequence[str],
                         scale: tuple[int, int]) -> str:
  """The default instructions for a pointwise (Likert) sheet."""
  low, high = scale
  mid = (low + high) / 2
  mid_text = f'{mid:g}' if mid == int(mid) else f'{mid:g} (between two points)'
  lines = [
      '# Rating guidelines (pointwise)', '',
      'Each row of the sheet holds a prompt and one response from an AI '
      'assistant. You do not know which system wrote it; please judge only '
      'what you read.', '',
      '## How to fill in the sheet', '',
      "- Write your name or rater id in the `rater` column of every row.",
      f'- Score every criterion column with one whole number from {low} to '
      f'{high}. Do not leave a rating empty.',
      '- Use `comment` for anything worth knowing (optional).',
      '- Do not edit, reorder or delete the `id`, `prompt` or `response` '
      'columns.', '',
      f'## The {low}-{high} scale (Likert)', '',
      f'- {low}: very poor: fails the criterion entirely.',
      f'- {mid_text}: acceptable: meets the criterion with clear flaws.',
      f'- {high}: excellent: could not reasonably be better.',
      'Use the points in between for everything else; the steps are meant to '
      'be equally spaced. Rate each criterion on its own: a clear answer can '
      'still be wrong.', '',
      '## Criteria', '']
  for c in criteria:
    lines.append(f'- **{c}**: {CRITERIA_HELP.get(c, "as named.")}')
  return '\n'.join(lines) + '\n'


def pairwise_guidelines() -> str:
  """The default instructions for a pairwise (A/B) sheet."""
  return '\n'.join([
      '# Rating guidelines (pairwise)', '',
      'Each row holds a prompt and two responses, A and B, from AI '
      'assistants. The order of the two was chosen at random for every row, '
      'so position says nothing about which system wrote which.', '',
      '## How to fill in the sheet', '',
      "- Write your name or rater id in the `rater` column of every row.",
      '- In `verdict` write exactly one of:',
      '  - `A`: response A is better,',
      '  - `B`: response B is better,',
      '  - `tie`: both are about equally good (or equally flawed but usable),',
      '  - `both_bad`: neither response is acceptable.',
      '- Use `comment` for your reason (optional, but it helps).',
      '- Do not edit, reorder or delete the `id`, `prompt` or response '
      'columns.', '',
      '## What "better" means', '',
      'Correctness first, then helpfulness, clarity and fitting length. Do '
      'not prefer a response for being longer or for coming first.',
  ]) + '\n'


def sheet_paths(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path,
                                                   pathlib.Path]:
  """(sheet, guidelines, key) paths for a sheet path ending .csv/.jsonl."""
  sheet = pathlib.Path(path)
  if sheet.suffix not in ('.csv', '.jsonl'):
    raise ValueError(f'sheet path {sheet} must end in .csv or .jsonl')
  stem = sheet.with_suffix('')
  return (sheet, stem.with_name(stem.name + '.guidelines.md'),
          stem.with_name(stem.name + '.key.json'))


def _item_ids(items: Sequence[dict], required: Sequence[str],
              what: str) -> list[str]:
  if not items:
    raise ValueError(f'{what}: no items to export')
  ids = []
  for i, item in enumerate(items):
    if not isinstance(item, dict):
      raise ValueError(f'{what}: item {i} is a {type(item).__name__}, not a '
                       'dict')
    for key in required:
      if not isinstance(item.get(key), str):
        raise ValueError(f'{what}: item {i} needs a string {key!r} (its keys: '
                         f'{sorted(item)})')
    ids.append(str(item.get('id', f'item-{i}')))
  seen = set()
  for i, item_id in enumerate(ids):
    if item_id != item_id.strip() or not item_id:
      # The import strips cells (a spreadsheet pads them): this id would not come back.
      raise ValueError(f'{what}: item {i} has the id {item_id!r}; ids must be non-empty '
                       'without spaces at either end')
    if item_id in seen:
      raise ValueError(f'{what}: item {i} repeats id {item_id!r}; ids must be '
                       'unique')
    seen.add(item_id)
  return ids


def _write_rows(path: pathlib.Path, columns: Sequence[str],
                rows: list[dict[str, Any]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == '.jsonl':
    with path.open('w', encoding='utf-8') as f:
      for row in rows:
        f.write(json.dumps({c: row.get(c) for c in columns},
                           ensure_ascii=False) + '\n')
    return
  with path.open('w', encoding='utf-8', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
      writer.writerow({c: '' if row.get(c) is None else row[c]
                       for c in columns})


def _write_key(path: pathlib.Path, key: dict[str, Any]) -> None:
  path.write_text(json.dumps(key, indent=1, ensure_ascii=False) + '\n',
                  encoding='utf-8')


def export_pointwise_sheet(
    items: Sequence[dict[str, Any]], path: str | pathlib.Path, *,
    criteria: Sequence[str] = ('helpfulness', 'factuality', 'clarity'),
    scale: tuple[int, int] = (1, 7),
    guidelines: str | None = None) -> SheetFiles:
  """A sheet to score each response on each criterion (Likert `scale`).

  items: dicts with 'prompt' and 'response', optional 'id' (default
  'item-<index>') and 'model' (kept in the key only). `guidelines` replaces
  the default instructions text.
  """
  criteria = tuple(criteria)
  _check_criteria(criteria)
  _check_scale(scale)
  ids = _item_ids(items, ('prompt', 'response'), 'export_pointwise_sheet')
  sheet, guide_path, key_path = sheet_paths(path)
  rows = [{'id': i, 'prompt': it['prompt'], 'response': it['response']}
          for i, it in zip(ids, items)]
  _write_rows(sheet, POINTWISE_TEXT + ('rater',) + criteria + ('comment',),
              rows)
  guide_path.write_text(
      guidelines or pointwise_guidelines(criteria, scale), encoding='utf-8')
  _write_key(key_path, {
      'format': KEY_FORMAT, 'kind': 'pointwise', 'criteria': list(criteria),
      'scale': list(scale),
      'items': {i: {'model': it.get('model')} for i, it in zip(ids, items)}})
  return SheetFiles(sheet=sheet, guidelines=guide_path, key=key_path)


def export_pairwise_sheet(pairs: Sequence[dict[str, Any]],
                          path: str | pathlib.Path, *, seed: int = 0,
                          guidelines: str | None = None) -> SheetFiles:
  """A sheet to choose A, B, tie or both_bad for each pair of responses.

  pairs: dicts with 'prompt', 'response_1', 'response_2', optional 'id',
  'model_1', 'model_2' (default '1' and '2'). Each pair's A/B order is drawn
  at random from `seed` and recorded only in the key file.
  """
  ids = _item_ids(pairs, ('prompt', 'response_1', 'response_2'),
                  'export_pairwise_sheet')
  sheet, guide_path, key_path = sheet_paths(path)
  swap = np.random.default_rng(seed).random(len(pairs)) < 0.5
  rows, key_items = [], {}
  for item_id, pair, flip in zip(ids, pairs, swap):
    first, second = ('2', '1') if flip else ('1', '2')
    rows.append({'id': item_id, 'prompt': pair['prompt'],
                 'response_a': pair[f'response_{first}'],
                 'response_b': pair[f'response_{second}']})
    model_1, model_2 = str(pair.get('model_1', '1')), str(pair.get('model_2',
                                                                 '2'))
    if model_1 == model_2:
      raise ValueError(f'export_pairwise_sheet: pair {item_id!r} has the same '
                       f'model {model_1!r} on both sides; name the two models '
                       'apart (model_1, model_2)')
    key_items[item_id] = {'a': first, 'model_1': model_1,
                          'model_2': model_2}
  _write_rows(sheet, PAIRWISE_TEXT + ('rater', 'verdict', 'comment'), rows)
  guide_path.write_text(guidelines or pairwise_guidelines(), encoding='utf-8')
  _write_key(key_path, {'format': KEY_FORMAT, 'kind': 'pairwise',
                        'seed': seed, 'items': key_items})
  return SheetFiles(sheet=sheet, guidelines=guide_path, key=key_path)


def load_key(key: str | pathlib.Path) -> dict[str, Any]:
  """The key written by an export (given its path or the sheet's path)."""
  path = pathlib.Path(key)
  if path.suffix in ('.csv', '.jsonl'):  # Given the sheet: use its key.
    path = sheet_paths(path)[2]
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except FileNotFoundError:
    raise FileNotFoundError(f'key file {path} not found; pass the .key.json '
                            'written by the export') from None
  if not isinstance(data, dict) or data.get('format') != KEY_FORMAT:
    raise ValueError(f'{path} is not a jpost human-eval key (format '
                     f'{KEY_FORMAT!r}); pass the .key.json written by the '
                     'export')
  return data
