"""MFU's model FLOPs: the attention term counts each real token's own
sequence (its segment in a packed row), by hand-computed values."""

import numpy as np
import pytest

from jpost import metrics
from jpost.models.config import ModelConfig


def test_attended_length_averages_each_tokens_segment_length():
  # Row 0: samples of 3 and 1 tokens, then padding; row 1: one of 5 (the
  # same id as row 0's first sample: rows are counted apart).
  packed = np.array([[1, 1, 1, 2, 0], [1, 1, 1, 1, 1]])
  assert metrics.attended_length(packed) == pytest.approx((9 + 1 + 25) / 9)
  # Left padding, a sample across a padding gap, and a second array (DPO's
  # rejected rows beside its chosen ones) all count.
  other = np.array([[0, 0, 4, 4, 0, 4]])
  assert metrics.attended_length(packed, other) == pytest.approx((9 + 1 + 25 + 9) / 12)
  # A row of one unpadded sequence: its length, as PaLM counts it.
  assert metrics.attended_length(np.ones((2, 7), int)) == 7
  assert metrics.attended_length(np.zeros((2, 4), int)) == 0.0


def test_flops_per_token_is_six_per_matmul_parameter_plus_the_attention_term():
  cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=3,
                    num_heads=4, num_kv_heads=2, tie_embeddings=True)
  embed = 16 * 8
  head = cfg.hidden_size // cfg.num_heads
  # Per layer: q (8 x 8), k and v (8 x 4 each), o (8 x 8), gate, up, down (8 x 12 each);
  # plus the tied head (counted once as a matmul; the embedding lookup is none).
  matmul = 3 * (64 + 2 * 32 + 64 + 3 * 96) + embed
  assert cfg.num_params() - 3 * 2 * 8 - 8 == matmul  # the norms' weights are elementwise
  context = (9 + 1 + 25) / 9
  assert metrics.flops_per_token(cfg, context) == pytest.approx(
      6 * matmul + 12 * 3 * 4 * head * context)
