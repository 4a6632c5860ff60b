"""Best-of-n reranking: keep the sample a scorer likes best, and measure it.

For each prompt with n sampled answers, a scorer (a process reward model
with an aggregate, an outcome reward model) picks one; its accuracy sits
between a random pick (the mean sampled accuracy) and pass@n (some sample is
right: the ceiling any reranker can reach), next to majority vote.
"""

from __future__ import annotations

import numpy as np

from jpost.rewards.process import aggregate, split_steps


def best_of_n(scores, correct) -> float:
  """Accuracy of the highest-scored sample per prompt ([P, n] each). Tied
  best samples share the pick (the expected accuracy of breaking the tie at
  random), so a scorer that cannot tell samples apart scores like a random
  pick; a NaN score never wins unless every score of the prompt is NaN."""
  scores = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
  correct = np.asarray(correct, np.float64)
  best = scores == scores.max(axis=1, keepdims=True)
  return float(np.mean((best * correct).sum(axis=1) / best.sum(axis=1)))


def prm_scores(step_scorer, prompts: list[str], samples: list[list[str]], aggregates,
               separator: str = '\n') -> dict[str, np.ndarray]:
  """{aggregate: [P, n] scores} of every sample by a PRM's step scores; a
  sample with no steps scores NaN (never picked over one with steps)."""
  p, n = len(samples), len(samples[0]) if samples else 0
  flat_prompts, flat_steps, where = [], [], []
  for i, (prompt, texts) in enumerate(zip(prompts, samples)):
    for j, text in enumerate(texts):
      steps, _ = split_steps(text, separator)
      if steps:
        flat_prompts.append(prompt)
        flat_steps.append(steps)
        where.append((i, j))
  step_scores = step_scorer(flat_prompts, flat_steps) if flat_steps else []
  out = {how: np.full((p, n), np.nan) for how in aggregates}
  for (i, j), scores in zip(where, step_scores):
    for how in aggregates:
      out[how][i, j] = aggregate(scores, how) if len(scores) else np.nan
  return out


def outcome_scores(scorer, prompts: list[str], samples: list[list[str]]) -> np.ndarray:
  """[P, n] scores of every sample by an outcome reward model
  (`scorer(prompts, completions) -> [N]`)."""
  n = len(samples[0]) if samples else 0
  flat = scorer([p for p in prompts for _ in range(n)], [t for ts in samples for t in ts])
  return np.asarray(flat, np.float64).reshape(len(samples), n)
