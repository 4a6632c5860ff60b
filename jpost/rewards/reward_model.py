"""The 'reward_model' source: a trained scalar reward model scores the batch."""

from __future__ import annotations

from jpost.rewards.registry import register_factory


@register_factory('reward_model', batched=True, timeout=600.0)
def reward_model(*, path: str, max_len: int = 1024):
  """`jpost.models.reward.load_scorer(path)`: scorer(prompts, completions) ->
  np.ndarray [N]; loaded once when the rewards are built. A prompt and
  completion longer than `max_len` tokens keep their last max_len."""
  from jpost.models import reward  # lazy: loading a model pulls in JAX
  return reward.load_scorer(path, max_len=max_len)
