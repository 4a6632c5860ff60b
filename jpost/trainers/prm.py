"""The `prm` recipe: a process reward model on step-labelled solutions.

The decoder (initialised from an SFT/instruct checkpoint) gets the reward
model's scalar head (`models.reward.ScalarModel`), read at the last token of
every step (`data/steps.py` finds those tokens); the loss is binary
cross-entropy per step against the step's label (hard 0/1 or soft),
averaged over the batch's steps. The export is a transformers sequence
classifier, like a reward model's, that also records the step separator;
`models.reward.load_step_scorer` scores steps with it.

Evaluation, on `data.eval`:
- at the start, every `eval_every` steps and at the end, in the loop:
  eval_loss and eval_step_accuracy (means over step ends, on device);
- once the last step is done, on the host from every step's probability
  (the scorer the export gives): step accuracy, step AUC (rank-based:
  P(a correct step scores above an incorrect one), ties count half) and
  first-error detection (ProcessBench's measure): for solutions with an
  incorrect step, the share whose first step predicted < 0.5 is the first
  step labelled incorrect; for all-correct solutions, the share with no step
  predicted < 0.5; and their harmonic mean. Written to workdir/prm_eval.json.
  (These need every score at once, which the loop's per-batch sums cannot
  give; so they are computed once, on the final model.)
Soft labels count as correct when >= 0.5 in every metric.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import nnx

from jpost import memory
from jpost.data import pipeline, rows
from jpost.losses.prm import step_bce_loss
from jpost.models import hf, lora
from jpost.models import reward as reward_model
from jpost.trainers import loop, offline, register
from jpost.trainers.reward import epochs_to_steps

EVAL_METRICS = ('step_accuracy', 'step_prob', 'step_label')
RESULTS_FILE = 'prm_eval.json'


# --- loss and data ------------------------------------------------------------------


def loss_fn(model, batch, normalizer):
  values = model(batch['tokens'], batch['positions'], batch['segment_ids'])
  return step_bce_loss(values, batch['step_targets'], batch['step_mask'],
                       normalizer=normalizer)


def normalizer_fn(batch):
  """The whole batch's number of step ends: every step weighs the same."""
  return jnp.sum(batch['step_mask']).astype(jnp.float32)


def step_data(data, *, sources, epochs, seed, batch_size, pad_last=False):
  """Batches of solutions; `pad_last` (evaluation): every one, the last batch
  filled up with empty rows, which have no step ends (no weight)."""
  def build(tokenizer, shard_index, shard_count):
    return pipeline.build(
        'steps', pipeline.resolve_sources(sources), tokenizer, batch_size=batch_size,
        max_len=data.max_len, weights=pipeline.stream_weights(data.weights, epochs),
        seed=seed, num_epochs=epochs, policy=data.policy, shard_index=shard_index,
        shard_count=shard_count, num_threads=data.num_threads,
        step_separator=data.separator, pad_last=pad_last)
  return build


def load_examples(sources, policy: str) -> list[dict]:
  """Every valid step row of `sources` (bad rows: error or skipped)."""
  row_filter = rows.RowFilter(policy=policy)
  return [example for source in pipeline.resolve_sources(sources)
          for example in pipeline.load_examples(source, 'steps', row_filter)]


# --- host metrics over every scored step ---------------------------------------------


