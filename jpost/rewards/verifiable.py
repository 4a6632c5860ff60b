"""The verifiable rewards: 'math' (final answer equals the reference) and
'format' (the completion states one final answer in the expected style)."""

from __future__ import annotations

from jpost.rewards import answers, equivalence
from jpost.rewards.registry import Scored, register_factory

FORMAT_STYLES = ('any', 'boxed', 'hashes')


@register_factory('math', timeout=30.0)
def math_reward(*, answer_key: str = 'answer', fallback: str = 'last_number',
                verify_timeout: float = 5.0):
  """1.0 if the completion's final answer (`answers.extract_answer`) equals
  `row[answer_key]`, else 0.0 (also when no answer is found).

  Stats: 'accuracy' (same as the mean, over completions scored without
  failure) and 'no_answer' (fraction with no answer found). A math_verify
  check slower than `verify_timeout` seconds is a counted 'timeout'.
  """
  if fallback not in ('last_number', 'none'):
    raise ValueError(f"math reward: fallback={fallback!r}; use 'last_number' or 'none'.")
  if not verify_timeout > 0:
    raise ValueError(f'math reward: verify_timeout={verify_timeout} must be > 0 seconds.')
  equivalence.start_worker()  # loads math_verify in the background meanwhile

  def reward(prompt: str, completion: str, row) -> Scored:
    if answer_key not in row:
      raise KeyError(f'dataset row has no {answer_key!r} column (it has {sorted(row)}); '
                     "set the math reward's answer_key option.")
    pred = answers.extract_answer(completion, fallback=fallback)
    if pred is None:
      return Scored(0.0, {'accuracy': 0.0, 'no_answer': 1.0})
    correct = equivalence.is_equivalent(pred, str(row[answer_key]), timeout=verify_timeout)
    return Scored(float(correct), {'accuracy': float(correct), 'no_answer': 0.0})
  return reward


@register_factory('format')
def format_reward(*, style: str = 'any'):
  """1.0 if the completion holds exactly one final-answer marker, else 0.0.

  Markers are complete, non-empty `\\boxed{...}`/`\\fbox{...}` ('boxed') and
  `#### answer` with an answer on its line ('hashes'). style='boxed' or
  'hashes' counts only that kind and ignores the other; 'any' (the default,
  right for both GSM8K's '####' prompts and LaTeX '\\boxed' prompts) needs
  exactly one marker of either kind in total.
  """
  if style not in FORMAT_STYLES:
    raise ValueError(f'format reward: style={style!r}; use one of {FORMAT_STYLES}.')

  def reward(prompt: str, completion: str, row) -> float:
    boxes = sum(1 for box in answers.boxed_contents(completion) if box.strip())
    hashes = len(answers.hash_answers(completion))
    count = {'boxed': boxes, 'hashes': hashes, 'any': boxes + hashes}[style]
    return 1.0 if count == 1 else 0.0
  return reward
