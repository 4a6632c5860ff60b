"""The `prm_labels` recipe: step labels without humans, the Math-Shepherd way.

For each prompt of a split, the policy samples `solutions` answers; each is
split into steps (`process.split_steps`). For every step but the last, the
answer up to and including that step is continued `rollouts` times; the step
is labelled by the fraction of those continuations whose final answer the
verifier accepts ('soft') or by whether any does ('hard'): a step from which
the model can still reach the right answer is a good step. The last step is
labelled by the answer itself. Rows go to `workdir/steps_{split}.jsonl` in
the step-row format the `prm` recipe trains on, with statistics in
`workdir/labels_stats.json` (by split; labelling one split again replaces
only its entry). The same samples also make preference pairs (a right answer
over a wrong one to the same prompt) in `workdir/pairs_{split}.jsonl`, so an
outcome reward model (`configs/reward.py`) can be trained on equal data and
compared with the PRM.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import time

import jax
import numpy as np

from jpost import rewards, sampling
from jpost.data import pipeline
from jpost.errors import ConfigError
from jpost.rewards.process import split_steps
from jpost.trainers import register, rollout
from jpost.trainers.generate import load_model_and_tokenizer

LABELS = ('soft', 'hard')


def sample(model, tokenizer, prompt_ids: list[list[int]], settings, key, *,
           batch: int) -> list[list[str]]:
  """`settings.num_samples` completions of each prompt, as text, in chunks
  of `batch` prompts padded to one shape (left-padded to a multiple of 64)."""
  out, prepared = [], sampling.prepare(model, settings)  # once for every chunk
  for start in range(0, len(prompt_ids), batch):
    chunk = prompt_ids[start:start + batch]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch - real)  # one batch shape, one compilation
    tokens, mask = sampling.left_pad(chunk, tokenizer.pad_id, multiple=64)
    done = jax.device_get(sampling.generate(model, tokens, mask, settings,
                                            jax.random.fold_in(key, start), prepared=prepared))
    texts = rollout.completion_texts(tokenizer, done.tokens, done.lengths)
    n = settings.num_samples
    out += [texts[i * n:(i + 1) * n] for i in range(real)]
  return out


def verified(verifier, prompt_text: str, texts: list[str], extra: dict,
             counts: dict) -> np.ndarray:
  """1/0 per text: does the verifier accept its final answer (a failed
  verification: 0, counted in counts['verify_failures'])."""
  result = rewards.score(verifier, [prompt_text] * len(texts), texts, [extra] * len(texts))
  counts['verify_failures'] += result.failed()
  return (np.nan_to_num(result.total) > 0.5).astype(np.float64)


def label_split(model, tokenizer, rows: list[dict], config, key) -> tuple[list[dict], dict]:
  """Step-labelled rows of one split, and counts."""
  lab = config.labels
  verifier = rewards.build(config.rewards)
  answer_settings = rollout.sampling_config(config.sampling, tokenizer,
                                            num_samples=lab.solutions)
  rollout_settings = rollout.sampling_config(config.sampling, tokenizer,
                                             num_samples=lab.rollouts)
  chats = [tokenizer.encode_chat(r['prompt'], add_generation_prompt=True).ids for r in rows]
  answers = sample(model, tokenizer, chats, answer_settings, jax.random.fold_in(key, 0),
                   batch=config.batch_size)
  counts = {'prompts': len(rows), 'solutions': 0, 'no_steps': 0, 'too_many_steps': 0,
            'correct_solutions': 0, 'rollouts': 0, 'verify_failures': 0}
  candidates, jobs = [], []  # (row, text, steps, ends); (candidate, step, prefix ids)
  for row, chat, texts in zip(rows, chats, answers):
    for text in texts:
      steps, ends = split_steps(text, lab.separator)
      if not steps:
        counts['no_steps'] += 1
        continue
      if len(steps) > lab.max_steps:
        counts['too_many_steps'] += 1
        continue
      index = len(candidates)
      candidates.append((row, text, steps, ends))
      for k in range(len(steps) - 1):
        prefix = text[:ends[k]] + lab.separator
        jobs.append((index, k, chat + tokenizer.encode(prefix)))
  continuations = sample(model, tokenizer, [ids for _, _, ids in jobs], rollout_settings,
                         jax.random.fold_in(key, 1), batch=config.batch_size)
  reached = {}
  for (index, k, _), texts in zip(jobs, continuations):
    row, text, _, ends = candidates[index]
    prefix = text[:ends[k]] + lab.separator
    ok = verified(verifier, rollout.prompt_text(row['prompt']), [prefix + t for t in texts],
                  row['extra'], counts)
    reached[index, k] = ok.mean() if lab.kind == 'soft' else float(ok.max())
    counts['rollouts'] += len(texts)
  out = []
  for index, (row, text, steps, _) in enumerate(candidates):
    correct = float(verified(verifier, rollout.prompt_text(row['prompt']), [text],
                             row['extra'], counts)[0])
    labels = [reached[index, k] for k in range(len(steps) - 1)] + [correct]
    counts['solutions'] += 1
    counts['correct_solutions'] += int(correct)
    out.append({'prompt': row['prompt'], 'steps': steps, 'labels': labels,
                'answer': row['extra'].get(config.answer_key), 'correct': bool(correct),
                'solution': text})
  return out, counts


def outcome_pairs(rows: list[dict]) -> list[dict]:
  """Preference rows from the same samples, for an outcome reward model to
  compare with the PRM on equal data: per prompt, every right answer over
  every wrong one (all comparisons, as reward models are trained from
  rankings)."""
  by_prompt = {}
  for row in rows:
    key = json.dumps(row['prompt'], sort_keys=True)
    by_prompt.setdefault(key, (row['prompt'], [], []))[1 if row['correct'] else 2].append(
        row['solution'])
  return [{'prompt': prompt, 'chosen': good, 'rejected': bad}
          for prompt, right, wrong in by_prompt.values()
          for good, bad in itertools.product(right, wrong)]


def summary(rows: list[dict], counts: dict) -> dict:
  """Counts plus label statistics: by step index, and how often an answer
  holds a step labelled bad (< 0.5) before its end."""
  labels = [np.asarray(r['labels']) for r in rows]
  by_index = {}
  for ls in labels:
    for k, label in enumerate(ls):
      by_index.setdefault(k + 1, []).append(label)
  return counts | {
      'steps_per_solution': float(np.mean([len(ls) for ls in labels])) if labels else 0.0,
      'mean_label': float(np.mean(np.concatenate(labels))) if labels else 0.0,
      'mean_label_by_step': {k: float(np.mean(v)) for k, v in sorted(by_index.items())},
      'solutions_with_a_bad_step': float(np.mean([(ls < 0.5).any() for ls in labels]))
                                   if labels else 0.0,
      'wrong_with_good_first_step': int(sum(1 for r, ls in zip(rows, labels)
                                            if not r['correct'] and ls[0] >= 0.5))}


def _validate(config):
  rollout.check_answer_key(config)
  lab = config.labels
  if lab.kind not in LABELS:
    raise ConfigError(f'config.labels.kind={lab.kind!r}; use one of {LABELS}.')
  for name in ('solutions', 'rollouts', 'max_steps'):
    if lab[name] < 1:
      raise ConfigError(f'config.labels.{name}={lab[name]} must be >= 1.')
  if not lab.separator:
    raise ConfigError('config.labels.separator is empty; use e.g. "\\n".')
  if config.sampling.temperature <= 0:
    raise ConfigError('config.sampling.temperature must be > 0: greedy continuations of a step '
                      'are all the same, so they cannot estimate how often it leads somewhere.')
  if not config.splits:
    raise ConfigError("config.splits is empty; name at least one, e.g. {'train': "
                      "('arith:multi_train',)}.")
  for split, limit in config.max_prompts.items():
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
      raise ConfigError(f'config.max_prompts.{split}={limit!r}: a number of prompts >= 0 '
                        '(0: every prompt of the split).')


def _write(path: pathlib.Path, rows: list[dict]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')


@register('prm_labels')
def run(config, workdir):
  _validate(config)
  model, tokenizer = load_model_and_tokenizer(config.model)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  key, stats = jax.random.key(config.seed), {}
  for i, (split, sources) in enumerate(config.splits.items()):
    start = time.perf_counter()
    data, _ = pipeline.build('prompt', pipeline.resolve_sources(list(sources)), tokenizer,
                             batch_size=1, max_len=config.max_prompt_len, num_epochs=1, seed=0,
                             policy='error', drop_remainder=False)
    rows = [{'prompt': b['prompt'][0], 'extra': b['extra'][0]} for b in data]
    limit = config.max_prompts.get(split, 0)  # 0 or no entry: every prompt, as in pairs
    rows = rows[:limit] if limit else rows
    labelled, counts = label_split(model, tokenizer, rows, config, jax.random.fold_in(key, i))
    path = workdir / f'steps_{split}.jsonl'
    _write(path, labelled)
    pairs = outcome_pairs(labelled)
    _write(workdir / f'pairs_{split}.jsonl', pairs)
    stats[split] = summary(labelled, counts) | {'outcome_pairs': len(pairs),
                                                'seconds': time.perf_counter() - start}
    print(f'{split}: {len(labelled)} labelled solutions -> {path}', flush=True)
    print(json.dumps(stats[split], indent=1), flush=True)
  # Merged with the file's other splits: a split can be labelled again alone.
  path = workdir / 'labels_stats.json'
  earlier = json.loads(path.read_text()) if path.exists() else {}
  path.write_text(json.dumps(earlier | stats, indent=1) + '\n')
  return stats
