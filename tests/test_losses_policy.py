"""KL estimators, whitening, clipped policy and value losses: hand-computed values
and gradients, under jax.jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jpost import ops
from jpost.losses.policy import AGGREGATIONS, policy_loss, value_loss


# KL estimators, proved by exact enumeration over a 5-token categorical.

THETA = jnp.array([0.3, -1.2, 0.8, 0.0, -0.4])  # policy logits (the parameters)
REF_LOGITS = jnp.array([-0.5, 0.4, 0.9, -1.0, 0.2])


@functools.partial(jax.jit, static_argnums=0)
def _expected_loss_gradient(estimator):
  """sum_x pi(x) * grad_theta estimator(x), with the sampled token x held fixed:
  the gradient a trainer gets in expectation when the estimate is in its loss."""
  pi = jax.nn.softmax(THETA)
  ref_logp = jax.nn.log_softmax(REF_LOGITS)

  def estimate_of_token(theta, x):
    return ops.kl_estimate(jax.nn.log_softmax(theta)[x], ref_logp[x], estimator)

  per_token_grads = jax.vmap(jax.grad(estimate_of_token), in_axes=(None, 0))(THETA, jnp.arange(5))
  return jnp.einsum('x,xv->v', pi, per_token_grads)


def _reverse_kl(theta):  # KL(pi || ref)
  logp, ref_logp = jax.nn.log_softmax(theta), jax.nn.log_softmax(REF_LOGITS)
  return jnp.sum(jnp.exp(logp) * (logp - ref_logp))


def _forward_kl(theta):  # KL(ref || pi)
  logp, ref_logp = jax.nn.log_softmax(theta), jax.nn.log_softmax(REF_LOGITS)
  return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp))


def test_kl_estimator_gradients_by_enumeration():
  reverse = jax.grad(_reverse_kl)(THETA)
  forward = jax.grad(_forward_kl)(THETA)
  assert np.abs(reverse - forward).max() > 0.05  # the two KLs differ here
  # k2 in the loss: exactly the gradient of KL(pi || ref).
  np.testing.assert_allclose(_expected_loss_gradient('k2'), reverse, atol=1e-6)
  # k1 in the loss: zero expected gradient (E_pi[grad log pi] = 0).
  np.testing.assert_allclose(_expected_loss_gradient('k1'), 0.0, atol=1e-6)
  # k3 in the loss: the gradient of the forward KL(ref || pi), not the reverse one.
  k3 = _expected_loss_gradient('k3')
  np.testing.assert_allclose(k3, forward, atol=1e-6)
  assert np.abs(k3 - reverse).max() > 0.05


def test_kl_estimator_values_by_enumeration():
  pi = jax.nn.softmax(THETA)
  logp, ref_logp = jax.nn.log_softmax(THETA), jax.nn.log_softmax(REF_LOGITS)
  kl = _reverse_kl(THETA)
  expect = {e: jnp.sum(pi * ops.kl_estimate(logp, ref_logp, e)) for e in ops.KL_ESTIMATORS}
  np.testing.assert_allclose(expect['k1'], kl, rtol=1e-6)
  np.testing.assert_allclose(expect['k3'], kl, rtol=1e-6)
  assert abs(expect['k2'] - kl) > 1e-3  # k2's value is biased (here by about 2%)
  assert (ops.kl_estimate(logp, ref_logp, 'k3') >= 0).all()


def test_kl_estimate_hand_computed():
  logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])  # log_ratio = [-0.5, 1]
  f = jax.jit(ops.kl_estimate, static_argnums=2)
  np.testing.assert_allclose(f(logp, ref, 'k1'), [0.5, -1.0])
  np.testing.assert_allclose(f(logp, ref, 'k2'), [0.125, 0.5])
  np.testing.assert_allclose(f(logp, ref, 'k3'), [np.exp(-0.5) - 0.5, np.e - 2.0], rtol=1e-6)
  with pytest.raises(ValueError, match="KL estimator 'k4' unknown"):
    ops.kl_estimate(logp, ref, 'k4')


def test_whiten_masked_against_numpy():
  x = np.array([[1.0, 2.0, np.inf], [4.0, -1.0, np.nan]], np.float32)  # padding is junk
  mask = np.array([[1, 1, 0], [1, 1, 0]])
  valid = x[mask == 1]
  out = jax.jit(ops.whiten)(x, mask)
  expected = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
  np.testing.assert_allclose(np.asarray(out)[mask == 1], expected, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out)[mask == 0], 0.0)
  kept = jax.jit(functools.partial(ops.whiten, shift_mean=False))(x, mask)
  np.testing.assert_allclose(np.asarray(kept)[mask == 1], expected + valid.mean(), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(kept)[mask == 0], 0.0)


def test_token_entropy_aligned_with_token_logprobs():
  logits = jnp.log(jnp.array([[[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]]))
  ent = jax.jit(ops.token_entropy)(logits)
  chex.assert_shape(ent, (1, 2))  # the last position has no target
  np.testing.assert_allclose(ent, [[np.log(4.0), 0.0]], atol=1e-6)


# Policy loss on a 2x3 batch: row 0 has 3 completion tokens, row 1 has 2 then padding.

MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
ADV = np.array([1.0, -0.5], np.float32)
RATIOS = np.array([[1.0, 1.1, 1.5], [0.9, 0.5, 1.0]])
OLD = np.array([[-1.0, -2.0, -0.5], [-1.5, -0.7, -50.0]], np.float32)
NEW = (OLD + np.log(RATIOS)).astype(np.float32)
NEW[1, 2] = 50.0  # junk on padding: exp(100) would overflow if it were used
# Token losses (clip 0.2): row 0 (A = 1): -[1, 1.1, min(1.5, 1.2)];
# row 1 (A = -0.5): -min(0.9 * -0.5, 0.9 * -0.5) = 0.45, -min(0.5 * -0.5, 0.8 * -0.5) = 0.4.
TOKEN_LOSSES = [[-1.0, -1.1, -1.2], [0.45, 0.4]]
TOTAL = -2.45


def _policy(*args, **kw):
  return jax.jit(functools.partial(policy_loss, **kw))(*args)


@pytest.mark.parametrize('aggregation, kw, expected', [
    ('token', {}, TOTAL / 5),
    ('token', {'normalizer': 10.0}, TOTAL / 10),
    ('sequence', {}, (-3.3 / 3 + 0.85 / 2) / 2),
    ('sequence', {'normalizer': 4.0}, (-3.3 / 3 + 0.85 / 2) / 4),
    ('constant', {'max_tokens': 4}, TOTAL / (2 * 4)),
    ('constant', {'max_tokens': 4, 'normalizer': 20.0}, TOTAL / 20),
])
def test_policy_loss_aggregations_hand_computed(aggregation, kw, expected):
  loss, metrics = _policy(NEW, OLD, ADV, MASK, aggregation=aggregation, **kw)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['policy_loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['clip_fraction'], 2 / 5)  # [0, 2] and [1, 1]
  np.testing.assert_allclose(metrics['ratio_mean'], 1.0, rtol=1e-5)
  np.testing.assert_allclose(metrics['ratio_min'], 0.5, rtol=1e-5)
  np.testing.assert_allclose(metrics['ratio_max'], 1.5, rtol=1e-5)
  assert 'kl' not in metrics and 'entropy' not in metrics


def test_policy_loss_per_token_advantages_and_all_padding_row():
  # [B, T] advantages equal to the broadcast [B] ones give the same loss; an
  # extra all-padding row changes neither the sequence count nor the loss.
  @jax.jit
  def all_aggregations(*args):
    return [policy_loss(*args, aggregation=a, max_tokens=4)[0] for a in AGGREGATIONS]

  adv_bt = np.broadcast_to(ADV[:, None], (2, 3))
  pad = lambda a, v: np.concatenate([a, np.full((1, 3), v, np.float32)])
  ref = all_aggregations(NEW, OLD, ADV, MASK)
  np.testing.assert_allclose(ref, [TOTAL / 5, (-3.3 / 3 + 0.85 / 2) / 2, TOTAL / 8], rtol=1e-5)
  np.testing.assert_allclose(all_aggregations(NEW, OLD, adv_bt, MASK), ref, rtol=1e-6)
  padded = all_aggregations(pad(NEW, 3.0), pad(OLD, 0.0), np.append(ADV, 7.0), pad(MASK, 0.0))
  np.testing.assert_allclose(padded, ref, rtol=1e-6)


@pytest.mark.parametrize('aggregation, normalizer', [('token', 5.0), ('sequence', 2.0),
                                                    ('constant', 8.0)])
def test_micro_batches_with_the_whole_batchs_normalizer_sum_to_its_loss(aggregation,
                                                                         normalizer):
  """The trainer splits a batch into micro-batches and gives each the whole
  batch's normalizer (rl_parts.policy_normalizer_fn): 5 completion tokens, 2
  sequences with any (an all-padding row counts for nothing), 2 x 4 slots.
  Each micro-batch's loss divided by its own count would not sum to this."""
  from jpost.trainers import rl_parts
  pad = lambda a, v: np.concatenate([a, np.full((1, 3), v, np.float32)])
  new, old, adv, mask = pad(NEW, 3.0), pad(OLD, 0.0), np.append(ADV, 7.0), pad(MASK, 0.0)
  got = rl_parts.policy_normalizer_fn({'completion_mask': jnp.asarray(mask)},
                                      aggregation=aggregation, max_new_tokens=4)
  assert float(got) == normalizer
  kw = dict(aggregation=aggregation, max_tokens=4, normalizer=normalizer)
  parts = [_policy(new[rows], old[rows], adv[rows], mask[rows], **kw)[0]
           for rows in (slice(0, 1), slice(1, 3))]
  whole = _policy(NEW, OLD, ADV, MASK, aggregation=aggregation, max_tokens=4)[0]
  np.testing.assert_allclose(sum(parts), whole, rtol=1e-5)
  expected = {'token': TOTAL / 5, 'sequence': (-3.3 / 3 + 0.85 / 2) / 2, 'constant': TOTAL / 8}
  np.testing.assert_allclose(whole, expected[aggregation], rtol=1e-5)


