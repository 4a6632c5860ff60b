"""Reading rows from JSONL, Parquet and Python lists, with their locations."""

from __future__ import annotations

import json
import pathlib

import pytest

from jpost.data.rows import RowError, RowFilter, normalize_sft
from jpost.data.sources import load_source

CHAT = {'messages': [{'role': 'user', 'content': 'hi'},
                     {'role': 'assistant', 'content': 'hello\u2028there'}]}
TEXT = {'prompt': 'Q', 'completion': 'A', 'answer': 7}


def _write(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


@pytest.mark.parametrize('suffix', ['.jsonl', '.json', '.JSONL'])
def test_jsonl_rows_carry_file_and_line(tmp_path, suffix):
  # U+2028 inside a string must not shift line numbers; blank lines are
  # not rows but still count as lines.
  path = _write(tmp_path / f'train{suffix}', [
      json.dumps(CHAT, ensure_ascii=False), '', '   ', json.dumps(TEXT)])
  rows = load_source(str(path), row_filter=RowFilter())
  assert rows == [dict(CHAT, _where=f'{path}:1'),
                  dict(TEXT, _where=f'{path}:4')]


def test_jsonl_accepts_pathlib_crlf_and_bom(tmp_path):
  path = tmp_path / 'win.jsonl'
  path.write_bytes(b'\xef\xbb\xbf' + json.dumps(TEXT).encode() + b'\r\n'
                   + json.dumps(CHAT).encode() + b'\r\n')
  rows = load_source(path, row_filter=RowFilter())
  assert [r['_where'] for r in rows] == [f'{path}:1', f'{path}:2']
  assert rows[1]['messages'] == CHAT['messages']


BAD_LINES = [
    json.dumps(TEXT),                 # 1 ok
    '{"prompt": "Q", "completion":',  # 2 malformed
    '',                               # 3 blank
    '[1, 2]',                         # 4 not an object
    '"just a string"',                # 5 not an object
    json.dumps(CHAT),                 # 6 ok
    "{'prompt': 'single quotes'}",    # 7 malformed
    '{"_where": "x"}',                # 8 reserved key
]


def test_malformed_json_names_file_and_line(tmp_path):
  path = _write(tmp_path / 'bad.jsonl', BAD_LINES)
  with pytest.raises(RowError) as info:
    load_source(path, row_filter=RowFilter(policy='error'))
  assert info.value.reason == 'malformed_json'
  assert info.value.where == f'{path}:2'
  assert str(info.value).startswith(f'{path}:2: line is not valid JSON (')
  assert 'fix or remove the line' in str(info.value)


def test_malformed_json_skip_policy_counts(tmp_path):
  path = _write(tmp_path / 'bad.jsonl', BAD_LINES)
  row_filter = RowFilter(policy='skip')
  rows = load_source(path, row_filter=row_filter)
  assert [r['_where'] for r in rows] == [f'{path}:1', f'{path}:6']
  stats = row_filter.stats()
  assert (stats['seen'], stats['kept'], stats['skipped']) == (7, 2, 5)
  assert stats['skipped_by_reason'] == {
      'malformed_json': 2, 'not_an_object': 2, 'reserved_key': 1}
  assert [e['where'] for e in stats['examples']] == [
      f'{path}:{n}' for n in (2, 4, 5, 7, 8)]
  assert 'JSON array' in stats['examples'][1]['message']


def test_invalid_utf8_is_a_malformed_line(tmp_path):
  path = tmp_path / 'latin1.jsonl'
  path.write_bytes(json.dumps(TEXT).encode() + b'\n{"prompt": "caf\xe9"}\n')
  with pytest.raises(RowError, match=r'latin1\.jsonl:2: line is not valid'):
    load_source(path, row_filter=RowFilter())


def test_json_array_file_gets_a_hint(tmp_path):
  path = _write(tmp_path / 'array.json', ['[', json.dumps(TEXT), ']'])
  with pytest.raises(RowError, match=r"array\.json:1: .*jq -c '\.\[\]'"):
    load_source(path, row_filter=RowFilter())


def test_python_rows():
  row_filter = RowFilter(policy='skip')
  source = [TEXT, 'oops', CHAT]
  rows = load_source(source, row_filter=row_filter)
  assert rows == [dict(TEXT, _where='rows[0]'), dict(CHAT, _where='rows[2]')]
  assert '_where' not in TEXT  # the caller's rows are not modified
  assert row_filter.stats()['skipped_by_reason'] == {'not_an_object': 1}
  assert row_filter.stats()['examples'][0]['message'].startswith(
      'rows[1]: row is a str, not an object')


def test_missing_file_is_named(tmp_path):
  path = tmp_path / 'nope.jsonl'
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    load_source(path, row_filter=RowFilter())


@pytest.mark.parametrize('spec, error, fragment', [
    ('data.csv', ValueError, "suffix '.csv'"),
    ({'prompt': 'Q'}, TypeError, 'is a dict'),
])
def test_unsupported_sources(spec, error, fragment):
  with pytest.raises(error, match=fragment):
    load_source(spec, row_filter=RowFilter())


def test_parquet_round_trip(tmp_path):
  pa = pytest.importorskip('pyarrow')
  pq = pytest.importorskip('pyarrow.parquet')
  source = [
      {'prompt': [{'role': 'user', 'content': 'Q1'}], 'answer': '1',
       'tests': [1, 2]},
      {'prompt': [{'role': 'system', 'content': 'S'},
                  {'role': 'user', 'content': 'Q2'}], 'answer': '2',
       'tests': []},
  ]
  path = tmp_path / 'rl.parquet'
  pq.write_table(pa.Table.from_pylist(source), path)
  rows = load_source(path, row_filter=RowFilter())
  assert rows == [dict(source[0], _where=f'{path}[0]'),
                  dict(source[1], _where=f'{path}[1]')]


def test_parquet_null_message_fields_are_dropped(tmp_path):
  pa = pytest.importorskip('pyarrow')
  pq = pytest.importorskip('pyarrow.parquet')
  messages = [{'role': 'user', 'content': 'Q'},
              {'role': 'tool', 'content': '4', 'name': 'calc'},
              {'role': 'assistant', 'content': 'A'}]
  path = tmp_path / 'sft.parquet'
  pq.write_table(pa.Table.from_pylist([{'messages': messages}]), path)
  [row] = load_source(path, row_filter=RowFilter())
  # Parquet stores one struct type, so the user message gains 'name': None.
  assert row['messages'][0] == {'role': 'user', 'content': 'Q', 'name': None}
  assert normalize_sft(row, where=row['_where'])['messages'] == messages


def test_ten_thousand_rows_load_with_their_line_numbers(tmp_path):
  # Their speed is measured, not asserted: bench/data_throughput.py.
  path = _write(tmp_path / 'big.jsonl', [json.dumps(CHAT)] * 10_000)
  rows = load_source(path, row_filter=RowFilter(policy='skip'))
  assert len(rows) == 10_000
  assert [row['_where'] for row in rows[::2500]] == [f'{path}:{n}' for n in (1, 2501, 5001, 7501)]
  assert rows[-1]['_where'] == f'{path}:10000'
