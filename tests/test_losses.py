"""Losses and helpers against hand-computed values, under jax.jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost import ops
from jpost.losses.sft import sft_loss


def _logits_for(probs_per_position):
  """Logits whose softmax is exactly the given probabilities."""
  return jnp.log(jnp.asarray(probs_per_position, jnp.float32))


def test_next_token_targets_respect_segments_and_mask():
  tokens = np.array([[5, 6, 7, 8, 9, 0]])
  segments = np.array([[1, 1, 1, 2, 2, 0]])
  mask = np.array([[0, 1, 1, 1, 1, 0]])  # token 3 starts sample 2: never predictable
  targets, weights = jax.jit(ops.next_token_targets)(tokens, mask, segments)
  chex.assert_shape((targets, weights), (1, 5))
  np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 0]])
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0]])


def test_sft_loss_hand_computed():
  # vocab 3; row: tokens [0, 1, 2, 1], targets at positions 1..3 (all in segment 1).
  probs = [[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]
  logits = _logits_for([probs])
  tokens = np.array([[0, 1, 2, 1]])
  mask = np.array([[0, 1, 0, 1]])  # token 2 is context, tokens 1 and 3 are targets
  segments = np.ones((1, 4), np.int32)
  loss, metrics = jax.jit(sft_loss)(logits, tokens, mask, segments)
  expected = -(np.log(0.5) + np.log(0.25)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics['target_tokens'] == 2
  # A global normaliser (grad accumulation): same sum, divided by the batch count.
  loss, _ = jax.jit(lambda *a: sft_loss(*a, normalizer=8.0))(logits, tokens, mask, segments)
  np.testing.assert_allclose(loss, -(np.log(0.5) + np.log(0.25)) / 8, rtol=1e-6)


def test_sft_loss_sequence_normalisation_weighs_samples_equally():
  probs = np.full((1, 6, 2), 0.5)
  probs[0, 0] = [0.9, 0.1]  # predicts token 1 (sample 1) with p = 0.1
  logits = _logits_for(probs)
  tokens = np.array([[0, 1, 0, 0, 0, 0]])
  segments = np.array([[1, 1, 2, 2, 2, 2]])  # sample 1: 1 target, sample 2: 3 targets
  mask = np.array([[0, 1, 0, 1, 1, 1]])
  token_loss, _ = jax.jit(sft_loss)(logits, tokens, mask, segments)
  seq_loss, _ = jax.jit(lambda *a: sft_loss(*a, normalization='sequence'))(
      logits, tokens, mask, segments)
  np.testing.assert_allclose(token_loss, (-np.log(0.1) + 3 * np.log(2)) / 4, rtol=1e-6)
  np.testing.assert_allclose(seq_loss, (-np.log(0.1) + np.log(2)) / 2, rtol=1e-6)


def test_sft_loss_ignores_padding_and_has_finite_grads():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 1, 2]])
  segments = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  mask = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # mask set on padding on purpose
  loss, metrics = sft_loss(logits, tokens, mask, segments)
  assert metrics['target_tokens'] == 2 + 3  # padding never counts
  grads = jax.grad(lambda l: sft_loss(l, tokens, mask, segments)[0])(logits)
  assert np.isfinite(grads).all() and np.abs(grads[0, 3:]).max() == 0


def test_unknown_normalisation():
  with pytest.raises(ValueError, match="normalization 'batch' unknown"):
    sft_loss(jnp.zeros((1, 2, 3)), np.zeros((1, 2), int), np.ones((1, 2)), np.ones((1, 2)),
             normalization='batch')
