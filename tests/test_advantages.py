"""Advantage estimators against numpy and hand-computed values, under jax.jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jpost import advantages

REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0], np.float32)


@pytest.mark.parametrize('scale', ['std', 'none'])
def test_group_advantages_against_numpy(scale):
  out = jax.jit(functools.partial(advantages.group_advantages, scale=scale),
                static_argnums=1)(REWARDS, 4)
  chex.assert_shape(out, (12,))
  groups = REWARDS.reshape(3, 4)
  expected = groups - groups.mean(1, keepdims=True)
  if scale == 'std':
    expected = expected / (groups.std(1, keepdims=True) + 1e-6)  # population std, ddof=0
  np.testing.assert_allclose(out, expected.reshape(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[4:8], 0.0)  # an all-equal group has no signal


def test_group_advantages_hand_computed():
  # Group [1, 0, 0, 1]: mean 0.5, population std 0.5 -> [1, -1, -1, 1].
  out = jax.jit(advantages.group_advantages, static_argnums=1)(REWARDS[:4], 4)
  np.testing.assert_allclose(out, [1.0, -1.0, -1.0, 1.0], rtol=1e-5)


def test_zero_variance_groups():
  out = jax.jit(advantages.zero_variance_groups, static_argnums=1)(REWARDS, 4)
  assert out.dtype == jnp.bool_
  np.testing.assert_array_equal(out, [False] * 4 + [True] * 4 + [False] * 4)
  np.testing.assert_array_equal(advantages.zero_variance_groups(REWARDS, 2),
                                [False] * 4 + [True] * 4 + [False] * 4)  # [1, 0], [0, 1], ...


def test_rloo_advantages():
  out = jax.jit(advantages.rloo_advantages, static_argnums=1)(REWARDS, 4)
  # Group [1, 0, 0, 1]: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - (1 + 0 + 1) / 3 = -2/3.
  np.testing.assert_allclose(out[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
  groups = REWARDS.reshape(3, 4)
  others = (groups.sum(1, keepdims=True) - groups) / 3
  np.testing.assert_allclose(out, (groups - others).reshape(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('fn', [advantages.group_advantages, advantages.zero_variance_groups,
                                advantages.rloo_advantages])
def test_groups_must_divide_the_batch(fn):
  with pytest.raises(ValueError, match='do not split into groups of 5'):
    fn(REWARDS, 5)


def test_bad_scale_and_rloo_group_of_one():
  with pytest.raises(ValueError, match="scale 'mad' unknown"):
    advantages.group_advantages(REWARDS, 4, scale='mad')
  with pytest.raises(ValueError, match='group_size >= 2'):
    advantages.rloo_advantages(REWARDS, 1)


# GAE, gamma 0.9, lam 0.8 (gamma * lam = 0.72).
# Row 0, four valid tokens: r = [0, 0.5, 0, 1], V = [0.5, 0.6, 0.7, 0.8].
#   delta_3 = 1 + 0 - 0.8 = 0.2                 A_3 = 0.2
#   delta_2 = 0 + 0.9 * 0.8 - 0.7 = 0.02        A_2 = 0.02 + 0.72 * 0.2 = 0.164
#   delta_1 = 0.5 + 0.9 * 0.7 - 0.6 = 0.53      A_1 = 0.53 + 0.72 * 0.164 = 0.64808
#   delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04        A_0 = 0.04 + 0.72 * 0.64808 = 0.5066176
#   returns = A + V = [1.0066176, 1.24808, 0.864, 1.0]
# Row 1, two valid tokens then padding (junk there is never read):
#   r = [0, 1], V = [0.5, 0.4]; delta_1 = 1 - 0.4 = 0.6 (no bootstrap past the end).
#   A_1 = 0.6; A_0 = (0.9 * 0.4 - 0.5) + 0.72 * 0.6 = 0.292; returns = [0.792, 1.0].

GAE_REWARDS = np.array([[0.0, 0.5, 0.0, 1.0], [0.0, 1.0, 9.0, 9.0]], np.float32)
GAE_VALUES = np.array([[0.5, 0.6, 0.7, 0.8], [0.5, 0.4, 7.0, 7.0]], np.float32)
GAE_MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)

_gae = jax.jit(functools.partial(advantages.gae, gamma=0.9, lam=0.8))


def test_gae_hand_computed_with_trailing_padding():
  adv, ret = _gae(GAE_REWARDS, GAE_VALUES, GAE_MASK)
  chex.assert_shape((adv, ret), (2, 4))
  np.testing.assert_allclose(adv, [[0.5066176, 0.64808, 0.164, 0.2], [0.292, 0.6, 0.0, 0.0]],
                             rtol=1e-5)
  np.testing.assert_allclose(ret, [[1.0066176, 1.24808, 0.864, 1.0], [0.792, 1.0, 0.0, 0.0]],
                             rtol=1e-5)


def test_gae_gap_ends_the_episode():
  # A masked token inside a row: the run before it is its own episode.
  mask = np.array([[1, 1, 0, 1]], np.float32)
  adv, _ = _gae(GAE_REWARDS[:1], GAE_VALUES[:1], mask)
  # Token 1 no longer bootstraps: delta_1 = 0.5 - 0.6 = -0.1; A_0 = 0.04 + 0.72 * -0.1.
  np.testing.assert_allclose(adv, [[0.04 - 0.072, -0.1, 0.0, 0.2]], rtol=1e-5, atol=1e-7)


def test_gae_monte_carlo_limit():
  # gamma = lam = 1: A_t = (sum of rewards from t) - V_t.
  adv, ret = jax.jit(functools.partial(advantages.gae, gamma=1.0, lam=1.0))(
      GAE_REWARDS[:1], GAE_VALUES[:1], GAE_MASK[:1])
  np.testing.assert_allclose(ret, [[1.5, 1.5, 1.0, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(adv, [[1.0, 0.9, 0.3, 0.2]], rtol=1e-5)


def test_gae_grads_wrt_values():
  f = jax.jit(lambda v: jnp.sum(jnp.square(_gae(GAE_REWARDS, v, GAE_MASK)[0])))
  check_grads(f, (jnp.asarray(GAE_VALUES),), order=1, modes=['rev'], eps=1e-2)
  # Values on padding never matter.
  assert jax.jit(jax.grad(f))(jnp.asarray(GAE_VALUES))[1, 2:].tolist() == [0.0, 0.0]


def test_gae_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='same \\[B, T\\]'):
    advantages.gae(GAE_REWARDS, GAE_VALUES[:, :3], GAE_MASK)
