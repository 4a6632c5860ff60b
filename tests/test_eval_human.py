"""Human-evaluation sheets: export, import checks, aggregation, agreement."""

import csv
import json

import pytest

from jpost.data.rows import RowError
from jpost.eval import agreement
from jpost.eval import human

ITEMS = [
    {'id': 'q1', 'prompt': 'What is 2+2?', 'response': '4', 'model': 'm1'},
    {'id': 'q2', 'prompt': 'Name a prime.', 'response': 'Seven,\nfor example.',
     'model': 'm2'},
    {'id': 'q3', 'prompt': 'Capital of France?', 'response': 'Paris',
     'model': 'm1'},
]
PAIRS = [
    {'id': f'p{i}', 'prompt': f'question {i}', 'response_1': f'good {i}',
     'response_2': f'bad {i}', 'model_1': 'strong', 'model_2': 'weak'}
    for i in range(8)
]


def _read_csv(path):
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def _write_csv(path, rows):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _fill_pointwise(files, path, scores, rater=''):
  rows = _read_csv(files.sheet)
  for row, (h, f, c) in zip(rows, scores):
    row.update(rater=rater, helpfulness=h, factuality=f, clarity=c)
  _write_csv(path, rows)
  return path


# ------------------------------------------------------------------ export


def test_pointwise_export_is_blind_and_explains_the_scale(tmp_path):
  files = human.export_pointwise_sheet(ITEMS, tmp_path / 'sheet.csv')
  assert files.guidelines.name == 'sheet.guidelines.md'
  rows = _read_csv(files.sheet)
  assert list(rows[0]) == ['id', 'prompt', 'response', 'rater', 'helpfulness',
                           'factuality', 'clarity', 'comment']
  assert rows[1]['response'] == 'Seven,\nfor example.'
  assert all(r['helpfulness'] == '' for r in rows)
  assert 'm1' not in files.sheet.read_text()  # raters do not see the model
  text = files.guidelines.read_text()
  for needle in ('1 to 7', '- 1:', '- 4:', '- 7:', 'helpfulness',
                 'factuality', 'clarity'):
    assert needle in text
  key = json.loads(files.key.read_text())
  assert key['kind'] == 'pointwise' and key['items']['q2'] == {'model': 'm2'}


def test_pairwise_export_randomises_order_and_keeps_it_in_the_key(tmp_path):
  files = human.export_pairwise_sheet(PAIRS, tmp_path / 'pairs.jsonl', seed=3)
  rows = [json.loads(line) for line in files.sheet.read_text().splitlines()]
  assert list(rows[0]) == ['id', 'prompt', 'response_a', 'response_b', 'rater',
                           'verdict', 'comment']
  key = json.loads(files.key.read_text())['items']
  swapped = [r['response_a'].startswith('bad') for r in rows]
  assert 0 < sum(swapped) < len(rows)  # both orders occur
  assert swapped == [key[r['id']]['a'] == '2' for r in rows]
  assert 'strong' not in files.sheet.read_text()
  text = files.guidelines.read_text()
  for needle in ('`A`', '`B`', '`tie`', '`both_bad`', 'random'):
    assert needle in text