def test_policy_gradient_is_zero_exactly_on_the_clipped_side():
  # One row, token aggregation over 4 tokens, clip 0.2:
  #   A > 0, ratio 1.5 (> 1.2): clipped, zero gradient.
  #   A > 0, ratio 0.5 (< 0.8): unclipped, gradient -ratio * A / 4 = -0.125.
  #   A < 0, ratio 0.5 (< 0.8): clipped, zero gradient.
  #   A < 0, ratio 1.5 (> 1.2): unclipped, gradient -ratio * A / 4 = 0.375.
  old = jnp.zeros((1, 4))
  new = jnp.log(jnp.array([[1.5, 0.5, 0.5, 1.5]]))
  adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
  mask = jnp.ones((1, 4))
  grad_fn = jax.jit(jax.grad(lambda lp, *a: policy_loss(lp, *a)[0]))
  grad = grad_fn(new, old, adv, mask)
  np.testing.assert_allclose(grad, [[0.0, -0.125, 0.0, 0.375]], rtol=1e-6)
  assert grad[0, 0] == 0.0 and grad[0, 2] == 0.0
  _, metrics = _policy(new, old, adv, mask)
  np.testing.assert_allclose(metrics['clip_fraction'], 0.5)
  # Padding never gets a gradient, even holding junk.
  grad = grad_fn(NEW, OLD, jnp.broadcast_to(ADV[:, None], (2, 3)), MASK)
  assert np.isfinite(grad).all() and grad[1, 2] == 0.0


