"""Data curation before training: what to drop from a data set, and why.

`curate(rows, kind, tokenizer, settings, eval_texts)` walks the rows of one
kind ('sft', 'preference' or 'prompt') in order and gives each the first
reason it fails, or keeps it:

- invalid: the row validation every recipe applies (rows.py), e.g. empty
  turns, chosen == rejected;
- too_short / too_long: tokens of the row's text (the model's tokenizer,
  without the chat template's markers) below `min_tokens` or above
  `max_tokens`; ratio: response tokens / prompt tokens outside
  [min_ratio, max_ratio] (0 turns a bound off);
- repeated_lines / repeated_ngrams: a text whose lines repeat (more than
  `max_repeated_lines` of its lines are copies) or whose most common word
  3-gram is more than `max_top_trigram` of all its 3-grams;
- same_after_normalising (preference): chosen and rejected differ only in
  case, spacing or punctuation;
- exact_duplicate: the same normalised text as an earlier kept row;
- near_duplicate: word-shingle Jaccard similarity >= `near_threshold` with
  an earlier kept row, found by MinHash + LSH (datasketch) and confirmed on
  the two signatures;
- contaminated: shares a word n-gram (n = `decontaminate_n`, 13 by default)
  with a row of the evaluation sets; the overlapping span is reported.

Pure Python over rows; the recipe (trainers/curate.py) reads sources and
writes the kept rows, the report and its plot.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from typing import Any, Callable, Iterable

from jpost.data import rows as row_lib
from jpost.errors import ConfigError

REASONS = ('invalid', 'too_short', 'too_long', 'ratio', 'repeated_lines', 'repeated_ngrams',
           'same_after_normalising', 'exact_duplicate', 'near_duplicate', 'contaminated')
KINDS = ('sft', 'preference', 'prompt')
_NORMALIZE = {'sft': row_lib.normalize_sft, 'preference': row_lib.normalize_preference,
              'prompt': row_lib.normalize_prompt}
# Words, and the symbols that change a math problem ("9 + 8" is not "9 * 8");
# other punctuation and case do not make texts different.
_WORD = re.compile(r"\w+(?:'\w+)?|[-+*/=<>^%\u00d7\u00f7]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  near_threshold: float = 0.8  # Jaccard similarity of word shingles
  shingle_words: int = 5
  num_perm: int = 128  # MinHash permutations
  decontaminate_n: int = 13  # word n-grams shared with an eval row
  min_tokens: int = 8
  max_tokens: int = 0  # 0: no upper bound (the recipe sets data.max_len)
  min_ratio: float = 0.0  # response / prompt tokens; 0: off
  max_ratio: float = 0.0
  max_repeated_lines: float = 0.3
  max_top_trigram: float = 0.2
  long_ratio: float = 3.0  # chosen this many times longer than rejected: counted

  def __post_init__(self):
    if not 0 < self.near_threshold <= 1:
      raise ConfigError(f'curate.near_threshold={self.near_threshold}: must be in (0, 1].')
    for name in ('shingle_words', 'num_perm', 'decontaminate_n'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'curate.{name}={getattr(self, name)}: must be positive.')
    for name in ('max_repeated_lines', 'max_top_trigram'):
      if not 0 < getattr(self, name) <= 1:
        raise ConfigError(f'curate.{name}={getattr(self, name)}: must be in (0, 1].')


# --- text --------------------------------------------------------------------------------


def _content(value) -> str:
  if isinstance(value, str):
    return value
  return '\n'.join(m.get('content') or '' for m in value)


def texts(example: dict, kind: str) -> dict[str, str]:
  """A normalised example's texts by part: 'prompt' and 'response' (sft),
  'prompt', 'chosen', 'rejected' (preference), 'prompt' (prompt rows)."""
  if kind == 'sft':
    if example['format'] == 'text':
      return {'prompt': example['prompt'], 'response': example['completion']}
    messages = example['messages']
    start = example['completion_start']
    if start is None:  # chat rows: the assistant turns are the response
      return {'prompt': _content([m for m in messages if m['role'] != 'assistant']),
              'response': _content([m for m in messages if m['role'] == 'assistant'])}
    return {'prompt': _content(messages[:start]), 'response': _content(messages[start:])}
  if kind == 'preference':
    return {k: _content(example[k]) for k in ('prompt', 'chosen', 'rejected')}
  return {'prompt': _content(example['prompt'])}


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def normalised(text: str) -> str:
  """Lower case, words and math symbols only, single spaces: what 'the same
  text' means here."""
  return ' '.join(words(text))


