"""A pairwise judge that runs in-process on a jpost model and reads its
verdict off the model's likelihoods instead of parsing free text.

Small models seldom write the strict JSON reply that the pairwise prompt
(jpost.eval.pairwise) asks for, yet their preference is in their
probabilities: `verdict_logprobs` scores each verdict's reply
`{"verdict": "A"` ... after the judge prompt. Small judges also prefer a
position strongly (SmolLM2-135M says "A" in both orders almost always), so
`preference_margin` asks in both orders and keeps only what moves with the
answers: half the difference of the two orders' log p(A) - log p(B), in
which a constant preference for a position cancels.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost import ops
from jpost.eval.pairwise import PAIRWISE_PROMPT, VERDICTS

REPLY_START = '{"verdict": "'
BUCKET = 64  # prompt lengths are padded to multiples: a few compiled shapes per run


@nnx.jit
def _token_logprobs(model, tokens, segment_ids):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return ops.token_logprobs(model(tokens, positions, segment_ids), tokens[:, 1:])


def verdict_logprobs(model, tokenizer, messages: list[dict]) -> dict[str, float]:
  """log p(reply | chat) of each verdict's reply start, one batch of four rows."""
  chat = tokenizer.encode_chat(messages, add_generation_prompt=True).ids
  replies = [tokenizer.encode(f'{REPLY_START}{v}"') for v in VERDICTS]
  width = -(-max(len(chat) + len(r) for r in replies) // BUCKET) * BUCKET
  tokens = np.zeros((len(replies), width), np.int32)
  segments = np.zeros_like(tokens)
  for i, reply in enumerate(replies):
    row = chat + reply
    tokens[i, :len(row)], segments[i, :len(row)] = row, 1
  logprobs = np.asarray(_token_logprobs(model, jnp.asarray(tokens), jnp.asarray(segments)))
  # logprobs[:, t] is the log-probability of token t + 1.
  return {v: float(logprobs[i, len(chat) - 1:len(chat) - 1 + len(r)].sum())
          for i, (v, r) in enumerate(zip(VERDICTS, replies))}


def preference_margin(model, tokenizer, prompt: str, response_1: str, response_2: str, *,
                      template: str = PAIRWISE_PROMPT) -> float:
  """How much more the judge prefers response 1 than response 2, in nats,
  free of a constant position bias: > 0 favours response 1, and swapping
  the responses negates it; identical responses give exactly 0."""
  def a_over_b(first, second):
    scores = verdict_logprobs(model, tokenizer, [{'role': 'user', 'content': template.format(
        prompt=prompt, response_a=first, response_b=second)}])
    return scores['A'] - scores['B']
  return (a_over_b(response_1, response_2) - a_over_b(response_2, response_1)) / 2
