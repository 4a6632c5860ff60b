"""Leaderboards from a battle log: Bradley-Terry ratings, bootstrap intervals,
online Elo.

Bradley-Terry: model i beats j with probability s_i / (s_i + s_j). We fit the
log-strengths theta by maximum likelihood with Newton's method (with a
backtracking line search, so every step raises the penalised likelihood) and
report them on the Elo scale like Chatbot Arena:

    rating = scale * log_base(s) + init_rating = scale * theta / ln(base) + init

so with the defaults a 400-point gap means 10:1 odds. A tie or a both_bad
counts as half a win for each side (its likelihood term is
0.5 log p_ij + 0.5 log p_ji). A small L2 penalty 0.5 * l2 * |theta|^2 keeps
the fit finite when a model won or lost every battle; it also centres theta.
Without an anchor the ratings average to `init_rating`; with `anchor='m'`
model m is pinned at `init_rating` and the others are relative to it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from jpost.eval import battles as battles_lib
from jpost.eval import intervals
from jpost.eval import pairwise


def _objective(theta, wins, games, l2):
  diff = theta[:, None] - theta[None, :]
  log_p = -np.logaddexp(0.0, -diff)  # log sigmoid(theta_i - theta_j)
  return float(np.sum(wins * log_p) - 0.5 * l2 * theta @ theta)


def fit_log_strengths(wins: np.ndarray, games: np.ndarray, *, l2: float,
                      tol: float = 1e-9, max_iter: int = 200) -> np.ndarray:
  """Maximum-likelihood BT log-strengths (natural log, mean zero).

  `wins[i, j]`: i's (possibly fractional, possibly weighted) score against j;
  `games[i, j] = wins[i, j] + wins[j, i]`. Newton's method on the concave
  penalised log-likelihood; stops when the largest step is below `tol`.
  """
  m = wins.shape[0]
  theta = np.zeros(m)
  value = _objective(theta, wins, games, l2)
  # The likelihood is flat along theta + c and the penalty is least at
  # mean(theta) = 0, so theta stays centred: adding 11^T/m to the negated
  # Hessian makes it invertible along that direction, and steps are
  # projected onto mean zero (otherwise rounding noise divided by a tiny l2
  # would keep moving the mean).
  flat = np.full((m, m), 1.0 / m)
  for _ in range(max_iter):
    p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))
    grad = np.sum(wins - games * p, axis=1) - l2 * theta
    curv = games * p * (1.0 - p)
    neg_hess = np.diag(curv.sum(axis=1) + l2) - curv + flat
    try:
      step = np.linalg.solve(neg_hess, grad)
    except np.linalg.LinAlgError:
      step = np.full(m, np.nan)
    if not np.all(np.isfinite(step)):
      raise RuntimeError(
          'Bradley-Terry fit diverged (the likelihood has no finite maximum: '
          'a group of models won or lost every battle against the rest); '
          'use l2 > 0')
    step -= step.mean()
    t = 1.0
    while True:
      candidate = theta + t * step
      new_value = _objective(candidate, wins, games, l2)
      if new_value >= value - 1e-12 * abs(value) or t < 1e-10:
        break
      t *= 0.5
    theta, value = candidate, new_value
    if np.max(np.abs(t * step)) < tol:
      return theta
  raise RuntimeError(
      f'Bradley-Terry fit did not converge in {max_iter} Newton steps (last '
      f'step {np.max(np.abs(t * step)):.3g}); a model that won or lost every '
      'battle has no finite rating without a penalty: use l2 > 0')


def _components(games: np.ndarray, models: Sequence[str]) -> list[list[str]]:
  seen, groups = set(), []
  for start in range(len(models)):
    if start in seen:
      continue
    group, stack = [], [start]
    seen.add(start)
    while stack:
      i = stack.pop()
      group.append(models[i])
      for j in np.flatnonzero(games[i] > 0):
        if int(j) not in seen:
          seen.add(int(j))
          stack.append(int(j))
    groups.append(sorted(group))
  return groups


def _check_connected(games: np.ndarray, models: Sequence[str]) -> None:
  groups = _components(games, models)
  if len(groups) > 1:
    raise ValueError(
        f'the battle log splits into groups that never met: {groups}; '
        'ratings across groups are not comparable (add battles between '
        'them or rate each group on its own)')


def _reachable(adjacent: np.ndarray, start: int) -> set[int]:
  seen, stack = {start}, [start]
  while stack:
    for j in np.flatnonzero(adjacent[stack.pop()]):
      if int(j) not in seen:
        seen.add(int(j))
        stack.append(int(j))
  return seen


def _check_finite_mle(wins: np.ndarray, models: Sequence[str]) -> None:
  """Without a penalty the MLE is finite only if every model can reach
  every other along 'scored against' edges (Zermelo's condition)."""
  beat = wins > 0
  m = len(models)
  if len(_reachable(beat, 0)) == m and len(_reachable(beat.T, 0)) == m:
    return
  one_sided = [models[i] for i in range(m)
               if not beat[i].any() or not beat[:, i].any()]
  detail = (f'models that never won or never lost: {one_sided}' if one_sided
            else 'a group of models won every battle against the rest')
  raise ValueError(f'with l2=0 some ratings are infinite ({detail}); use '
                   'l2 > 0 (e.g. the default 1e-6) or collect more battles')


def _check_args(log: battles_lib.Encoded, anchor, scale, base, l2) -> None:
  if anchor is not None and anchor not in log.models:
    raise ValueError(f'anchor={anchor!r} is not one of the rated models '
                     f'{log.models}')
  if not scale > 0:
    raise ValueError(f'scale={scale!r} must be > 0 (400 for the Elo scale)')
  if not base > 1:
    raise ValueError(f'base={base!r} must be > 1 (10 for the Elo scale)')
  if not l2 >= 0:
    raise ValueError(f'l2={l2!r} must be >= 0')


def _to_ratings(theta: np.ndarray, models: Sequence[str], anchor, scale, base,
                init_rating) -> np.ndarray:
  ratings = scale * theta / math.log(base)
  if anchor is not None:
    ratings = ratings - ratings[list(models).index(anchor)]
  return ratings + init_rating


def bradley_terry(battles: Sequence[dict[str, Any]], *,
                  models: Sequence[str] | None = None,
                  anchor: str | None = None, scale: float = 400.0,
                  base: float = 10.0, init_rating: float = 1000.0,
                  l2: float = 1e-6) -> dict[str, float]:
  """Bradley-Terry ratings {model: rating} on the Elo scale (see module doc).

  Raises ValueError for an invalid battle log (see battles.encode), when
  the models split into groups that never battled each other (their
  relative ratings would be set by the penalty alone, not by data), and,
  with l2=0, when some rating would be infinite (a model that never lost).
  """
  log = battles_lib.encode(battles, models=models)
  _check_args(log, anchor, scale, base, l2)
  wins, games = battles_lib.score_matrix(log)
  _check_connected(games, log.models)
  if l2 == 0:
    _check_finite_mle(wins, log.models)
  theta = fit_log_strengths(wins, games, l2=l2)
  ratings = _to_ratings(theta, log.models, anchor, scale, base, init_rating)
  return {name: float(r) for name, r in zip(log.models, ratings)}


def _bootstrap(log: battles_lib.Encoded, *, rounds, seed, anchor, scale, base,
               init_rating, l2) -> np.ndarray:
  """[rounds, m] ratings refitted on battle logs resampled with replacement."""
  m, n = len(log.models), log.num_battles
  forward = log.a * m + log.b
  backward = log.b * m + log.a
  rng = np.random.default_rng(seed)
  out = np.empty((rounds, m))
  for r in range(rounds):
    weight = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
    wins = (np.bincount(forward, weight * log.score_a, m * m)
            + np.bincount(backward, weight * (1.0 - log.score_a), m * m))
    wins = wins.reshape(m, m)
    games = wins + wins.T
    theta = fit_log_strengths(wins, games, l2=l2)
    out[r] = _to_ratings(theta, log.models, anchor, scale, base, init_rating)
  return out


def bootstrap_intervals(battles: Sequence[dict[str, Any]], *,
                        rounds: int = 200, seed: int = 0, alpha: float = 0.05,
                        models: Sequence[str] | None = None,
                        anchor: str | None = None, scale: float = 400.0,
                        base: float = 10.0, init_rating: float = 1000.0,
                        l2: float = 1e-6
                        ) -> dict[str, tuple[float, float, float]]:
  """{model: (low, median, high)} percentile bootstrap of the BT ratings.

  Each round resamples the battles with replacement (same count) and refits;
  low/high are the alpha/2 and 1 - alpha/2 quantiles over rounds. With an
  anchor the anchor's interval is a point (it is pinned) and the others are
  intervals of the difference to it. Keep l2 > 0 here: a resampled log can
  leave a model undefeated, which has no finite rating without the penalty.
  """
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
    raise ValueError(f'rounds={rounds!r} must be an int >= 2 (200 or more for '
                     'stable 95% intervals)')
  log = battles_lib.encode(battles, models=models)
  _check_args(log, anchor, scale, base, l2)
  if l2 == 0:
    raise ValueError('bootstrap intervals need l2 > 0: a resampled log can leave a model '
                     'undefeated, which has no finite rating without the penalty')
  # A model that never played would get a confident interval at the prior's rating.
  _check_connected(battles_lib.score_matrix(log)[1], log.models)
  reps = _bootstrap(log, rounds=rounds, seed=seed, anchor=anchor, scale=scale,
                    base=base, init_rating=init_rating, l2=l2)
  low, mid, high = intervals.percentile_interval(reps, alpha=alpha)
  return {name: (float(low[j]), float(mid[j]), float(high[j]))
          for j, name in enumerate(log.models)}


def online_elo(battles: Sequence[dict[str, Any]], *, k: float = 4.0,
               models: Sequence[str] | None = None, scale: float = 400.0,
               base: float = 10.0,
               init_rating: float = 1000.0) -> dict[str, float]:
  """Sequential Elo over the log in order: after each battle
  r_a += k (S_a - E_a), r_b -= k (S_a - E_a) with
  E_a = 1 / (1 + base^((r_b - r_a) / scale)) and S_a = 1, 0 or 0.5 (tie,
  both_bad). Order-dependent and noisier than bradley_terry; kept as a
  secondary view (e.g. to watch ratings drift over time)."""
  if not k > 0:
    raise ValueError(f'online_elo: k={k!r} must be > 0 (4 is a common choice '
                     'for large logs)')
  log = battles_lib.encode(battles, models=models)
  _check_args(log, None, scale, base, 0.0)
  ratings = np.full(len(log.models), float(init_rating))
  for a, b, s in zip(log.a, log.b, log.score_a):
    expected = 1.0 / (1.0 + base ** ((ratings[b] - ratings[a]) / scale))
    delta = k * (s - expected)
    ratings[a] += delta
    ratings[b] -= delta
  return {name: float(r) for name, r in zip(log.models, ratings)}


def leaderboard(battles: Sequence[dict[str, Any]], *,
                models: Sequence[str] | None = None,
                anchor: str | None = None, rounds: int = 200, seed: int = 0,
                alpha: float = 0.05, scale: float = 400.0, base: float = 10.0,
                init_rating: float = 1000.0,
                l2: float = 1e-6) -> list[dict[str, Any]]:
  """Rows {rank, model, rating, low, high, battles, win_rate}, best first.

  rating is the Bradley-Terry fit on the whole log; low/high its bootstrap
  (1 - alpha) interval; win_rate counts ties half (pairwise.win_rates).
  rank is Chatbot Arena's: 1 + the number of models whose interval lies
  wholly above this one's (low above this high), so models that cannot be
  told apart share a rank. With an anchor, the anchor's interval is a point
  and the others' are intervals of their difference to it, so a model is
  ranked below the anchor as soon as its interval lies below the anchor's
  rating.
  """
  if l2 == 0:
    raise ValueError('leaderboard: l2 must be > 0 for its bootstrap intervals (a resampled '
                     'log can leave a model undefeated); use bradley_terry for l2=0 ratings')
  ratings = bradley_terry(battles, models=models, anchor=anchor, scale=scale,
                          base=base, init_rating=init_rating, l2=l2)
  spans = bootstrap_intervals(battles, rounds=rounds, seed=seed, alpha=alpha,
                              models=models, anchor=anchor, scale=scale,
                              base=base, init_rating=init_rating, l2=l2)
  rates = pairwise.win_rates(battles, models=models)
  order = sorted(ratings, key=lambda name: (-ratings[name], name))
  rows = []
  for name in order:
    low, _, high = spans[name]
    better = sum(1 for other in order if spans[other][0] > high)
    rows.append({'rank': 1 + better, 'model': name, 'rating': ratings[name],
                 'low': low, 'high': high,
                 'battles': rates[name]['battles'],
                 'win_rate': rates[name]['win_rate']})
  return rows
