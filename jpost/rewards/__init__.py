"""Rewards for online RL and evaluation: verifiers, code tests, rubric judges,
reward models; one fault-tolerant runner.

    fns = rewards.build({'math': {'weight': 1.0}, 'format': {'weight': 0.2}})
    result = rewards.score(fns, prompts, completions, rows)
    result.total, result.per_source, result.failures, result.metrics()

Built-in sources: 'math', 'format' (verifiable.py), 'code' (coding.py,
sandbox.py), 'rubric' (rubric.py, judges.py), 'reward_model', 'prm' (process.py:
a process reward model scoring each step).
"""

from jpost.rewards import coding, process, reward_model, rubric, verifiable  # noqa: F401  (register)
from jpost.rewards.answers import extract_answer
from jpost.rewards.equivalence import VerifyTimeout, is_equivalent
from jpost.rewards.judges import JudgeError, local_chat, openai_chat
from jpost.rewards.registry import (RewardFailure, Scored, Source, StepScored, build, names,
                                    register, register_factory, register_scorer, unregister)
from jpost.rewards.rubric import (AMAZON_SUMMARY_RUBRIC, RUBRICS, Criterion, Gate, JudgeSpec,
                                  RubricResult, RubricSpec, judge_rubric)
from jpost.rewards.runner import ScoreResult, score

__all__ = [
    'AMAZON_SUMMARY_RUBRIC', 'Criterion', 'Gate', 'JudgeError', 'JudgeSpec', 'RUBRICS',
    'RewardFailure', 'RubricResult', 'RubricSpec', 'ScoreResult', 'Scored', 'Source',
    'StepScored',
    'VerifyTimeout', 'build', 'extract_answer', 'is_equivalent', 'judge_rubric', 'local_chat',
    'names', 'openai_chat', 'register', 'register_factory', 'register_scorer', 'score',
    'unregister',
]
