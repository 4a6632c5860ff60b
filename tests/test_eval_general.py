"""The forgetting check's pieces: windows over general text, per-window NLL
against a direct computation, bootstrap summaries and paired drift."""

import numpy as np
import pytest

from jpost.errors import ConfigError, MissingPathError
from jpost.eval import general
from jpost.models import hf
from jpost.tokenizer import Tokenizer


def test_general_text_ships_with_python_and_bad_paths_are_clear(tmp_path):
  assert len(general.general_text('pydoc')) > 400_000
  with pytest.raises(MissingPathError, match='pydoc'):
    general.general_text(str(tmp_path / 'nope.txt'))


def test_windows_spread_over_the_text():
  ids = list(range(1000))
  w = general.windows(ids, 5, 100)
  assert w.shape == (5, 100) and w[0, 0] == 0 and w[-1, -1] == 999
  assert list(w[:, 0]) == [0, 225, 450, 675, 900]
  with pytest.raises(ConfigError, match='fewer than one window'):
    general.windows(ids[:50], 2, 100)


def test_window_nll_equals_a_direct_computation_and_drift(tiny_checkpoint):
  model = hf.load(tiny_checkpoint)
  ids = Tokenizer.from_dir(tiny_checkpoint).encode(general.general_text('pydoc')[:20000])
  tokens = general.windows(ids, 5, 24)  # 5 windows: a padded last batch of 3
  nll = general.window_nll(model, tokens, batch=2)
  logits = np.asarray(model(tokens, np.broadcast_to(np.arange(24), tokens.shape),
                            np.ones_like(tokens)), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0].mean(1)
  np.testing.assert_allclose(nll, want, rtol=1e-5)
  s = general.summary(nll, rounds=200, seed=0)
  assert s['nll_low'] <= s['nll'] <= s['nll_high'] and s['perplexity'] == np.exp(s['nll'])
  assert general.drift(nll, nll, rounds=50, seed=0) == {
      'drift_nll': 0.0, 'drift_low': 0.0, 'drift_high': 0.0}
  # Sharper random logits predict real text worse: a drift above zero.
  many = general.windows(ids, 32, 24)
  before = general.window_nll(model, many)
  model.embed.set_value(model.embed[...] * 8)
  d = general.drift(general.window_nll(model, many), before, rounds=200, seed=0)
  assert d['drift_low'] > 0, d


def test_win_rate_counts_ties_and_both_bad_half():
  s = general.win_rate(['win', 'loss', 'tie', 'both_bad', 'win'], rounds=200, seed=0)
  assert s['win_rate'] == pytest.approx((1 + 0 + 0.5 + 0.5 + 1) / 5)
  assert (s['wins'], s['losses'], s['ties'], s['both_bad']) == (2, 1, 1, 1)
  assert 0 <= s['win_rate_low'] <= s['win_rate'] <= s['win_rate_high'] <= 1
  assert general.win_rate(['tie'] * 4, rounds=20, seed=0)['win_rate_high'] == 0.5
  with pytest.raises(ValueError, match='outcomes'):
    general.win_rate(['win', '1'], rounds=10, seed=0)


def test_builtin_instructions_ship_and_bad_paths_are_clear(tmp_path):
  rows = general.BUILTIN_INSTRUCTIONS.read_text().splitlines()
  assert len(rows) == 24 and all('"prompt"' in r for r in rows)
  assert general.instructions_source('builtin') == str(general.BUILTIN_INSTRUCTIONS)
  with pytest.raises(MissingPathError, match='builtin'):
    general.instructions_source(str(tmp_path / 'none.jsonl'))


def test_likelihood_judge_scores_each_verdict_reply_after_the_chat(tiny_checkpoint):
  from jpost.eval import local_judge, pairwise
  model, tokenizer = hf.load(tiny_checkpoint), Tokenizer.from_dir(tiny_checkpoint)
  messages = [{'role': 'user', 'content': pairwise.PAIRWISE_PROMPT.format(
      prompt='Name a colour.', response_a='Blue.', response_b='A banana.')}]
  got = local_judge.verdict_logprobs(model, tokenizer, messages)
  # Each reply scored alone, unpadded, in float64: log p of its tokens after the chat.
  chat = tokenizer.encode_chat(messages, add_generation_prompt=True).ids
  for verdict in pairwise.VERDICTS:
    reply = tokenizer.encode(f'{{"verdict": "{verdict}"')
    row = np.asarray([chat + reply])
    logits = np.asarray(model(row, np.arange(row.shape[1])[None], np.ones_like(row)),
                        np.float64)[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = sum(logp[len(chat) - 1 + i, t] for i, t in enumerate(reply))
    assert got[verdict] == pytest.approx(want, abs=1e-3), verdict
  # The position-free margin: half the difference of the two orders' A-over-B.
  margin = local_judge.preference_margin(model, tokenizer, 'Name a colour.', 'Blue.', 'A banana.')
  swapped = [{'role': 'user', 'content': pairwise.PAIRWISE_PROMPT.format(
      prompt='Name a colour.', response_a='A banana.', response_b='Blue.')}]
  other = local_judge.verdict_logprobs(model, tokenizer, swapped)
  assert margin == pytest.approx(((got['A'] - got['B']) - (other['A'] - other['B'])) / 2)
  assert local_judge.preference_margin(model, tokenizer, 'Name a colour.', 'A banana.',
                                       'Blue.') == pytest.approx(-margin)
  assert local_judge.preference_margin(model, tokenizer, 'p', 'same', 'same') == 0.0
