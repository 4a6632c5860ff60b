"""Reward models: last-token reading, transformers parity of the export, scorer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jpost.models import hf
from jpost.models import reward as reward_model
from jpost.tokenizer import Tokenizer


def test_last_token_values_reads_the_last_real_token():
  values = jnp.arange(12, dtype=jnp.float32).reshape(2, 6)
  segments = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 2, 2, 2, 2]])  # right pad; packed
  out = jax.jit(reward_model.last_token_values)(values, segments)
  np.testing.assert_array_equal(out, [2.0, 11.0])


def test_causal_lm_checkpoint_gets_a_fresh_head_and_drops_the_lm_head(tiny_checkpoint):
  model = reward_model.load(tiny_checkpoint, seed=3)
  assert model.score[...].shape == (model.config.hidden_size,)
  again = reward_model.load(tiny_checkpoint, seed=3)
  np.testing.assert_array_equal(model.score[...], again.score[...])  # seeded
  decoder = hf.load(tiny_checkpoint)
  np.testing.assert_array_equal(model.decoder.embed[...], decoder.embed[...])


def _chats():
  return [
      ([{'role': 'user', 'content': 'What is 2 + 2?'}], 'It is 4.'),
      ([{'role': 'user', 'content': 'Name a colour.'}], 'Blue, like the sky on a clear day.'),
      ('Say hi', 'Hi!'),
  ]


def test_export_loads_in_transformers_with_the_same_scores(tiny_checkpoint, tmp_path):
  tokenizer = Tokenizer.from_dir(tiny_checkpoint)
  model = reward_model.load(tiny_checkpoint, seed=1, init_std=0.5)
  path = reward_model.save(model, tmp_path / 'rm', tokenizer=tokenizer)
  scorer = reward_model.load_scorer(path, batch_size=4)
  prompts, completions = zip(*_chats())
  ours = scorer(list(prompts), list(completions))
  assert ours.shape == (3,) and np.ptp(ours) > 1e-3  # a real, non-constant head

  theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  assert theirs_model.config.num_labels == 1
  pad = theirs_model.config.pad_token_id
  assert pad not in tokenizer.stop_ids
  rows = [scorer.encode(p, c) for p, c in zip(prompts, completions)]
  width = max(map(len, rows))
  batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # right-padded batch
  attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
  with torch.no_grad():
    theirs = theirs_model(batch, attention_mask=attention).logits[:, 0].numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)

  reloaded = reward_model.load(path)  # the classifier's head comes back, not a new one
  np.testing.assert_allclose(reloaded.score[...], model.score[...])


def test_multi_label_classifier_is_rejected(tiny_checkpoint, tmp_path):
  from safetensors.numpy import load_file, save_file
  model = reward_model.load(tiny_checkpoint)
  path = reward_model.save(model, tmp_path / 'rm')
  tensors = load_file(path / 'model.safetensors')
  tensors['score.weight'] = np.concatenate([tensors['score.weight']] * 2)
  save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='one label'):
    reward_model.load(path)


def test_classifier_without_its_head_is_rejected(tiny_checkpoint, tmp_path):
  """A classifier whose weights lost score.weight (a causal LM's are fine:
  they start a new reward model) must not come back with a random head."""
  from safetensors.numpy import load_file, save_file
  path = reward_model.save(reward_model.load(tiny_checkpoint), tmp_path / 'rm')
  tensors = load_file(path / 'model.safetensors')
  del tensors['score.weight']
  save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='names a sequence classifier, but its weights hold no '
                                       'score.weight'):
    reward_model.load(path)


def test_scorers_refuse_a_causal_lm(tiny_checkpoint):
  """A causal LM starts a reward model or critic with a fresh head, but a
  scorer on one (RL's reward_model or prm reward, reranking, the judge) would
  score with that random head."""
  for load in (reward_model.load_scorer, reward_model.load_step_scorer):
    with pytest.raises(ValueError, match='holds no reward head .* not a trained reward model'):
      load(tiny_checkpoint)


def test_rows_past_max_len_keep_their_end_and_are_counted(tiny_checkpoint, tmp_path, capsys):
  path = reward_model.save(reward_model.load(tiny_checkpoint, seed=1, init_std=0.5),
                           tmp_path / 'rm', tokenizer=Tokenizer.from_dir(tiny_checkpoint))
  short = reward_model.load_scorer(path, max_len=512, batch_size=2)
  prompts, completions = ['Say something long. ' * 8, 'Hi'], ['A long answer. ' * 4, 'Hello!']
  limit = len(short.encode(prompts[1], completions[1])) + 4  # the second row fits, the first not
  cut = reward_model.load_scorer(path, max_len=limit, batch_size=2)
  full = short(prompts, completions)
  assert short.rows_cut == 0
  got = cut(prompts, completions)
  assert cut.rows_cut == 1 and f'keep their last {limit}' in capsys.readouterr().err
  assert got[1] == pytest.approx(full[1], abs=1e-5)  # the short row is whole in both
  assert cut.encode(prompts[0], completions[0]) == short.encode(prompts[0],
                                                                completions[0])[-limit:]


def test_scorer_rejects_mismatched_lists(tiny_checkpoint, tmp_path):
  scorer = reward_model.load_scorer(reward_model.save(
      reward_model.load(tiny_checkpoint), tmp_path / 'rm',
      tokenizer=Tokenizer.from_dir(tiny_checkpoint)))
  with pytest.raises(ValueError, match='2 prompts but 1 completions'):
    scorer(['a', 'b'], ['x'])
