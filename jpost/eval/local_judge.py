"""A pairwise judge that runs in-process on a jpost model and reads its
verdict off the model's likelihoods instead of parsing free text.

Small models seldom write the strict JSON reply that the pairwise prompt
(jpost.eval.pairwise) asks for, yet their preference is in their
probabilities. `likelihood_chat` renders the judge prompt with the model's
chat template, scores each verdict's reply `{"verdict": "A"` ... by its
summed token log-probability, and answers with the most likely verdict as
that JSON reply, so `judge_pair` (both orders, swapped) uses it unchanged.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost import ops
from jpost.eval.pairwise import VERDICTS

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


def likelihood_chat(model, tokenizer):
  """chat(messages) -> the most likely verdict as the judge's JSON reply."""
  def chat(messages: list[dict]) -> str:
    scores = verdict_logprobs(model, tokenizer, messages)
    best = max(scores, key=scores.get)
    detail = ', '.join(f'{v} {s:.2f}' for v, s in scores.items())
    return json.dumps({'verdict': best, 'rationale': f'log-probabilities: {detail}'})
  return chat
