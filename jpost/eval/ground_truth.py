"""Ground-truth accuracy: pass@k, maj@k and an accuracy report.

All functions are pure. Answer comparison is injected through `equivalent`
(default: string equality after `strip()`), so this module does not depend on
the verifiers; pass `jpost.rewards.is_equivalent` for maths answers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jpost.eval import intervals

DEFAULT_KS = (1, 4, 8, 16, 32, 64)


def _same_text(pred: str, gold: str) -> bool:
  return pred.strip() == gold.strip()


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al.).

  pass@k = 1 - C(n-c, k) / C(n, k), the chance that a random k-subset of the
  n samples holds at least one correct one. Computed as the product
  prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
  """
  for name, value in (('n', n), ('c', c), ('k', k)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f'pass_at_k: {name}={value!r} must be an int')
  if not 0 <= c <= n:
    raise ValueError(f'pass_at_k: need 0 <= c <= n (correct out of samples), '
                     f'got n={n}, c={c}')
  if not 1 <= k <= n:
    raise ValueError(f'pass_at_k: need 1 <= k <= n, got k={k}, n={n} (draw at '
                     'least k samples per problem, or report a smaller k)')
  if n - c < k:
    return 1.0  # every k-subset contains a correct sample
  i = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / i))


def maj_at_k(answers: Sequence[str | None], gold: str, k: int,
             equivalent: Callable[[str, str], bool] = _same_text) -> bool:
  """Whether the majority answer among the first `k` answers matches `gold`.

  `answers` are extracted final answers, None where extraction failed; None
  does not vote. Answers are grouped by `equivalent` (each answer joins the
  first earlier group whose first member it is equivalent to), the largest
  group wins, and a tie in size goes to the group that appeared first. No
  vote at all counts as wrong.
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'maj_at_k: k={k!r} must be an int >= 1')
  if k > len(answers):
    raise ValueError(f'maj_at_k: k={k} but only {len(answers)} answers were '
                     'given (sample at least k per problem)')
  heads: list[str] = []
  counts: list[int] = []
  for i, answer in enumerate(answers[:k]):
    if answer is None:
      continue
    if not isinstance(answer, str):
      raise TypeError(f'maj_at_k: answers[{i}] is a {type(answer).__name__}, '
                      'not a str or None (pass extracted answers)')
    for g, head in enumerate(heads):
      if equivalent(answer, head):
        counts[g] += 1
        break
    else:
      heads.append(answer)
      counts.append(1)
  if not heads:
    return False
  winner = heads[int(np.argmax(counts))]  # argmax keeps the first maximum
  return bool(equivalent(winner, gold))


def accuracy_report(samples: Sequence[Sequence[bool]],
                    ks: Sequence[int] = DEFAULT_KS, *,
                    alpha: float = 0.05) -> dict[str, float | int]:
  """Accuracy, pass@k and a Wilson interval from per-sample correctness.

  `samples[p][j]` says whether sample j of problem p was correct; problems may
  have different sample counts. Returns a flat dict (ready for a metrics
  writer):

    accuracy          mean over problems of the fraction of correct samples
                      (equals mean pass@1)
    accuracy_low/high Wilson (1-alpha) interval for accuracy, with the number
                      of problems as the sample size: samples of one problem
                      are correlated, so the problem count is the honest n
    pass@k            mean unbiased pass@k, for each k in `ks` no larger than
                      the smallest per-problem sample count
    num_problems, num_samples, min_samples_per_problem
  """
  if not samples:
    raise ValueError('accuracy_report: no problems given (samples is empty)')
  ns, cs = [], []
  for p, row in enumerate(samples):
    if len(row) == 0:
      raise ValueError(f'accuracy_report: problem {p} has no samples (every '
                       'problem needs at least one graded sample)')
    for j, ok in enumerate(row):
      if not isinstance(ok, (bool, np.bool_)):
        raise TypeError(f'accuracy_report: samples[{p}][{j}] is '
                        f'{ok!r}, not a bool (pass per-sample correctness)')
    ns.append(len(row))
    cs.append(int(sum(bool(ok) for ok in row)))
  for k in ks:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f'accuracy_report: ks={tuple(ks)!r} must hold ints >= 1')
  ns_a, cs_a = np.asarray(ns), np.asarray(cs)
  accuracy = float(np.mean(cs_a / ns_a))
  num_problems = len(ns)
  successes = min(float(np.sum(cs_a / ns_a)), float(num_problems))
  low, high = intervals.wilson_interval(successes, num_problems, alpha=alpha)
  report: dict[str, float | int] = {
      'accuracy': accuracy,
      'accuracy_low': low,
      'accuracy_high': high,
      'num_problems': num_problems,
      'num_samples': int(ns_a.sum()),
      'min_samples_per_problem': int(ns_a.min()),
  }
  for k in sorted(set(ks)):
    if k <= ns_a.min():
      report[f'pass@{k}'] = float(np.mean(
          [pass_at_k(n, c, k) for n, c in zip(ns, cs)]))
  return report
