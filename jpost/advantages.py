"""Advantage estimators (pure, jit-able): group-relative, leave-one-out, GAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALES = ('std', 'none')


def _groups(rewards, group_size):
  """rewards [N] -> [N // G, G] (groups are contiguous rows), as float32."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f'rewards must be [N] (one per completion); got shape {rewards.shape}.')
  if not (isinstance(group_size, int) and group_size >= 1):
    raise ValueError(f'group_size must be a positive int; got {group_size!r}.')
  if rewards.shape[0] % group_size:
    raise ValueError(f'{rewards.shape[0]} rewards do not split into groups of {group_size}; '
                     'the batch must hold whole groups (completions per prompt).')
  return rewards.reshape(-1, group_size)


def group_advantages(rewards, group_size, *, scale: str = 'std', eps: float = 1e-6):
  """Group-relative advantages [N] (GRPO). Rows i*G .. i*G+G-1 form group i.

  advantage = r - mean of its group. scale='std' divides by (group std + eps),
  with the population std (numpy ddof=0), as GRPO does; scale='none' keeps the
  raw difference (Dr. GRPO: dividing by the std up-weights groups that are
  nearly all right or all wrong). A group whose rewards are all equal gets
  advantage 0 either way (see `zero_variance_groups` to drop such groups).
  """
  if scale not in SCALES:
    raise ValueError(f'scale {scale!r} unknown; use one of {SCALES}.')
  r = _groups(rewards, group_size)
  centered = r - jnp.mean(r, axis=1, keepdims=True)
  if scale == 'std':
    centered = centered / (jnp.std(r, axis=1, keepdims=True) + eps)
  return centered.reshape(-1)


def zero_variance_groups(rewards, group_size):
  """bool [N]: True on every row whose group's rewards are all equal (no learning
  signal; DAPO's dynamic sampling drops these groups)."""
  r = _groups(rewards, group_size)
  flat = jnp.max(r, axis=1) == jnp.min(r, axis=1)
  return jnp.repeat(flat, group_size)


def rloo_advantages(rewards, group_size):
  """REINFORCE leave-one-out [N]: r_i - mean of the other G - 1 rewards of its group."""
  if isinstance(group_size, int) and group_size < 2:
    raise ValueError(f'rloo_advantages needs group_size >= 2 (a baseline from the other '
                     f'completions); got {group_size}.')
  r = _groups(rewards, group_size)
  others = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
  return (r - others).reshape(-1)


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
  """Generalised advantage estimation over tokens. Returns (advantages, returns), [B, T].

  rewards, values, mask: [B, T]; mask is 1 on valid completion tokens. With
  m the mask and the value after the last valid token taken as 0:
    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    returns = A + V
  Both outputs are 0 where mask is 0, and rewards or values there are never
  read. The recursion stops at every masked token: with a gap inside a row,
  each run of valid tokens is its own episode with no bootstrapping across the
  gap (right for our layout, a contiguous completion then padding; not for
  multi-turn rows whose tool outputs are masked out).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  if rewards.ndim != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
    raise ValueError(f'rewards, values and mask must be the same [B, T]; got {rewards.shape}, '
                     f'{values.shape}, {mask.shape}.')
  valid = mask > 0
  m = valid.astype(jnp.float32)
  rewards = jnp.where(valid, rewards, 0.0)
  values = jnp.where(valid, values, 0.0)
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))  # already 0 where masked
  next_mask = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
  deltas = rewards + gamma * next_values - values

  def step(next_advantage, xs):
    delta_b, continues_b = xs
    advantage = delta_b + gamma * lam * continues_b * next_advantage
    return advantage, advantage

  _, advantages_tb = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32),
                                  (deltas.T, next_mask.T), reverse=True)
  advantages = jnp.where(valid, advantages_tb.T, 0.0)
  returns = jnp.where(valid, advantages + values, 0.0)
  return advantages, returns
