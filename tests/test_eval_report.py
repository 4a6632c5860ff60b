"""Report files and plots."""

import pytest

from jpost.eval import leaderboard as lb
from jpost.eval import report

PNG = b'\x89PNG\r\n\x1a\n'


def _battles():
  rows = []
  for a, b, wins_a, wins_b, ties in (('x', 'y', 6, 2, 2), ('y', 'z', 5, 3, 2),
                                     ('x', 'z', 8, 1, 1)):
    rows += [{'model_a': a, 'model_b': b, 'winner': 'model_a'}] * wins_a
    rows += [{'model_a': a, 'model_b': b, 'winner': 'model_b'}] * wins_b
    rows += [{'model_a': a, 'model_b': b, 'winner': 'tie'}] * ties
  return rows


def test_plots_are_written(tmp_path):
  battles = _battles()
  rows = lb.leaderboard(battles, rounds=20)
  paths = [
      report.plot_leaderboard(rows, tmp_path / 'board.png'),
      report.plot_win_matrix(battles, tmp_path / 'plots' / 'wins.png'),
      report.plot_scores({'x': [1, 2, 2, 5, 7], 'y': [3, 4, 4, 4]},
                         tmp_path / 'scores.png'),
      report.plot_scores({'x': [0.1, 0.52, 0.9]}, tmp_path / 'cont.svg',
                         bins=5),
  ]
  for path in paths[:3]:
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 1000
  assert b'<svg' in paths[3].read_bytes()


@pytest.mark.parametrize('call, match', [
    (lambda d: report.plot_leaderboard([], d / 'a.png'), 'no rows'),
    (lambda d: report.plot_leaderboard([{'model': 'x'}], d / 'a.png'),
     r"row 0 lacks \['rating'"),
    (lambda d: report.plot_scores({'x': []}, d / 'a.png'), "'x'"),
    (lambda d: report.plot_scores({'x': [1]}, d / 'a.pdf'), '.png or .svg'),
])
def test_plot_errors(tmp_path, call, match):
  with pytest.raises(ValueError, match=match):
    call(tmp_path)


def test_write_report_markdown_and_html(tmp_path):
  battles = _battles()
  rows = lb.leaderboard(battles, rounds=20)
  image = report.plot_leaderboard(rows, tmp_path / 'figs' / 'board.png')
  sections = [
      report.Section(title='Leaderboard', text='Bradley-Terry, 95% bootstrap.',
                     table=rows, images=[image]),
      report.Section(title='Notes', text='a | b\n\nsecond paragraph',
                     table=[{'metric': 'pass@1', 'value': 0.41666},
                            {'metric': 'note', 'value': 'x|y', 'extra': 3}]),
  ]
  md_path = report.write_report(tmp_path, title='Eval <run>',
                                sections=sections)
  md = md_path.read_text()
  assert md.startswith('# Eval <run>\n')
  assert '| rank | model | rating | low | high | battles | win_rate |' in md
  top = rows[0]
  assert (f"| 1 | {top['model']} | {top['rating']:.1f} | {top['low']:.1f} | "
          f"{top['high']:.1f} | {top['battles']} | {top['win_rate']:.3f} |"
          in md)
  assert '| pass@1 | 0.417 |  |' in md and '| note | x\\|y | 3 |' in md
  assert '![board](figs/board.png)' in md
  page = (tmp_path / 'report.html').read_text()
  assert '<title>Eval &lt;run&gt;</title>' in page
  assert 'data:image/png;base64,' in page
  assert f"<td>{top['model']}</td>" in page
  assert '<p>second paragraph</p>' in page


def test_report_errors(tmp_path):
  with pytest.raises(ValueError, match='title'):
    report.Section(title=' ')
  with pytest.raises(ValueError, match='table row 0'):
    report.Section(title='t', table=[('a', 1)])
  with pytest.raises(ValueError, match='not one of'):
    report.Section(title='t', images=['plot.pdf'])
  with pytest.raises(FileNotFoundError, match='plot it first'):
    report.write_report(tmp_path, title='r', sections=[
        report.Section(title='t', images=[tmp_path / 'missing.png'])])
  with pytest.raises(TypeError, match='Section'):
    report.write_report(tmp_path, title='r', sections=[{'title': 't'}])
