"""Forgetting check, first half: how well a model still predicts general text
unrelated to its training task, against the model it started from.

The text ships with Python itself (`'pydoc'`: the standard library's help
topics, pydoc_data.topics, 465k characters of technical English prose), or
is a user's .txt file. It is cut into `count` windows of `length` tokens
spread evenly over the text; each model's mean next-token negative
log-likelihood per window gives its NLL (perplexity = exp NLL) with a
bootstrap interval over windows, and the drift from the anchor model is the
paired difference (same windows) with its own interval.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost import ops
from jpost.errors import ConfigError, MissingPathError
from jpost.eval.intervals import percentile_interval


def general_text(source: str) -> str:
  if source == 'pydoc':
    from pydoc_data.topics import topics
    return '\n\n'.join(topics[k] for k in sorted(topics))
  path = pathlib.Path(source)
  if not path.is_file():
    raise MissingPathError(f"general.text={source!r}: no such file; give 'pydoc' (text "
                           'shipped with Python) or a .txt file of general prose.')
  return path.read_text()


def windows(token_ids: list[int], count: int, length: int) -> np.ndarray:
  """`count` windows [count, length] spread evenly over the token ids."""
  if count <= 0 or length < 2:
    raise ConfigError(f'general: chunks={count} must be positive and tokens={length} >= 2.')
  if len(token_ids) < length:
    raise ConfigError(f'general: the text has {len(token_ids)} tokens, fewer than one window '
                      f'of {length}.')
  starts = np.linspace(0, len(token_ids) - length, count).astype(int)
  ids = np.asarray(token_ids, np.int32)
  return np.stack([ids[s:s + length] for s in starts])


@nnx.jit
def _nll(model, tokens):
  """Mean next-token NLL per row: one compiled program for every model of a shape."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits = model(tokens, positions, jnp.ones_like(tokens))
  return -jnp.mean(ops.token_logprobs(logits, tokens[:, 1:]), axis=1)


def window_nll(model, tokens: np.ndarray, batch: int = 8) -> np.ndarray:
  """Mean next-token NLL of each window [count] under `model`."""
  out = []
  for start in range(0, len(tokens), batch):
    chunk = tokens[start:start + batch]
    pad = batch - len(chunk)  # one compiled shape
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
    out.append(np.asarray(_nll(model, jnp.asarray(padded)))[:len(chunk)])
  return np.concatenate(out).astype(np.float64)


def summary(nll: np.ndarray, *, rounds: int, seed: int) -> dict[str, float]:
  """Mean NLL and perplexity with 95% bootstrap intervals over windows."""
  rng = np.random.default_rng(seed)
  means = nll[rng.integers(0, len(nll), (rounds, len(nll)))].mean(axis=1)
  low, _, high = percentile_interval(means)
  return {'nll': float(nll.mean()), 'nll_low': float(low), 'nll_high': float(high),
          'perplexity': float(np.exp(nll.mean()))}


def drift(nll: np.ndarray, anchor_nll: np.ndarray, *, rounds: int, seed: int) -> dict[str, float]:
  """NLL minus the anchor's on the same windows, with a paired 95% bootstrap interval."""
  diff = nll - anchor_nll
  rng = np.random.default_rng(seed)
  means = diff[rng.integers(0, len(diff), (rounds, len(diff)))].mean(axis=1)
  low, _, high = percentile_interval(means)
  return {'drift_nll': float(diff.mean()), 'drift_low': float(low), 'drift_high': float(high)}


# --- the judged half: general instructions answered before and after --------

BUILTIN_INSTRUCTIONS = pathlib.Path(__file__).with_name('general_instructions.jsonl')
OUTCOME_SCORE = {'win': 1.0, 'tie': 0.5, 'both_bad': 0.5, 'loss': 0.0}


def instructions_source(source: str) -> str:
  """'builtin' (24 everyday instructions written for jpost, kept beside this
  module) or a user's prompt file (JSONL/Parquet rows with 'prompt')."""
  if source == 'builtin':
    return str(BUILTIN_INSTRUCTIONS)
  if not pathlib.Path(source).is_file():
    raise MissingPathError(f"general.instructions={source!r}: no such file; give 'builtin' "
                           "or a JSONL file of {\"prompt\": ...} rows ('' turns it off).")
  return source


def win_rate(outcomes: list[str], *, rounds: int, seed: int) -> dict[str, float]:
  """A model's judged win rate against the anchor on the same instructions
  (ties and both-bad count half), with a 95% bootstrap interval over prompts.
  0.5 means the judge cannot tell the two apart: no forgetting it can see."""
  unknown = set(outcomes) - set(OUTCOME_SCORE)
  if unknown or not outcomes:
    raise ValueError(f'win_rate: outcomes must be non-empty and in {sorted(OUTCOME_SCORE)}, '
                     f'got {sorted(unknown) or "none"}.')
  score = np.array([OUTCOME_SCORE[o] for o in outcomes])
  rng = np.random.default_rng(seed)
  means = score[rng.integers(0, len(score), (rounds, len(score)))].mean(axis=1)
  low, _, high = percentile_interval(means)
  return {'win_rate': float(score.mean()), 'win_rate_low': float(low),
          'win_rate_high': float(high), 'wins': outcomes.count('win'),
          'ties': outcomes.count('tie'), 'losses': outcomes.count('loss'),
          'both_bad': outcomes.count('both_bad')}
