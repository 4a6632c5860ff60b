"""The suite's norm-relative comparison passes summation noise and catches real errors."""

import numpy as np
import pytest

from norms import assert_norm_close, relative_error


def test_relative_error_hand_computed():
  assert relative_error([3.0, 4.0], [3.0, 4.0]) == 0.0
  assert relative_error([3.0, 5.0], [3.0, 4.0]) == pytest.approx(1 / 5)
  assert relative_error([0.0, 1e-9], [0.0, 0.0]) == pytest.approx(1e-9)  # no division by zero


def test_noise_on_a_near_zero_element_passes_a_wrong_term_fails():
  rng = np.random.RandomState(0)
  want = {'w': rng.randn(64, 64).astype(np.float32), 'b': rng.randn(64).astype(np.float32)}
  want['w'][3, 5] = 1e-6  # elementwise rtol on this element is a coin toss
  noisy = {k: v * (1 + 1e-7 * rng.randn(*v.shape)).astype(np.float32) for k, v in want.items()}
  noisy['w'][3, 5] = 3e-6
  assert assert_norm_close(noisy, want, bound=1e-5) < 1e-5
  wrong = dict(want, b=want['b'] * 0.5)  # e.g. a term dropped from a sum
  with pytest.raises(AssertionError, match=r"\['b'\]: relative error 0.5 > 1e-05"):
    assert_norm_close(wrong, want, bound=1e-5)