def step_auc(probs: np.ndarray, correct: np.ndarray) -> float | None:
  """P(prob of a correct step > prob of an incorrect one), ties half
  (Mann-Whitney U over average ranks); None without both kinds of step."""
  correct = np.asarray(correct, bool)
  n_pos, n_neg = int(correct.sum()), int((~correct).sum())
  if not n_pos or not n_neg:
    return None
  ranks = scipy.stats.rankdata(probs)  # ties share their average rank
  return float((ranks[correct].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def first_error_detection(scores: list[np.ndarray], labels: list[np.ndarray]) -> dict:
  """Per solution, over its scored steps (the first len(scores[i]); max_len
  may have cut the rest): with an incorrect step, a hit when the first step
  predicted < 0.5 is the first labelled < 0.5; all correct, a hit when no
  step is predicted < 0.5. Shares are None without solutions of that kind."""
  hits = {True: [], False: []}  # has an error -> one hit (bool) per solution
  for probs, y in zip(scores, labels):
    probs = np.asarray(probs, np.float64)
    y = np.asarray(y, np.float64)[:len(probs)]
    if not len(probs):
      continue
    labelled, predicted = np.flatnonzero(y < 0.5), np.flatnonzero(probs < 0.5)
    if len(labelled):
      hits[True].append(len(predicted) > 0 and predicted[0] == labelled[0])
    else:
      hits[False].append(len(predicted) == 0)
  share = lambda h: float(np.mean(h)) if h else None
  with_error, all_correct = share(hits[True]), share(hits[False])
  f1 = (2 * with_error * all_correct / (with_error + all_correct)
        if with_error is not None and all_correct is not None and with_error + all_correct
        else None)
  return {'first_error/with_error': with_error, 'first_error/all_correct': all_correct,
          'first_error/f1': f1, 'solutions/with_error': len(hits[True]),
          'solutions/all_correct': len(hits[False])}


def step_metrics(scores: list[np.ndarray], labels: list[np.ndarray]) -> dict:
  """Step accuracy, step AUC and first-error detection of per-step
  probabilities `scores` against `labels`, one array each per solution
  (scores may be shorter: steps cut by max_len are left out)."""
  pairs = [(np.asarray(s, np.float64), np.asarray(v, np.float64)[:len(s)])
           for s, v in zip(scores, labels)]
  probs = np.concatenate([s for s, _ in pairs] or [np.zeros(0)])
  correct = np.concatenate([v for _, v in pairs] or [np.zeros(0)]) >= 0.5
  accuracy = float(np.mean((probs >= 0.5) == correct)) if len(probs) else None
  return {'step_accuracy': accuracy, 'step_auc': step_auc(probs, correct),
          'steps/scored': len(probs),
          'steps/not_scored': sum(len(v) for v in labels) - len(probs),
          **first_error_detection(scores, labels)}


def evaluate_steps(scorer: reward_model.StepScorer, examples: list[dict]) -> dict:
  """step_metrics of `scorer` on canonical step rows (rows.normalize_steps)."""
  scores = scorer.score([e['prompt'] for e in examples], [e['steps'] for e in examples])
  return step_metrics(scores, [e['labels'] for e in examples])


# --- the recipe ----------------------------------------------------------------------


def _final_eval(config, workdir: pathlib.Path, graphdef, params, tokenizer) -> dict:
  """evaluate_steps on data.eval with the trained parameters (every process
  scores the whole set; process 0 writes workdir/prm_eval.json)."""
  model = nnx.merge(graphdef, loop.fetch(params))
  scorer = reward_model.StepScorer(model, tokenizer, batch_size=config.score_batch_size,
                                   max_len=config.data.max_len,
                                   separator=config.data.separator)
  results = evaluate_steps(scorer, load_examples(list(config.data.eval), config.data.policy))
  if jax.process_index() == 0:
    (workdir / RESULTS_FILE).write_text(json.dumps(
        {'step': config.total_steps, **results}, indent=2) + '\n')
    shown = ', '.join(f'{k} {v:.3f}' for k, v in results.items() if isinstance(v, float))
    print(f'PRM eval (step {config.total_steps}): {shown}', file=sys.stderr)
  return results


@register('prm')
def run(config, workdir):
  data = config.data
  with config.unlocked():
    config.total_steps = epochs_to_steps(config, list(data.train), kind='steps')
  loaded = {}

  def load_model(path, mesh, cfg):
    model = reward_model.load(path, mesh=mesh, **hf.compute_options(cfg),
                              **({'seed': cfg.seed} | lora.load_options(cfg)))
    loaded['graphdef'], loaded['tokenizer_dir'] = nnx.graphdef(model), path
    return model

  task = offline.Task(
      loss_fn=loss_fn, normalizer_fn=normalizer_fn,
      train_data=step_data(data, sources=list(data.train), epochs=None, seed=config.seed,
                           batch_size=config.batch_size),
      eval_data=step_data(data, sources=list(data.eval), epochs=1, seed=0,
                          batch_size=config.eval_batch_size, pad_last=True)
      if data.eval else None,
      load_model=load_model,
      export=functools.partial(reward_model.save, step_separator=data.separator),
      eval_metrics=EVAL_METRICS,
      activations=functools.partial(memory.step_activations, lm_head=False))
  result = offline.run(config, workdir, task)
  if data.eval and result['step'] >= config.total_steps:
    from jpost.tokenizer import Tokenizer
    result['prm_eval'] = _final_eval(config, pathlib.Path(workdir), loaded['graphdef'],
                                     result['state']['params'],
                                     Tokenizer.from_dir(loaded['tokenizer_dir']))
  return result
