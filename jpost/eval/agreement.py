"""Inter-rater agreement: Fleiss' kappa and Krippendorff's alpha (numpy only).

Both compare the observed agreement between raters with the agreement
expected by chance from how often each category (or value) is used overall:
1 is perfect agreement, 0 chance level, below 0 systematic disagreement.
Both are NaN when chance agreement is already perfect (every rating the
same), since there is then no disagreement left to explain.
"""

from __future__ import annotations

import collections
from typing import Hashable, Sequence

import numpy as np

LEVELS = ('nominal', 'interval')


def fleiss_kappa(table: np.ndarray | Sequence[Sequence[float]]) -> float:
  """Fleiss' kappa from a count table: table[i, j] = raters who put item i
  in category j.

  kappa = (P_bar - P_e) / (1 - P_e) with, per item, the fraction of agreeing
  rater pairs P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)), P_bar their
  mean, p_j = share of all ratings in category j and P_e = sum_j p_j^2. The
  classic definition has the same n_i for every item; this one also accepts
  items rated by different numbers of raters (each needs at least 2).
  """
  counts = np.asarray(table, dtype=np.float64)
  if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
    raise ValueError(f'fleiss_kappa: table has shape {counts.shape}; give a 2-D '
                     '[items, categories] table of counts')
  if np.any(counts < 0) or np.any(counts != np.round(counts)):
    raise ValueError('fleiss_kappa: counts must be whole numbers >= 0')
  per_item = counts.sum(axis=1)
  if np.any(per_item < 2):
    bad = int(np.flatnonzero(per_item < 2)[0])
    raise ValueError(f'fleiss_kappa: item {bad} has {int(per_item[bad])} '
                     'ratings; every item needs at least 2 (drop items rated '
                     'once)')
  p_item = (counts * (counts - 1)).sum(axis=1) / (per_item * (per_item - 1))
  p_bar = p_item.mean()
  p_cat = counts.sum(axis=0) / per_item.sum()
  p_e = float(np.sum(p_cat ** 2))
  if p_e >= 1.0:
    return float('nan')
  return float((p_bar - p_e) / (1.0 - p_e))


def count_table(votes_by_item: Sequence[Sequence[Hashable]],
                categories: Sequence[Hashable]) -> np.ndarray:
  """[items, categories] counts from each item's list of votes."""
  index = {c: j for j, c in enumerate(categories)}
  table = np.zeros((len(votes_by_item), len(categories)))
  for i, votes in enumerate(votes_by_item):
    for v in votes:
      if v not in index:
        raise ValueError(f'count_table: item {i} has vote {v!r}, not one of '
                         f'{tuple(categories)}')
      table[i, index[v]] += 1
  return table


def krippendorff_alpha(values_by_item: Sequence[Sequence[Hashable]], *,
                       level: str = 'nominal') -> float:
  """Krippendorff's alpha from each item's ratings (any number per item).

  alpha = 1 - (n - 1) * D_o / D_e where, over items with at least 2 ratings
  (n ratings in all), D_o = sum over items of the summed distance between
  ordered pairs of its ratings divided by (m_u - 1), and D_e = the summed
  distance between ordered pairs of all n ratings pooled. Distance is
  [a != b] for level='nominal' and (a - b)^2 for 'interval' (Likert scores).
  """
  if level not in LEVELS:
    raise ValueError(f'krippendorff_alpha: level={level!r} is not one of '
                     f'{LEVELS}')
  units = [list(v) for v in values_by_item if len(v) >= 2]
  if not units:
    raise ValueError('krippendorff_alpha: no item has 2 or more ratings, so '
                     'there is no agreement to measure')
  pooled = [x for unit in units for x in unit]
  n = len(pooled)

  def pair_distance(xs: list) -> float:
    # Sum over ordered pairs i != j of the distance between xs[i] and xs[j].
    m = len(xs)
    if level == 'nominal':
      freq = collections.Counter(xs).values()
      return float(m * m - sum(f * f for f in freq))
    v = np.asarray(xs, dtype=np.float64)
    return float(2 * m * np.sum(v * v) - 2 * np.sum(v) ** 2)

  observed = sum(pair_distance(u) / (len(u) - 1) for u in units)
  expected = pair_distance(pooled)
  if expected == 0:
    return float('nan')
  return float(1.0 - (n - 1) * observed / expected)
