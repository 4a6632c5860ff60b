"""Reading raw rows, each tagged with where it came from.

Every row returned carries a `'_where'` key ('data/train.jsonl:12' for line
12 of a JSON Lines file, 'data/train.parquet[3]' for row 3 of a Parquet file,
'rows[3]' for a Python list) so that any later error can name its row.
Rows are not validated here beyond being JSON objects; `rows.normalize_*`
does that.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Sequence

from jpost.data.rows import WHERE_KEY, RowError, RowFilter, check_object
from jpost.errors import ConfigError, MissingPathError

JSON_SUFFIXES = ('.jsonl', '.json')
PARQUET_SUFFIXES = ('.parquet',)


def load_source(spec: str | os.PathLike | Sequence[dict], *,
                row_filter: RowFilter) -> list[dict]:
  """Raw rows of one source, each a shallow copy plus `'_where'`.

  `spec` is a path to a JSON Lines (.jsonl/.json) or Parquet file, or a list
  of dicts. Malformed lines and non-object rows go through `row_filter`
  (error or counted skip); blank lines are not rows and are passed over.
  """
  if isinstance(spec, (str, os.PathLike)):
    path = pathlib.Path(spec)
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + PARQUET_SUFFIXES:
      raise ConfigError(
          f'data source {str(path)!r} has suffix {suffix!r}; jpost reads '
          f'JSON Lines {JSON_SUFFIXES} and Parquet {PARQUET_SUFFIXES} '
          '(rename or convert the file)')
    if not path.is_file():
      raise MissingPathError(
          f'data source {str(path)!r} not found (looked for '
          f'{str(path.absolute())!r}; check the path in the data config)')
    if suffix in PARQUET_SUFFIXES:
      return _tagged(_read_parquet(path), str(path) + '[{}]', row_filter)
    return _read_jsonl(path, row_filter)
  if isinstance(spec, (list, tuple)):
    return _tagged(spec, 'rows[{}]', row_filter)
  raise TypeError(
      f'data source is a {type(spec).__name__}; give a path to a .jsonl, '
      '.json or .parquet file, or a list of row dicts')


def _tag(row: Any, *, where: str) -> dict:
  check_object(row, where=where)
  if WHERE_KEY in row:
    raise RowError('reserved_key', where,
                   f'row has a {WHERE_KEY!r} key, which jpost uses for row '
                   'locations', f'rename the {WHERE_KEY!r} column')
  tagged = dict(row)
  tagged[WHERE_KEY] = where
  return tagged


def _tagged(rows: Sequence[Any], where_format: str,
            row_filter: RowFilter) -> list[dict]:
  out = []
  for i, row in enumerate(rows):
    where = where_format.format(i)
    tagged = row_filter.apply(
        functools.partial(_tag, where=where), row, where)
    if tagged is not None:
      out.append(tagged)
  return out


def _parse_line(line: bytes, *, where: str) -> dict:
  try:
    row = json.loads(line)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    if line.lstrip().startswith(b'['):
      hint = ('a JSON array file is not JSON Lines: write one object per '
              "line, e.g. with `jq -c '.[]'`")
    else:
      hint = 'fix or remove the line'
    raise RowError('malformed_json', where,
                   f'line is not valid JSON ({e})', hint) from None
  if isinstance(row, list):
    raise RowError('not_an_object', where,
                   'line is a JSON array, not an object',
                   'write one JSON object per line (JSON Lines), e.g. '
                   "`jq -c '.[]'` to convert a JSON array file")
  return _tag(row, where=where)


def _read_jsonl(path: pathlib.Path, row_filter: RowFilter) -> list[dict]:
  # Bytes, not text: bytes.splitlines breaks only at \n, \r and \r\n, as
  # editors number lines, where str.splitlines also breaks at U+2028 etc.
  # (legal inside JSON strings) and would shift line numbers.
  lines = path.read_bytes().splitlines()
  out = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f'{path}:{number}'
    row = row_filter.apply(
        functools.partial(_parse_line, where=where), line, where)
    if row is not None:
      out.append(row)
  return out


def _read_parquet(path: pathlib.Path) -> list[dict]:
  try:
    import pyarrow.parquet as pq  # optional: only Parquet needs it
  except ImportError as e:
    raise ImportError(
        f'reading {str(path)!r} needs pyarrow (pip install pyarrow), or '
        'convert the file to JSON Lines') from e
  return pq.read_table(path).to_pylist()
