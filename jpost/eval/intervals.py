"""Confidence intervals shared by the evaluation modules (numpy only).

`wilson_interval` is the score interval for a binomial proportion: unlike the
normal (Wald) interval it stays inside [0, 1] and keeps close to its nominal
coverage for small samples and for proportions near 0 or 1, which is where
evaluation numbers often sit (a strong model's accuracy, a lopsided win rate).
"""

from __future__ import annotations

import math

import numpy as np

# Two-sided 95% standard normal quantile, Phi^-1(0.975).
Z95 = 1.959963984540054


def normal_quantile(p: float) -> float:
  """Phi^-1(p) for 0 < p < 1, by bisection on math.erfc (to ~1e-15)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f'normal_quantile: p={p!r} must lie strictly between 0 '
                     'and 1 (e.g. 0.975 for a two-sided 95% interval)')
  low, high = -40.0, 40.0
  for _ in range(200):
    mid = 0.5 * (low + high)
    if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
      low = mid
    else:
      high = mid
    if high - low < 1e-15:
      break
  return 0.5 * (low + high)


def wilson_interval(successes: float, n: float, *,
                    alpha: float = 0.05) -> tuple[float, float]:
  """The Wilson score interval (low, high) for `successes` out of `n` trials.

  `successes` may be fractional (a tie counted as half a win). `n == 0` gives
  the uninformative (0.0, 1.0).
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f'wilson_interval: alpha={alpha!r} must lie in (0, 1) '
                     '(0.05 for a 95% interval)')
  if n < 0 or not 0 <= successes <= n:
    raise ValueError(f'wilson_interval: need 0 <= successes <= n, got '
                     f'successes={successes!r}, n={n!r}')
  if n == 0:
    return 0.0, 1.0
  z = Z95 if alpha == 0.05 else normal_quantile(1 - alpha / 2)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def percentile_interval(values: np.ndarray, *, alpha: float = 0.05,
                        axis: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                np.ndarray]:
  """(low, median, high) percentiles of bootstrap replicates along `axis`."""
  if not 0.0 < alpha < 1.0:
    raise ValueError(f'percentile_interval: alpha={alpha!r} must lie in (0, 1)'
                     ' (0.05 for a 95% interval)')
  low, mid, high = np.quantile(values, [alpha / 2, 0.5, 1 - alpha / 2],
                               axis=axis)
  return low, mid, high
