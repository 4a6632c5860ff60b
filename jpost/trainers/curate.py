"""The `curate` recipe: clean a data set before training on it.

Reads every `data.train` source (rows of `data.kind`), decides each row with
jpost.data.curate (validation, length and garbage filters, exact and near
duplicates, n-gram overlap with the `data.eval` sources) and writes, in
workdir: `curated.jsonl` (the kept rows as they were read),
`curate_report.json` (counts by reason with examples, length quantiles,
preference length bias) and `curate_lengths.png` (token lengths before and
after). Train on the result with `--config.data.train='("DIR/curated.jsonl",)'`.
"""

from __future__ import annotations

import json
import pathlib
import sys

from jpost.data import curate, pipeline, sources
from jpost.data.rows import WHERE_KEY, RowFilter
from jpost.errors import ConfigError
from jpost.models import pretrained
from jpost.tokenizer import Tokenizer
from jpost.trainers import register


def _strings(value, *, roles: bool = True, key: str | None = None):
  """Every string inside a row (prompts, messages, answers): the text an
  evaluation row exposes to contamination; `roles=False` leaves out the
  messages' role names."""
  if key == 'role' and not roles:
    return
  if isinstance(value, str):
    yield value
  elif isinstance(value, dict):
    for k, v in value.items():
      if k != WHERE_KEY:
        yield from _strings(v, roles=roles, key=k)
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _strings(v, roles=roles, key=key)


def _eval_texts(row: dict) -> list[str]:
  """An evaluation row's strings, and all of them but the roles joined as one
  text: a training row is checked as its parts joined (prompt, then answer),
  so an eval row copied whole is caught even when each of its strings is
  shorter than the n-gram (a short string matches only a whole text)."""
  return [*_strings(row), '\n'.join(_strings(row, roles=False))]


def read(specs, row_filter) -> list[dict]:
  out = []
  for spec in pipeline.resolve_sources(list(specs)):
    out += sources.load_source(spec, row_filter=row_filter)
  return out


def plot(result: curate.Result, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  top = max(result.lengths_before, default=1)
  bins = list(range(0, top + top // 40 + 2, max(top // 40, 1)))
  ax.hist(result.lengths_before, bins=bins, alpha=0.5, label=f'before ({len(result.lengths_before)})')
  ax.hist(result.lengths_after, bins=bins, alpha=0.5, label=f'after ({len(result.lengths_after)})')
  ax.set_xlabel('tokens per row')
  ax.set_ylabel('rows')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@register('curate')
def run(config, workdir: str | None):
  if workdir is None:
    raise ConfigError('--workdir is required: the curated rows and the report go there.')
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  settings = curate.Settings(**dict(config.curate), max_tokens=config.data.max_len)
  tokenizer = Tokenizer.from_dir(pretrained.resolve(config.model.path))
  row_filter = RowFilter(policy='skip')  # malformed lines: counted, as 'unreadable'
  rows = read(config.data.train, row_filter)
  eval_texts = [text for row in read(config.data.eval, RowFilter(policy='error'))
                for text in _eval_texts(row)]
  result = curate.curate(rows, config.data.kind, lambda t: len(tokenizer.encode(t)),
                         settings, eval_texts)
  with open(workdir / 'curated.jsonl', 'w') as f:
    for i in result.kept:
      f.write(json.dumps({k: v for k, v in rows[i].items() if k != WHERE_KEY}) + '\n')
  summary = curate.report(result, rows) | {'unreadable': row_filter.stats()}
  (workdir / 'curate_report.json').write_text(json.dumps(summary, indent=2) + '\n')
  plot(result, workdir / 'curate_lengths.png')
  print(f'kept {summary["rows_kept"]} of {summary["rows_in"]} rows; dropped '
        f'{summary["dropped"] or "none"} -> {workdir / "curated.jsonl"}', file=sys.stderr)
  return summary
