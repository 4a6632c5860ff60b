"""Greedy generation with the KV cache equals transformers' greedy generate."""

import numpy as np
import pytest
import torch
import transformers

from jpost import sampling
from jpost.models import hf, pretrained
from jpost.tokenizer import Tokenizer

PROMPTS = [
    [{'role': 'user', 'content': 'What is the capital of France?'}],
    [{'role': 'system', 'content': 'You answer in one short sentence.'},
     {'role': 'user', 'content': 'Name a colour of the sky on a clear day, and explain why it has that colour.'}],
    [{'role': 'user', 'content': 'Hi'}],
]


@pytest.fixture(scope='module')
def checkpoint():
  return pretrained.resolve('smollm2-135m-instruct')


def test_greedy_matches_transformers_left_padded(checkpoint):
  tokenizer = Tokenizer.from_dir(checkpoint)
  model = hf.load(checkpoint)
  prompts = [tokenizer.encode_chat(m, add_generation_prompt=True).ids for m in PROMPTS]
  tokens, mask = sampling.left_pad(prompts, tokenizer.pad_id)
  assert len({len(p) for p in prompts}) == len(prompts)  # real left padding
  n = 24
  out, out_mask = sampling.generate(
      model, tokens, mask, sampling.SamplingConfig(max_new_tokens=n, stop_ids=tokenizer.stop_ids))
  out, out_mask = np.asarray(out), np.asarray(out_mask)
  reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = reference.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                               eos_token_id=list(tokenizer.stop_ids), pad_token_id=tokenizer.pad_id)
    ref_new = ref[0, len(prompt):].tolist()
    ours = out[row][out_mask[row] == 1].tolist()
    assert ours == ref_new, (row, tokenizer.decode(ours), tokenizer.decode(ref_new))
    # The stop token is inside the mask; nothing after it is.
    if ours and ours[-1] in tokenizer.stop_ids:
      assert out_mask[row, len(ours):].sum() == 0


def test_left_pad_rejects_empty_prompt():
  with pytest.raises(ValueError, match='at least one token'):
    sampling.left_pad([[1, 2], []], 0)
