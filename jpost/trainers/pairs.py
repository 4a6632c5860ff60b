"""The `pairs` recipe: preference pairs and best-of-n data from the model's own samples.

For each prompt: sample N answers, score them with the configured rewards (a
verifier, a reward model, a judge), keep (best, worst) when the gap is at
least `pairs.min_gap`. Writes `pairs_{split}.jsonl` rows in the preference
format ({'prompt', 'chosen', 'rejected'} + scores), `best_of_n_{split}.jsonl`
(rejection sampling: the best answer as an SFT row, when it scores at least
`pairs.best_min_score`) and `pairs_stats.json` (counts of prompts without a
gap, identical pairs, and empty answers, which are never chosen). On
verifiable data this gives real on-policy data without human labels.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import numpy as np

from jpost import rewards, sampling
from jpost.data import pipeline
from jpost.errors import ConfigError
from jpost.trainers import loop, register, rollout
from jpost.trainers.generate import load_model_and_tokenizer


def choose_pair(scores: np.ndarray, min_gap: float) -> tuple[int, int] | None:
  """(best, worst) sample indices of one prompt, or None without a real gap.

  NaN scores (a reward failed on that sample) are neither chosen nor
  rejected. Ties go to the earliest sample, so reruns pick the same pair."""
  valid = np.isfinite(scores)
  if valid.sum() < 2:
    return None
  best = int(np.argmax(np.where(valid, scores, -np.inf)))
  worst = int(np.argmin(np.where(valid, scores, np.inf)))
  if scores[best] - scores[worst] < min_gap or best == worst:
    return None
  return best, worst


def make_pairs(model, tokenizer, batches, reward_fns, settings: sampling.SamplingConfig, *,
               min_gap: float, seed: int, best_min_score: float = float('inf')):
  """(preference rows, best-of-n SFT rows, stats) from (index, prompt batch)
  pairs; batch i samples with key fold_in(seed, i), whoever samples it."""
  stats = {'prompts': 0, 'samples': 0, 'pairs': 0, 'no_gap': 0, 'identical': 0, 'blank': 0,
           'best_of_n': 0, 'reward_sum': 0.0, 'failures': {}}
  rows, best_rows = [], []
  n = settings.num_samples
  prepared = sampling.prepare(model, settings)  # once for every batch
  for index, batch in batches:
    out = jax.device_get(sampling.generate(model, batch['tokens'], batch['segment_ids'] > 0,
                                           settings, jax.random.fold_in(jax.random.key(seed),
                                                                        index),
                                           prepared=prepared))
    texts = rollout.completion_texts(tokenizer, out.tokens, out.lengths)
    prompts = [p for p in batch['prompt'] for _ in range(n)]
    extras = [e for e in batch['extra'] for _ in range(n)]
    result = rewards.score(reward_fns, [rollout.prompt_text(p) for p in prompts], texts, extras)
    for name, counts in result.failures.items():
      stats['failures'][name] = stats['failures'].get(name, 0) + sum(counts.values())
    failed = np.any([~np.isfinite(v) for v in result.per_source.values()], axis=0)
    # An empty answer (the stop token first) is no preference or SFT row: the
    # data layer rejects blank responses. Like a failed reward, it is skipped.
    blank = np.array([not text.strip() for text in texts])
    stats['blank'] += int(blank.sum())
    scores = np.where(failed | blank, np.nan, result.total)
    stats['samples'] += len(texts)
    stats['reward_sum'] += float(np.sum(result.total))
    for i, prompt in enumerate(batch['prompt']):
      stats['prompts'] += 1
      group = slice(i * n, (i + 1) * n)
      top = int(np.argmax(np.where(np.isfinite(scores[group]), scores[group], -np.inf)))
      if scores[i * n + top] >= best_min_score:
        best_rows.append({'prompt': prompt, 'completion': [
            {'role': 'assistant', 'content': texts[i * n + top]}],
            'score': float(scores[i * n + top]), **batch['extra'][i]})
        stats['best_of_n'] += 1
      pick = choose_pair(scores[group], min_gap)
      if pick is None:
        stats['no_gap'] += 1
        continue
      best, worst = (i * n + j for j in pick)
      if texts[best].strip() == texts[worst].strip():
        stats['identical'] += 1
        continue
      rows.append({'prompt': prompt, 'chosen': [{'role': 'assistant', 'content': texts[best]}],
                   'rejected': [{'role': 'assistant', 'content': texts[worst]}],
                   'chosen_score': float(result.total[best]),
                   'rejected_score': float(result.total[worst]), **batch['extra'][i]})
      stats['pairs'] += 1
  return rows, best_rows, stats


def _all_processes(rows, best_rows, stats):
  """Every process's rows (process 0's first) and summed stats."""
  if jax.process_count() == 1:
    return rows, best_rows, stats
  rows, best_rows = (sum(loop.gather_json(r), []) for r in (rows, best_rows))
  shares = loop.gather_json(stats)
  total = {key: sum(share[key] for share in shares) for key in stats if key != 'failures'}
  failures = {}
  for share in shares:
    for name, count in share['failures'].items():
      failures[name] = failures.get(name, 0) + count
  return rows, best_rows, total | {'failures': failures}


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  with tmp.open('w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  tmp.replace(path)


@register('pairs')
def run(config, workdir):
  if workdir is None:
    raise ConfigError('--workdir is required: pairs.jsonl is written there.')
  workdir = pathlib.Path(workdir)
  loop.start_processes(config)
  model, tokenizer = load_model_and_tokenizer(config.model)
  reward_fns = rewards.build(config.rewards)
  settings = rollout.sampling_config(config.sampling, tokenizer)
  result = {}
  for split, sources in (('train', config.data.train), ('test', config.data.eval)):
    if not sources:
      continue
    batches, _ = pipeline.build('prompt', pipeline.resolve_sources(list(sources)), tokenizer,
                                batch_size=config.batch_size, max_len=config.data.max_prompt_len,
                                num_epochs=1, seed=config.seed, policy=config.data.policy,
                                drop_remainder=False)
    tic = time.perf_counter()
    batches = list(batches)
    if config.pairs.max_prompts:  # whole batches up to max_prompts
      batches = batches[:-(-config.pairs.max_prompts // config.batch_size)]
    # Several processes: each samples and scores every process_count-th batch.
    rows, best_rows, stats = _all_processes(*make_pairs(
        model, tokenizer, loop.this_process_share(batches), reward_fns, settings,
        min_gap=config.pairs.min_gap, seed=config.seed,
        best_min_score=config.pairs.best_min_score))
    stats['mean_reward'] = stats.pop('reward_sum') / max(stats['samples'], 1)
    stats['seconds'] = round(time.perf_counter() - tic, 1)
    if jax.process_index() != 0:
      continue
    path = workdir / f'pairs_{split}.jsonl'
    write_jsonl(path, rows)
    write_jsonl(workdir / f'best_of_n_{split}.jsonl', best_rows)
    result[split] = stats | {'path': str(path)}
    print(f'{split}: {stats["pairs"]} pairs from {stats["prompts"]} prompts '
          f'(mean reward {stats["mean_reward"]:.3f}, {stats["no_gap"]} without a gap) '
          f'-> {path}', file=sys.stderr)
  if jax.process_index() == 0:
    (workdir / 'pairs_stats.json').write_text(json.dumps(result, indent=2) + '\n')
  return result
