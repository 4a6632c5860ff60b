"""Evaluation reports: report.md and a self-contained report.html, plus the
plots they show (leaderboard with intervals, win-rate matrix, score
histograms).

Plots draw on matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so they work headless and leave a notebook's backend alone. The
HTML report embeds its images as base64 data, so it is one file to share;
report.md links them by relative path.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from jpost.eval import pairwise

_MIME = {'.png': 'image/png', '.svg': 'image/svg+xml', '.jpg': 'image/jpeg',
         '.jpeg': 'image/jpeg'}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Section:
  """One report section: a heading, then text (markdown; shown as plain
  paragraphs in HTML), a table (rows as dicts; the columns are the first
  row's keys, then any new keys of later rows) and images (paths)."""

  title: str
  text: str = ''
  table: Sequence[Mapping[str, Any]] = ()
  images: Sequence[str | os.PathLike] = ()

  def __post_init__(self):
    if not isinstance(self.title, str) or not self.title.strip():
      raise ValueError(f'Section: title={self.title!r} must be a non-empty '
                       'string')
    for i, row in enumerate(self.table):
      if not isinstance(row, Mapping):
        raise ValueError(f'Section {self.title!r}: table row {i} is a '
                         f'{type(row).__name__}, not a dict')
    for image in self.images:
      if pathlib.Path(image).suffix.lower() not in _MIME:
        raise ValueError(f'Section {self.title!r}: image {image} is not one of '
                         f'{sorted(_MIME)}')


def format_cell(value: Any) -> str:
  """Table text for a value: floats rounded for reading, rest as str."""
  if isinstance(value, (float, np.floating)):
    if math.isnan(value):
      return 'nan'
    if abs(value) >= 100:
      return f'{value:.1f}'
    return f'{value:.3f}'
  if isinstance(value, (tuple, list)):
    return ', '.join(format_cell(v) for v in value)
  return str(value)


def _columns(table: Sequence[Mapping[str, Any]]) -> list[str]:
  columns: list[str] = []
  for row in table:
    columns += [k for k in row if k not in columns]
  return columns


def _md_cell(value: Any) -> str:
  return format_cell(value).replace('|', '\\|').replace('\n', '<br>')


def markdown_table(table: Sequence[Mapping[str, Any]]) -> str:
  """A GitHub-flavoured markdown table (empty string for no rows)."""
  if not table:
    return ''
  columns = _columns(table)
  lines = ['| ' + ' | '.join(_md_cell(c) for c in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  for row in table:
    lines.append('| ' + ' | '.join(_md_cell(row.get(c, '')) for c in columns)
                 + ' |')
  return '\n'.join(lines)


def _html_table(table: Sequence[Mapping[str, Any]]) -> str:
  if not table:
    return ''
  columns = _columns(table)
  head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
  body = ''.join(
      '<tr>' + ''.join(f'<td>{html.escape(format_cell(row.get(c, "")))}</td>'
                       for c in columns) + '</tr>'
      for row in table)
  return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image_data(path: pathlib.Path) -> str:
  mime = _MIME[path.suffix.lower()]
  return f'data:{mime};base64,' + base64.b64encode(path.read_bytes()).decode()


_CSS = ('body{font-family:sans-serif;max-width:60em;margin:2em auto;'
        'padding:0 1em}table{border-collapse:collapse;margin:1em 0}'
        'th,td{border:1px solid #bbb;padding:.25em .6em;text-align:left}'
        'th{background:#eee}img{max-width:100%}')


def write_report(workdir: str | os.PathLike, *, title: str,
                 sections: Sequence[Section]) -> pathlib.Path:
  """Writes workdir/report.md and workdir/report.html; returns report.md.

  Image paths may be absolute or relative to the current directory; each
  must exist. report.md links them relative to workdir; report.html embeds
  them.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  md = [f'# {title}', '']
  body = [f'<h1>{html.escape(title)}</h1>']
  for section in sections:
    if not isinstance(section, Section):
      raise TypeError(f'write_report: got a {type(section).__name__}; give '
                      'Section objects')
    md += [f'## {section.title}', '']
    body.append(f'<h2>{html.escape(section.title)}</h2>')
    if section.text:
      md += [section.text.strip(), '']
      body += [f'<p>{html.escape(p.strip())}</p>'
               for p in section.text.strip().split('\n\n')]
    if section.table:
      md += [markdown_table(section.table), '']
      body.append(_html_table(section.table))
    for image in section.images:
      path = pathlib.Path(image)
      if not path.is_file():
        raise FileNotFoundError(f'report section {section.title!r}: image '
                                f'{path} does not exist (plot it first)')
      rel = os.path.relpath(path.resolve(), workdir.resolve())
      md += [f'![{path.stem}]({pathlib.Path(rel).as_posix()})', '']
      body.append(f'<p><img alt="{html.escape(path.stem)}" '
                  f'src="{_image_data(path)}"></p>')
  md_path = workdir / 'report.md'
  md_path.write_text('\n'.join(md).rstrip() + '\n', encoding='utf-8')
  page = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
          f'<title>{html.escape(title)}</title><style>{_CSS}</style></head>'
          '<body>\n' + '\n'.join(body) + '\n</body></html>\n')
  (workdir / 'report.html').write_text(page, encoding='utf-8')
  return md_path


# ------------------------------------------------------------------ plots


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if path.suffix.lower() not in ('.png', '.svg'):
    raise ValueError(f'plot path {path} must end in .png or .svg')
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path)
  return path


def plot_leaderboard(rows: Sequence[Mapping[str, Any]],
                     path: str | os.PathLike) -> pathlib.Path:
  """Ratings with their (low, high) intervals as error bars, best on top.
  `rows` as from leaderboard.leaderboard (keys model, rating, low, high)."""
  if not rows:
    raise ValueError('plot_leaderboard: no rows')
  for i, row in enumerate(rows):
    missing = [k for k in ('model', 'rating', 'low', 'high') if k not in row]
    if missing:
      raise ValueError(f'plot_leaderboard: row {i} lacks {missing}')
  rows = sorted(rows, key=lambda r: r['rating'])
  rating = np.array([r['rating'] for r in rows], dtype=float)
  err = np.array([[r['rating'] - r['low'] for r in rows],
                  [r['high'] - r['rating'] for r in rows]], dtype=float)
  fig = _figure(6.5, 1.2 + 0.4 * len(rows))
  ax = fig.add_subplot()
  y = np.arange(len(rows))
  ax.errorbar(rating, y, xerr=np.maximum(err, 0), fmt='o', capsize=4)
  ax.set_yticks(y, [str(r['model']) for r in rows])
  ax.set_xlabel('rating (error bars: low to high)')
  ax.grid(axis='x', alpha=0.3)
  return _save(fig, path)


def plot_win_matrix(battles: Sequence[Mapping[str, Any]],
                    path: str | os.PathLike, *,
                    models: Sequence[str] | None = None) -> pathlib.Path:
  """Heatmap of how often the row model beats the column model (ties half);
  blank where two models never met. Models ordered by overall win rate
  unless `models` gives the order."""
  names, rate, games = pairwise.win_matrix(list(battles), models=models)
  if models is None:
    overall = pairwise.win_rates(list(battles))
    order = sorted(range(len(names)),
                   key=lambda j: -overall[names[j]]['win_rate'])
    names = tuple(names[j] for j in order)
    rate, games = rate[np.ix_(order, order)], games[np.ix_(order, order)]
  m = len(names)
  fig = _figure(1.6 + 0.7 * m, 1.2 + 0.6 * m)
  ax = fig.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(rate), cmap='RdBu', vmin=0, vmax=1)
  for i in range(m):
    for j in range(m):
      if games[i, j] > 0:
        ax.text(j, i, f'{rate[i, j]:.2f}', ha='center', va='center',
                fontsize=8)
  ax.set_xticks(range(m), names, rotation=45, ha='right')
  ax.set_yticks(range(m), names)
  ax.set_xlabel('opponent')
  ax.set_ylabel('model')
  fig.colorbar(image, ax=ax, label='win rate (ties half)')
  return _save(fig, path)


def plot_scores(scores_by_model: Mapping[str, Sequence[float]],
                path: str | os.PathLike, *, bins: int | None = None
                ) -> pathlib.Path:
  """Overlaid histograms of each model's scores. Whole-number scores (Likert,
  0/1 correctness) get one bin per value unless `bins` is given."""
  if not scores_by_model:
    raise ValueError('plot_scores: no models given')
  arrays = {}
  for name, scores in scores_by_model.items():
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
      raise ValueError(f'plot_scores: scores of {name!r} must be a non-empty '
                       'list of finite numbers')
    arrays[name] = values
  pooled = np.concatenate(list(arrays.values()))
  low, high = pooled.min(), pooled.max()
  if bins is None and np.all(pooled == np.round(pooled)) and high - low <= 50:
    edges = np.arange(low - 0.5, high + 1.5)
  else:
    edges = np.histogram_bin_edges(pooled, bins=bins or 'auto')
  fig = _figure(6.5, 3.5)
  ax = fig.add_subplot()
  for name, values in arrays.items():
    ax.hist(values, bins=edges, histtype='step', linewidth=1.5,
            label=f'{name} (mean {values.mean():.3g})')
  ax.set_xlabel('score')
  ax.set_ylabel('count')
  ax.legend(fontsize=8)
  return _save(fig, path)