@pytest.mark.parametrize('kwargs, match', [
    ({'criteria': ()}, 'criteria is empty'),
    ({'criteria': ('id',)}, 'clashes'),
    ({'scale': (5, 1)}, 'low < high'),
    ({'scale': (1.0, 5)}, 'whole numbers'),
])
def test_export_argument_errors(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    human.export_pointwise_sheet(ITEMS, tmp_path / 's.csv', **kwargs)


def test_export_item_errors(tmp_path):
  with pytest.raises(ValueError, match='item 1 repeats id'):
    human.export_pointwise_sheet([ITEMS[0], ITEMS[0]], tmp_path / 's.csv')
  with pytest.raises(ValueError, match="item 0 needs a string 'response'"):
    human.export_pointwise_sheet([{'prompt': 'x'}], tmp_path / 's.csv')
  with pytest.raises(ValueError, match=r"item 0 has the id ' x '; ids must be non-empty"):
    human.export_pointwise_sheet([dict(ITEMS[0], id=' x ')], tmp_path / 's.csv')
  with pytest.raises(ValueError, match='must end in .csv or .jsonl'):
    human.export_pointwise_sheet(ITEMS, tmp_path / 's.xlsx')
  with pytest.raises(ValueError, match='same model'):
    human.export_pairwise_sheet([dict(PAIRS[0], model_2='strong')],
                                tmp_path / 'p.csv')


# ------------------------------------------------------- import/aggregate


def test_pointwise_round_trip(tmp_path):
  files = human.export_pointwise_sheet(ITEMS, tmp_path / 'sheet.csv')
  alice = _fill_pointwise(files, tmp_path / 'alice.csv',
                          [(7, 7, 6), (4, 3, 5), (6, 7, 7)])
  bob = _fill_pointwise(files, tmp_path / 'bob.csv',
                        [(6, 7, 6), (3, 3, 4), (6, 6, '7')], rater='bob')
  ratings = human.import_ratings([alice, bob], key=files.key)
  assert ratings.skipped['skipped'] == 0 and len(ratings.records) == 6
  first = ratings.records[0]
  assert (first.rater, first.item_id, first.models) == ('alice', 'q1', ('m1',))
  assert first.scores == {'helpfulness': 7, 'factuality': 7, 'clarity': 6}
  assert first.where == f'{alice}:2'
  assert ratings.records[3].rater == 'bob'

  summary = human.aggregate(ratings.records)
  assert summary['raters'] == ['alice', 'bob']
  assert summary['items']['q1']['helpfulness'] == {'median': 6.5,
                                                   'mean': 6.5, 'n': 2}
  assert summary['criteria']['factuality']['mean'] == pytest.approx(
      (7 + 3 + 6.5) / 3)
  assert summary['models']['m1']['helpfulness'] == pytest.approx((6.5 + 6) / 2)
  alpha = summary['criteria']['helpfulness']['agreement']['krippendorff_alpha']
  assert alpha == pytest.approx(agreement.krippendorff_alpha(
      [[7, 6], [4, 3], [6, 6]], level='interval'))
  assert 0.5 < alpha < 1.0


def test_pairwise_round_trip_unblinds_and_votes(tmp_path):
  files = human.export_pairwise_sheet(PAIRS, tmp_path / 'pairs.jsonl', seed=3)
  rows = [json.loads(line) for line in files.sheet.read_text().splitlines()]
  raters = []
  for name, flip_id in (('r1', None), ('r2', 'p0'), ('r3', 'p1')):
    path = tmp_path / f'{name}.jsonl'
    lines = []
    for row in rows:
      better = 'A' if row['response_a'].startswith('good') else 'B'
      if row['id'] == flip_id:  # one dissent per item at most
        better = {'A': 'B', 'B': 'A'}[better]
      lines.append(json.dumps(dict(row, verdict=better.lower() if name == 'r3'
                                   else better)))
    path.write_text('\n'.join(lines) + '\n')
    raters.append(path)
  ratings = human.import_ratings(raters, key=files.sheet)  # key beside sheet
  assert {r.outcome for r in ratings.records} == {'1', '2'}
  assert all(r.models == ('strong', 'weak') for r in ratings.records)
  summary = human.aggregate(ratings.records)
  assert all(v['outcome'] == '1' for v in summary['items'].values())
  assert summary['items']['p0']['votes'] == {'1': 2, '2': 1, 'tie': 0,
                                             'both_bad': 0}
  assert summary['battles'][0] == {'model_a': 'strong', 'model_b': 'weak',
                                   'winner': 'model_a', 'item_id': 'p0'}
  # 8 items x 3 raters, 2 dissents: high but imperfect agreement.
  kappa = summary['agreement']['fleiss_kappa']
  assert kappa == pytest.approx(agreement.fleiss_kappa(
      [[2, 1]] * 2 + [[3, 0]] * 6))
  assert summary['agreement']['items_with_2plus_raters'] == 8


def _bad_sheet(tmp_path, cells):
  """A filled pointwise sheet whose row for q2 (a two-line response, lines
  3-4) and row for q3 (line 5) get the given cells."""
  files = human.export_pointwise_sheet(ITEMS, tmp_path / 'sheet.csv')
  rows = _read_csv(files.sheet)
  for row in rows:
    row.update(rater='ann', helpfulness='5', factuality='5', clarity='5')
  rows[2].update(cells)
  path = tmp_path / 'ann.csv'
  _write_csv(path, rows)
  return files, path


@pytest.mark.parametrize('cells, reason, match', [
    ({'clarity': ''}, 'missing_rating', "'clarity' is empty"),
    ({'clarity': '8'}, 'out_of_range', 'outside the scale 1..7'),
    ({'clarity': '0'}, 'out_of_range', 'outside the scale'),
    ({'clarity': '4.5'}, 'bad_rating', 'not a whole number'),
    ({'clarity': 'good'}, 'bad_rating', 'not a number'),
    ({'clarity': 'nan'}, 'bad_rating', 'not a finite number'),  # int() raised past 'skip'
    ({'clarity': '1e400'}, 'bad_rating', 'not a finite number'),
    ({'id': 'q9'}, 'unknown_id', "id 'q9' is not in the key"),
    ({'id': 'q1'}, 'duplicate', "rated 'q1' twice"),
])
def test_import_errors_name_file_and_line(tmp_path, cells, reason, match):
  files, path = _bad_sheet(tmp_path, cells)
  with pytest.raises(RowError, match=match) as info:
    human.import_ratings(path, key=files.key)
  assert info.value.reason == reason
  assert info.value.where == f'{path}:5'  # row 2 spans lines 3-4

  ratings = human.import_ratings(path, key=files.key, policy='skip')
  assert len(ratings.records) == 2
  assert ratings.skipped['skipped_by_reason'] == {reason: 1}
  assert ratings.skipped['examples'][0]['where'] == f'{path}:5'


def test_import_pairwise_verdict_errors(tmp_path):
  files = human.export_pairwise_sheet(PAIRS[:2], tmp_path / 'p.jsonl')
  path = tmp_path / 'r.jsonl'
  path.write_text(json.dumps({'id': 'p0', 'verdict': 'Both bad'}) + '\n\n'
                  + json.dumps({'id': 'p1', 'verdict': 'C'}) + '\n')
  with pytest.raises(RowError, match=r"r.jsonl:3: verdict 'C' is not a choice"):
    human.import_ratings(path, key=files.key)
  ratings = human.import_ratings(path, key=files.key, policy='skip')
  assert ratings.records[0].verdict == 'both_bad'
  assert ratings.skipped['skipped_by_reason'] == {'bad_verdict': 1}


def test_import_file_errors(tmp_path):
  files = human.export_pointwise_sheet(ITEMS, tmp_path / 'sheet.csv')
  rows = [{k: v for k, v in r.items() if k != 'clarity'}
          for r in _read_csv(files.sheet)]
  _write_csv(tmp_path / 'renamed.csv', rows)
  with pytest.raises(ValueError, match=r"renamed.csv:1: no \['clarity'\]"):
    human.import_ratings(tmp_path / 'renamed.csv', key=files.key)
  with pytest.raises(FileNotFoundError, match='key file'):
    human.import_ratings(files.sheet, key=tmp_path / 'nokey.key.json')
  with pytest.raises(ValueError, match='policy'):
    human.import_ratings(files.sheet, key=files.key, policy='ignore')


def test_aggregate_errors(tmp_path):
  with pytest.raises(ValueError, match='no rating records'):
    human.aggregate([])
  point = human.RatingRecord(kind='pointwise', item_id='a', rater='r',
                             where='x:2', scores={'c': 1})
  pair = human.RatingRecord(kind='pairwise', item_id='a', rater='r',
                            where='x:2', verdict='A', outcome='1',
                            models=('m', 'n'))
  with pytest.raises(ValueError, match='mix kinds'):
    human.aggregate([point, pair])
  with pytest.raises(ValueError, match='verdict'):
    human.RatingRecord(kind='pairwise', item_id='a', rater='r', where='x:2')


# --------------------------------------------------------------- agreement


def test_fleiss_kappa_hand_computed():
  # 4 items, 3 raters, categories (A, B, tie):
  #   item  A B tie  P_i = sum n_ij (n_ij - 1) / (3 * 2)
  #   1     3 0 0    6/6 = 1
  #   2     2 1 0    2/6 = 1/3
  #   3     0 3 0    6/6 = 1
  #   4     1 1 1    0/6 = 0
  # P_bar = (1 + 1/3 + 1 + 0) / 4 = 7/12
  # p_A = 6/12, p_B = 5/12, p_tie = 1/12 -> P_e = (36 + 25 + 1)/144 = 31/72
  # kappa = (7/12 - 31/72) / (1 - 31/72) = (11/72) / (41/72) = 11/41
  table = [[3, 0, 0], [2, 1, 0], [0, 3, 0], [1, 1, 1]]
  assert agreement.fleiss_kappa(table) == pytest.approx(11 / 41)
  votes = [['A'] * 3, ['A', 'A', 'B'], ['B'] * 3, ['A', 'B', 'tie']]
  assert agreement.fleiss_kappa(agreement.count_table(
      votes, ['A', 'B', 'tie'])) == pytest.approx(11 / 41)


def test_fleiss_kappa_textbook_example():
  # Fleiss (1971) as reproduced in many textbooks: 10 items, 14 raters,
  # 5 categories; P_bar = 0.378, P_e = 0.213, kappa = 0.210.
  table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
           [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
           [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
  assert agreement.fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_limits_and_errors():
  assert agreement.fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)
  assert agreement.fleiss_kappa([[3, 0], [3, 0]]) != agreement.fleiss_kappa(
      [[3, 0], [3, 0]])  # NaN: everything in one category
  with pytest.raises(ValueError, match='item 1 has 1 ratings'):
    agreement.fleiss_kappa([[2, 0], [1, 0]])
  with pytest.raises(ValueError, match='whole numbers'):
    agreement.fleiss_kappa([[1.5, 0.5]])


def test_krippendorff_alpha_hand_computed():
  # Nominal, units (a,a), (a,b), (b,b), (b,b): n = 8 values, 3 a's, 5 b's.
  # Observed: only unit 2 disagrees, 2 ordered pairs / (2 - 1) = 2.
  # Expected: ordered pairs of different pooled values = 2 * 3 * 5 = 30.
  # alpha = 1 - (n - 1) * 2 / 30 = 1 - 14/30 = 16/30.
  units = [['a', 'a'], ['a', 'b'], ['b', 'b'], ['b', 'b']]
  assert agreement.krippendorff_alpha(units) == pytest.approx(16 / 30)
  # Binary 0/1 coded as interval gives the same value.
  coded = [[0, 0], [0, 1], [1, 1], [1, 1]]
  assert agreement.krippendorff_alpha(coded, level='interval') == (
      pytest.approx(16 / 30))
  # Interval, units (1,2), (3,3) and a unit rated once (ignored):
  # observed = 2 * (1-2)^2 / 1 = 2; pooled 1,2,3,3: unordered squared
  # differences 1+4+4+1+1+0 = 11, ordered 22; alpha = 1 - 3 * 2 / 22 = 8/11.
  assert agreement.krippendorff_alpha([[1, 2], [3, 3], [5]],
                                      level='interval') == pytest.approx(8 / 11)
  with pytest.raises(ValueError, match='no item has 2'):
    agreement.krippendorff_alpha([[1], [2]])
  with pytest.raises(ValueError, match='level'):
    agreement.krippendorff_alpha(units, level='ordinal')


def test_aggregate_rejects_records_of_different_exports():
  make = lambda scores, where: human.RatingRecord(  # noqa: E731
      kind='pointwise', item_id='a', rater=where, where=where, scores=scores)
  with pytest.raises(ValueError, match='one export'):
    human.aggregate([make({'c': 1}, 'x:2'), make({'d': 1}, 'y:2')])