def shingles(text: str, n: int) -> set[str]:
  w = words(text)
  if len(w) < n:
    return {' '.join(w)} if w else set()
  return {' '.join(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
  return len(a & b) / len(a | b) if a or b else 1.0


def repeated_lines(text: str) -> float:
  """Fraction of a text's non-empty lines that copy an earlier line (0 for < 4 lines)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return 0.0 if len(lines) < 4 else 1 - len(set(lines)) / len(lines)


def top_trigram(text: str) -> float:
  """Share of the most common word 3-gram among all (0 for < 20 of them)."""
  w = words(text)
  grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
  if len(grams) < 20:
    return 0.0
  return collections.Counter(grams).most_common(1)[0][1] / len(grams)


# --- near duplicates ---------------------------------------------------------------------


class NearDuplicates:
  """Streaming near-duplicate finder: `seen(key, text)` -> the key of an
  earlier added text at Jaccard >= threshold, else None (and adds this one)."""

  def __init__(self, threshold: float, *, num_perm: int = 128, shingle_words: int = 5):
    from datasketch import MinHash, MinHashLSH
    self.threshold, self.num_perm, self.n = threshold, num_perm, shingle_words
    # LSH at a lower threshold than the one applied: pairs just above it are
    # then rarely missed as candidates (the banding's false negatives), and
    # the signature check below drops the extra candidates.
    self.lsh = MinHashLSH(threshold=max(threshold - 0.1, 0.05), num_perm=num_perm)
    # One set of hash permutations for every signature (drawing them per row
    # cost more than the hashing).
    template = MinHash(num_perm=num_perm, seed=1)
    self._permutations, self._scheme = template.permutations, template.scheme
    self.signatures = {}  # key -> hash values [num_perm]

  def signature(self, text: str):
    from datasketch import MinHash
    m = MinHash(num_perm=self.num_perm, seed=1, permutations=self._permutations,
                scheme=self._scheme)
    m.update_batch([s.encode() for s in shingles(text, self.n)])
    return m

  def find(self, text: str):
    """(key of an added text at Jaccard >= threshold or None, this text's signature)."""
    m = self.signature(text)
    for other in self.lsh.query(m):
      # LSH returns candidates near the threshold; the signatures decide.
      if (m.hashvalues == self.signatures[other]).mean() >= self.threshold:
        return other, m
    return None, m

  def add(self, key, signature) -> None:
    self.lsh.insert(key, signature)
    self.signatures[key] = signature.hashvalues

  def seen(self, key, text: str):
    other, m = self.find(text)
    if other is None:
      self.add(key, m)
    return other


# --- contamination -----------------------------------------------------------------------


def _grams(w: list[str], n: int) -> list[tuple[str, ...]]:
  # A text shorter than n words is one gram: the whole of it (so a short
  # question copied from an eval set is still found).
  if len(w) < n:
    return [tuple(w)] if w else []
  return [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]


def ngram_index(eval_texts: Iterable[str], n: int) -> set[tuple[str, ...]]:
  grams = set()
  for text in eval_texts:
    grams.update(_grams(words(text), n))
  return grams


def overlap(text: str, index: set, n: int) -> str | None:
  """The longest run of words of `text` covered by n-grams in `index`, or None."""
  w = words(text)
  if len(w) < n:
    return ' '.join(w) if w and tuple(w) in index else None
  hits = [i for i, gram in enumerate(_grams(w, n)) if gram in index]
  if not hits:
    return None
  best, start, end = (0, 0), hits[0], hits[0] + n
  for i in hits[1:] + [None]:
    if i is not None and i <= end:
      end = i + n
      continue
    best = max(best, (end - start, start))
    if i is not None:
      start, end = i, i + n
  length, first = best
  return ' '.join(w[first:first + length])


# --- the walk over rows ------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  kept: list[int]  # indices of the kept rows, in order
  reasons: dict[int, tuple[str, str]]  # dropped index -> (reason, detail)
  lengths_before: list[int]  # tokens per row (valid rows)
  lengths_after: list[int]
  length_bias: dict[str, float]  # preference rows: chosen vs rejected lengths


def curate(raw_rows: list[dict], kind: str, count_tokens: Callable[[str], int],
           settings: Settings, eval_texts: Iterable[str] = ()) -> Result:
  """Decides every row of `raw_rows` (dicts carrying rows.WHERE_KEY)."""
  if kind not in KINDS:
    raise ConfigError(f'curate kind {kind!r}: use one of {KINDS}.')
  s = settings
  index = ngram_index(eval_texts, s.decontaminate_n)
  near = NearDuplicates(s.near_threshold, num_perm=s.num_perm, shingle_words=s.shingle_words)
  hashes, kept, reasons = {}, [], {}
  before, after, bias = [], [], []
  for i, row in enumerate(raw_rows):
    where = row.get(row_lib.WHERE_KEY, f'row {i}')
    try:
      example = _NORMALIZE[kind](row, where=where)
    except row_lib.RowError as e:
      reasons[i] = ('invalid', f'{e.reason}: {e}')
      continue
    parts = texts(example, kind)
    tokens = {k: count_tokens(v) for k, v in parts.items()}
    response = 'chosen' if kind == 'preference' else 'response'
    total = tokens['prompt'] + max(tokens.get('chosen', 0), tokens.get('rejected', 0),
                                   tokens.get('response', 0))
    before.append(total)
    if kind == 'preference':
      bias.append((tokens['chosen'], tokens['rejected']))
    reason = _first_failure(parts, tokens, total, response, kind, s)
    whole = '\n'.join(parts.values())
    if reason is None:
      digest = hashlib.sha1(normalised(whole).encode()).hexdigest()
      if digest in hashes:
        reason = ('exact_duplicate', f'same text as {hashes[digest]}')
      else:
        other, signature = near.find(whole)
        if other is not None:
          reason = ('near_duplicate', f'similar to {other}')
    if reason is None and index:
      span = overlap(whole, index, s.decontaminate_n)
      if span is not None:
        reason = ('contaminated', span)
    if reason is None:
      # Only kept rows are what later rows duplicate: a copy of a dropped
      # (contaminated) row is judged on its own, not as a copy of nothing kept.
      hashes[digest] = where
      near.add(where, signature)
      kept.append(i)
      after.append(total)
    else:
      reasons[i] = reason
  return Result(kept=kept, reasons=reasons, lengths_before=before, lengths_after=after,
                length_bias=_length_bias(bias, s.long_ratio))


def _first_failure(parts, tokens, total, response, kind, s: Settings):
  if total < s.min_tokens:
    return ('too_short', f'{total} tokens < {s.min_tokens}')
  if s.max_tokens and total > s.max_tokens:
    return ('too_long', f'{total} tokens > {s.max_tokens}')
  if kind != 'prompt' and (s.min_ratio or s.max_ratio):
    ratio = tokens[response] / max(tokens['prompt'], 1)
    if (s.min_ratio and ratio < s.min_ratio) or (s.max_ratio and ratio > s.max_ratio):
      return ('ratio', f'response/prompt tokens {ratio:.2f}')
  for name, text in parts.items():
    if (share := repeated_lines(text)) > s.max_repeated_lines:
      return ('repeated_lines', f'{name}: {share:.0%} of lines repeat')
    if (share := top_trigram(text)) > s.max_top_trigram:
      return ('repeated_ngrams', f'{name}: one 3-gram is {share:.0%} of them')
  if kind == 'preference' and normalised(parts['chosen']) == normalised(parts['rejected']):
    return ('same_after_normalising', 'chosen and rejected differ only in case or punctuation')
  return None


def _length_bias(pairs: list[tuple[int, int]], long_ratio: float) -> dict[str, float]:
  if not pairs:
    return {}
  chosen = [c for c, _ in pairs]
  rejected = [r for _, r in pairs]
  return {'pairs': len(pairs),
          'chosen_mean_tokens': sum(chosen) / len(pairs),
          'rejected_mean_tokens': sum(rejected) / len(pairs),
          'chosen_longer_fraction': sum(c > r for c, r in pairs) / len(pairs),
          f'chosen_over_{long_ratio:g}x_longer': sum(c > long_ratio * max(r, 1)
                                                     for c, r in pairs)}


def report(result: Result, raw_rows: list[dict], *, examples_per_reason: int = 3) -> dict[str, Any]:
  """Counts by reason, a few examples of each, length quantiles before/after."""
  counts = collections.Counter(reason for reason, _ in result.reasons.values())
  examples = collections.defaultdict(list)
  for i, (reason, detail) in sorted(result.reasons.items()):
    if len(examples[reason]) < examples_per_reason:
      row = raw_rows[i]
      examples[reason].append({'where': row.get(row_lib.WHERE_KEY, f'row {i}'),
                               'detail': detail[:300]})
  return {'rows_in': len(raw_rows), 'rows_kept': len(result.kept),
          'dropped': {r: counts[r] for r in REASONS if counts[r]},
          'examples': dict(examples), 'length_bias': result.length_bias,
          'tokens_before': _quantiles(result.lengths_before),
          'tokens_after': _quantiles(result.lengths_after)}


def _quantiles(values: list[int]) -> dict[str, float]:
  if not values:
    return {}
  ordered = sorted(values)
  pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)]
  return {'rows': len(values), 'mean': sum(values) / len(values), 'p50': pick(0.5),
          'p90': pick(0.9), 'max': ordered[-1]}
