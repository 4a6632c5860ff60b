"""Bradley-Terry and DPO-family losses against hand-computed values, under jax.jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jpost.losses.dpo import LOSS_TYPES, dpo_loss
from jpost.losses.reward import bradley_terry_loss

LOG2 = np.log(2.0)


def _softplus(x):
  """-log sigmoid(-x) in numpy, for writing expected values."""
  return np.log1p(np.exp(x))


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


# Bradley-Terry.

def test_bradley_terry_equal_rewards_give_log2_and_half_accuracy():
  rewards = jnp.array([0.3, -1.0, 2.0])
  loss, metrics = jax.jit(bradley_terry_loss)(rewards, rewards)
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
  np.testing.assert_allclose(metrics['accuracy'], 0.5)  # ties count half
  np.testing.assert_allclose(metrics['margin'], 0.0)
  assert set(metrics) == {'loss', 'accuracy', 'margin', 'chosen_reward', 'rejected_reward'}


def test_bradley_terry_hand_computed_with_margin_and_centering():
  chosen, rejected = _f32([1.0, 0.0], [0.5, 1.0])
  margin = jnp.array([0.5, -1.0])
  # Pair 1: diff 0.5, minus margin 0.5 -> 0; pair 2: diff -1, minus -1 -> 0.
  loss, metrics = jax.jit(functools.partial(bradley_terry_loss, margin=margin))(chosen, rejected)
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
  np.testing.assert_allclose(metrics['accuracy'], 0.5)  # one win, one loss
  np.testing.assert_allclose(metrics['margin'], (0.5 - 1.0) / 2)
  np.testing.assert_allclose(metrics['chosen_reward'], 0.5)
  np.testing.assert_allclose(metrics['rejected_reward'], 0.75)
  # Without margin: -log sigmoid(0.5) and -log sigmoid(-1).
  plain = (_softplus(-0.5) + _softplus(1.0)) / 2
  loss, _ = jax.jit(bradley_terry_loss)(chosen, rejected)
  np.testing.assert_allclose(loss, plain, rtol=1e-6)
  # Centering adds coef * (rc + rr)^2 per pair: 0.1 * (1.5^2 + 1^2).
  loss, _ = jax.jit(functools.partial(bradley_terry_loss, center_coef=0.1))(chosen, rejected)
  np.testing.assert_allclose(loss, plain + 0.1 * (2.25 + 1.0) / 2, rtol=1e-6)
  # Normaliser: the same sum divided by the whole batch's pair count.
  loss, metrics = jax.jit(functools.partial(bradley_terry_loss, normalizer=8))(chosen, rejected)
  np.testing.assert_allclose(loss, plain * 2 / 8, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], loss)


def test_bradley_terry_grads():
  chosen, rejected = _f32([0.3, -0.2, 1.1], [0.1, 0.4, -0.7])
  f = jax.jit(lambda c, r: bradley_terry_loss(c, r, center_coef=0.05)[0])
  check_grads(f, (chosen, rejected), order=1, modes=['rev'], eps=1e-2)
  # Without centering, descent pushes every chosen reward up and every rejected one down.
  g_c, g_r = jax.jit(jax.grad(lambda c, r: bradley_terry_loss(c, r)[0], argnums=(0, 1)))(
      chosen, rejected)
  chex.assert_shape((g_c, g_r), (3,))
  assert (g_c < 0).all() and (g_r > 0).all()


def test_bradley_terry_rejects_wrong_shapes():
  with pytest.raises(ValueError, match='must both be'):
    bradley_terry_loss(jnp.zeros((2, 1)), jnp.zeros((2, 1)))


# DPO family.

def _dpo(*args, **kw):
  return jax.jit(functools.partial(dpo_loss, **kw))(*args)


def test_dpo_equal_logps_give_log2_and_zero_accuracy():
  same = jnp.array([-5.0, -7.0])
  for loss_type, kw in [('sigmoid', {}), ('cdpo', {'label_smoothing': 0.1})]:
    loss, metrics = _dpo(same, same, same, same, loss_type=loss_type, **kw)
    np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
    assert metrics['rewards/accuracy'] == 0.0  # a tie is not a win
    np.testing.assert_allclose(metrics['rewards/margin'], 0.0)
  assert set(metrics) == {'loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracy',
                          'rewards/margin', 'logps/chosen', 'logps/rejected'}


def test_dpo_sigmoid_hand_computed():
  pc, pr, rc, rr = _f32([-10.0], [-12.0], [-11.0], [-11.0])  # h = 2
  loss, metrics = _dpo(pc, pr, rc, rr, beta=0.5)
  np.testing.assert_allclose(loss, _softplus(-1.0), rtol=1e-6)
  np.testing.assert_allclose(metrics['rewards/chosen'], 0.5)
  np.testing.assert_allclose(metrics['rewards/rejected'], -0.5)
  np.testing.assert_allclose(metrics['rewards/margin'], 1.0)
  assert metrics['rewards/accuracy'] == 1.0
  np.testing.assert_allclose(metrics['logps/chosen'], -10.0)
  np.testing.assert_allclose(metrics['logps/rejected'], -12.0)


def test_cdpo_hand_computed_and_reduces_to_sigmoid_at_zero_smoothing():
  pc, pr, rc, rr = _f32([-10.0, -3.0], [-12.0, -2.0], [-11.0, -3.0], [-11.0, -3.0])
  beta = 0.5
  bh = beta * np.array([2.0, -1.0])
  eps = 0.25
  expected = np.mean((1 - eps) * _softplus(-bh) + eps * _softplus(bh))
  loss, _ = _dpo(pc, pr, rc, rr, loss_type='cdpo', beta=beta, label_smoothing=eps)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # The cDPO loss is affine in eps, so L(0) = 2 L(0.1) - L(0.2) must be plain DPO.
  l1, _ = _dpo(pc, pr, rc, rr, loss_type='cdpo', beta=beta, label_smoothing=0.1)
  l2, _ = _dpo(pc, pr, rc, rr, loss_type='cdpo', beta=beta, label_smoothing=0.2)
  sigmoid, _ = _dpo(pc, pr, rc, rr, beta=beta)
  np.testing.assert_allclose(2 * l1 - l2, sigmoid, rtol=1e-5)
  np.testing.assert_allclose(sigmoid, np.mean(_softplus(-bh)), rtol=1e-6)


def test_ipo_hand_computed():
  lengths = dict(chosen_lengths=jnp.array([3, 3]), rejected_lengths=jnp.array([2, 2]))
  same = jnp.array([-6.0, -6.0])
  loss, _ = _dpo(same, same, same, same, loss_type='ipo', beta=0.1, **lengths)
  # h_len = 0 when policy == reference: (0 - 1 / (2 * 0.1))^2 = 25.
  np.testing.assert_allclose(loss, 25.0, rtol=1e-6)
  # Per-token averages: policy (-6/3) - (-8/2) = 2, reference (-9/3) - (-6/2) = 0 -> h_len = 2.
  pc, pr, rc, rr = _f32([-6.0], [-8.0], [-9.0], [-6.0])
  one = dict(chosen_lengths=jnp.array([3]), rejected_lengths=jnp.array([2]))
  loss, metrics = _dpo(pc, pr, rc, rr, loss_type='ipo', beta=0.5, **one)
  np.testing.assert_allclose(loss, (2.0 - 1.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(metrics['rewards/chosen'], 0.5 * 3.0)  # beta * (pc - rc)
  loss, _ = _dpo(pc, pr, rc, rr, loss_type='ipo', beta=0.25, **one)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)  # gap exactly at its target


def test_simpo_hand_computed_is_reference_free():
  pc, pr = _f32([-6.0, -4.0], [-8.0, -4.0])
  lengths = dict(chosen_lengths=jnp.array([3, 2]), rejected_lengths=jnp.array([2, 2]))
  loss, metrics = jax.jit(lambda a, b: dpo_loss(a, b, None, None, loss_type='simpo', beta=2.0,
                                                simpo_gamma=0.5, **lengths))(pc, pr)
  # Pair 1: 2 * (-2 - -4) - 0.5 = 3.5; pair 2: 2 * (-2 - -2) - 0.5 = -0.5.
  np.testing.assert_allclose(loss, (_softplus(-3.5) + _softplus(0.5)) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics['rewards/chosen'], (-4.0 + -4.0) / 2)
  np.testing.assert_allclose(metrics['rewards/rejected'], (-8.0 + -4.0) / 2)
  np.testing.assert_allclose(metrics['rewards/accuracy'], 0.5)  # the tie is not a win


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_dpo_normalizer_divides_the_sum(loss_type):
  pc, pr, rc, rr = _f32([-6.0, -5.0], [-8.0, -4.5], [-7.0, -5.5], [-7.5, -4.0])
  kw = dict(loss_type=loss_type, chosen_lengths=jnp.array([3, 4]),
            rejected_lengths=jnp.array([2, 5]))
  if loss_type == 'cdpo':
    kw['label_smoothing'] = 0.1
  mean, _ = _dpo(pc, pr, rc, rr, **kw)
  scaled, metrics = _dpo(pc, pr, rc, rr, normalizer=10, **kw)
  np.testing.assert_allclose(scaled, mean * 2 / 10, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], scaled)


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_dpo_grads(loss_type):
  pc, pr, rc, rr = _f32([-6.0, -5.0], [-8.0, -4.5], [-7.0, -5.5], [-7.5, -4.0])
  kw = dict(loss_type=loss_type, beta=0.5, chosen_lengths=jnp.array([3, 4]),
            rejected_lengths=jnp.array([2, 5]))
  if loss_type == 'cdpo':
    kw['label_smoothing'] = 0.2
  f = jax.jit(lambda a, b: dpo_loss(a, b, rc, rr, **kw)[0])
  check_grads(f, (pc, pr), order=1, modes=['rev'], eps=1e-2)
  # The reference is a constant: no gradient reaches it.
  g_ref = jax.grad(lambda x: dpo_loss(pc, pr, x, rr, **kw)[0])(rc)
  np.testing.assert_array_equal(g_ref, 0.0)


@pytest.mark.parametrize('kw, match', [
    (dict(loss_type='kto'), "loss_type 'kto' unknown"),
    (dict(beta=0.0), 'beta must be > 0'),
    (dict(label_smoothing=0.1), "set loss_type='cdpo'"),
    (dict(loss_type='cdpo'), 'needs 0 < label_smoothing < 0.5'),
    (dict(loss_type='cdpo', label_smoothing=0.5), 'needs 0 < label_smoothing < 0.5'),
    (dict(loss_type='ipo'), 'pass chosen_lengths and rejected_lengths'),
    (dict(loss_type='simpo', chosen_lengths=jnp.ones(1)), 'pass chosen_lengths'),
    (dict(loss_type='ipo', label_smoothing=0.1, chosen_lengths=jnp.ones(1),
          rejected_lengths=jnp.ones(1)), "only to loss_type='cdpo'"),
])
def test_dpo_rejects_bad_settings(kw, match):
  x = jnp.zeros(1)
  with pytest.raises(ValueError, match=match):
    dpo_loss(x, x, x, x, **kw)


def test_dpo_needs_reference_unless_simpo():
  x = jnp.zeros(1)
  with pytest.raises(ValueError, match="only 'simpo' is reference-free"):
    dpo_loss(x, x, None, None)


@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_weightless_pairs_leave_dpo_loss_and_metrics_as_without_them(loss_type):
  """Pairs of weight 0 (the empty pairs that fill up an evaluation's last
  batch) change neither the loss nor any metric, nor the gradient; a batch
  of them alone has loss 0 and finite metrics."""
  rng = np.random.default_rng(3)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(size=5) * 3 - 20, jnp.float32) for _ in range(4))
  lc, lr = jnp.asarray([4., 7., 3., 9., 5.]), jnp.asarray([6., 2., 8., 5., 4.])
  kw = dict(loss_type=loss_type, beta=0.3, label_smoothing=0.1 if loss_type == 'cdpo' else 0.0)
  keep = np.array([1., 0., 1., 1., 0.])
  real = keep > 0

  def weighted(pc):
    return dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                    weights=jnp.asarray(keep), normalizer=3.0, **kw)

  def dropped(pc_real):
    return dpo_loss(pc_real, pr[real], rc[real], rr[real], chosen_lengths=lc[real],
                    rejected_lengths=lr[real], **kw)

  (loss, metrics), grad = jax.value_and_grad(weighted, has_aux=True)(pc)
  (want, want_metrics), want_grad = jax.value_and_grad(dropped, has_aux=True)(pc[real])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  for name in want_metrics:
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(np.asarray(grad)[real], want_grad, rtol=1e-6)
  assert not np.any(np.asarray(grad)[~real])
  empty, empty_metrics = dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                                  weights=jnp.zeros(5), normalizer=0.0, **kw)
  assert float(empty) == 0.0 and all(np.isfinite(float(v)) for v in empty_metrics.values())


def test_weightless_pairs_leave_bradley_terry_as_without_them():
  rng = np.random.default_rng(4)
  chosen, rejected, margin = (jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(3))
  keep = np.array([0., 1., 1., 0.])
  real = keep > 0
  loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=0.01,
                                     weights=jnp.asarray(keep))
  want, want_metrics = bradley_terry_loss(chosen[real], rejected[real], margin=margin[real],
                                          center_coef=0.01)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  for name in want_metrics:
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo', 'cdpo'])
def test_a_policy_equal_to_its_reference_up_to_rounding_scores_no_win(loss_type):
  """Sums of the same log-probs from two compiled programs differ in their
  last bits (3e-7 relative measured for SmolLM2's held-out GSM8K pairs): such
  gaps are ties, not wins; a gap of 0.01 nats is a win."""
  rng = np.random.default_rng(5)
  ref_c, ref_r = (jnp.asarray(rng.uniform(-60, -20, 6), jnp.float32) for _ in range(2))
  noise = lambda a: a * (1 + jnp.asarray(rng.uniform(-3e-7, 3e-7, 6), jnp.float32))
  kw = dict(loss_type=loss_type, beta=0.1, chosen_lengths=jnp.full(6, 30.),
            rejected_lengths=jnp.full(6, 30.), label_smoothing=0.1 if loss_type == 'cdpo' else 0.0)
  _, metrics = dpo_loss(noise(ref_c), noise(ref_r), ref_c, ref_r, **kw)
  assert float(metrics['rewards/accuracy']) == 0.0
  _, metrics = dpo_loss(ref_c + 0.01, ref_r, ref_c, ref_r, **kw)
  assert float(metrics['rewards/accuracy']) == 1.0