@pytest.mark.parametrize('clip_low, clip_high, expected, clip_fraction', [
    # Tokens: (ratio 1.25, A = 1), (ratio 0.85, A = -1).
    (0.1, 0.3, -(1.25 - 0.9) / 2, 0.5),   # 1.25 < 1.3 unclipped; 0.85 < 0.9 clipped
    (0.3, 0.1, -(1.1 - 0.85) / 2, 0.5),   # 1.25 > 1.1 clipped; 0.85 > 0.7 unclipped
    (0.2, 0.2, -(1.2 - 0.85) / 2, 0.5),   # symmetric: 1.25 > 1.2 clipped; 0.85 unclipped
])
def test_asymmetric_clip_ranges(clip_low, clip_high, expected, clip_fraction):
  new = jnp.log(jnp.array([[1.25, 0.85]]))
  loss, metrics = _policy(new, jnp.zeros((1, 2)), jnp.array([[1.0, -1.0]]), jnp.ones((1, 2)),
                          clip_low=clip_low, clip_high=clip_high)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['clip_fraction'], clip_fraction)


def test_kl_term_value_and_gradient():
  # Ratio 1 and A = 0: only the KL term is left. log_ratio = ref - lp = [-0.5, 1].
  lp, ref = jnp.array([[-1.0, -2.0, 9.0]]), jnp.array([[-1.5, -1.0, -9.0]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  args = (lp, lp, jnp.zeros(1), mask)
  f = jax.jit(lambda lp_: policy_loss(lp_, *args[1:], ref_logprobs=ref, kl_coef=0.5))
  loss, metrics = f(lp)
  k2 = np.array([0.125, 0.5])
  np.testing.assert_allclose(metrics['kl'], k2.mean(), rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * k2.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['policy_loss'], 0.0, atol=1e-7)
  # d/dlp of 0.5 * mean(0.5 * (ref - lp)^2) = 0.5 * (lp - ref) / 2; nothing on padding.
  grad = jax.jit(jax.grad(lambda x: f(x)[0]))(lp)
  np.testing.assert_allclose(grad, [[0.125, -0.25, 0.0]], rtol=1e-6)
  # k3 value through the loss.
  _, metrics = _policy(*args, ref_logprobs=ref, kl_coef=0.5, kl_estimator='k3')
  np.testing.assert_allclose(metrics['kl'], (np.exp(-0.5) - 0.5 + np.e - 2.0) / 2, rtol=1e-6)
  # ref given but kl_coef 0: logged, not in the loss.
  loss, metrics = _policy(*args, ref_logprobs=ref)
  np.testing.assert_allclose(loss, 0.0, atol=1e-7)
  np.testing.assert_allclose(metrics['kl'], k2.mean(), rtol=1e-6)


def test_entropy_bonus():
  entropy = jnp.array([[1.0, 2.0, 3.0], [0.5, 1.5, 99.0]])
  loss, metrics = _policy(NEW, OLD, ADV, MASK, entropy=entropy, entropy_coef=0.1)
  np.testing.assert_allclose(metrics['entropy'], 8.0 / 5, rtol=1e-6)
  np.testing.assert_allclose(loss, TOTAL / 5 - 0.1 * 8.0 / 5, rtol=1e-5)
  np.testing.assert_allclose(metrics['policy_loss'], TOTAL / 5, rtol=1e-5)


@pytest.mark.parametrize('aggregation', AGGREGATIONS)
def test_policy_loss_grads_away_from_kinks(aggregation):
  rng = np.random.default_rng(0)
  old = -rng.uniform(0.5, 3.0, (2, 3)).astype(np.float32)
  lp = jnp.asarray(old + rng.uniform(-0.08, 0.08, (2, 3)), jnp.float32)  # ratios within 0.2
  ref = (old + rng.normal(size=(2, 3)) * 0.3).astype(np.float32)
  adv = rng.normal(size=2).astype(np.float32)
  entropy = np.full((2, 3), 1.3, np.float32)
  f = jax.jit(lambda x: policy_loss(x, old, adv, MASK, aggregation=aggregation, max_tokens=4,
                                    ref_logprobs=ref, kl_coef=0.1, entropy=entropy,
                                    entropy_coef=0.01)[0])
  check_grads(f, (lp,), order=1, modes=['rev'], eps=1e-2)


@pytest.mark.parametrize('kw, match', [
    (dict(aggregation='batch'), "aggregation 'batch' unknown"),
    (dict(aggregation='constant'), 'pass max_tokens'),
    (dict(kl_coef=0.1), 'needs ref_logprobs'),
    (dict(entropy_coef=0.1), 'needs entropy'),
    (dict(kl_estimator='k5'), "kl_estimator 'k5' unknown"),
    (dict(clip_low=1.0), 'clip_low < 1'),
])
def test_policy_loss_rejects_bad_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    policy_loss(NEW, OLD, ADV, MASK, **kw)


# Value loss: three tokens and one padding slot, clip 0.2.
#   a: old 0.5, v 1.0, R 1.0: error 0, clipped v 0.7 -> 0.09 (clipped branch larger)
#   b: old 0.5, v 0.6, R 0.0: error 0.36, clipped v 0.6 -> 0.36
#   c: old 0.0, v -0.5, R 0.5: error 1.0, clipped v -0.2 -> 0.49

V = np.array([[1.0, 0.6, -0.5, 7.0]], np.float32)
OLD_V = np.array([[0.5, 0.5, 0.0, -7.0]], np.float32)
RETURNS = np.array([[1.0, 0.0, 0.5, 3.0]], np.float32)
V_MASK = np.array([[1, 1, 1, 0]], np.float32)


@pytest.mark.parametrize('kw, expected, clip_fraction', [
    ({}, 0.5 * (0.09 + 0.36 + 1.0) / 3, 1 / 3),
    ({'normalizer': 10.0}, 0.5 * (0.09 + 0.36 + 1.0) / 10, 1 / 3),
    ({'clip_range': None}, 0.5 * (0.0 + 0.36 + 1.0) / 3, 0.0),
])
def test_value_loss_hand_computed(kw, expected, clip_fraction):
  loss, metrics = jax.jit(functools.partial(value_loss, **kw))(V, OLD_V, RETURNS, V_MASK)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['value_loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['value_clip_fraction'], clip_fraction, rtol=1e-6)
  r, v = RETURNS[0, :3], V[0, :3]
  np.testing.assert_allclose(metrics['explained_variance'], 1 - np.var(r - v) / np.var(r),
                             rtol=1e-5)


def test_value_loss_rejects_bad_clip_range():
  with pytest.raises(ValueError, match='clip_range must be > 0'):
    value_loss(V, OLD_V, RETURNS, V_MASK, clip_range=0.0)


def test_value_loss_gradient_zero_where_clipped():
  grad = jax.jit(jax.grad(lambda v: value_loss(v, OLD_V, RETURNS, V_MASK)[0]))(V)
  # a: clipped branch active -> 0; b: 0.5 * 2 * 0.6 / 3; c: 0.5 * 2 * -1.0 / 3; padding 0.
  np.testing.assert_allclose(grad, [[0.0, 0.2, -1.0 / 3, 0.0]], rtol=1e-5, atol=1e-7)
