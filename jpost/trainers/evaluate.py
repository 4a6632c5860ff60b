"""The `eval` recipe: compare models on held-out prompts and write a report.

For every model in `config.models` (name -> checkpoint, embedded name, or a
`completions_*.jsonl` file an earlier eval wrote): a greedy answer and
`sampling.num_samples` sampled answers per prompt. Then:

- ground truth with the RL verifiers: greedy accuracy (Wilson interval),
  pass@k and maj@k over the samples;
- optionally a point-wise rubric judge (`config.rubric`, the rubric reward);
- optionally best-of-n reranking of the samples by a process reward model,
  an outcome reward model and majority vote (`config.rerank`);
- pairwise battles between every two models on the greedy answers, judged by
  the verifier (correct beats wrong; both right = tie; both wrong =
  both_bad) or by an LLM judge with positions swapped (`pairwise.judge`);
  a Bradley-Terry leaderboard with bootstrap intervals and a win matrix;
- report.md / report.html with tables and plots, results.json, and each
  model's completions (reusable as input).
"""

from __future__ import annotations

import collections
import itertools
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from jpost import rewards, sampling
from jpost import eval as ev
from jpost.data import pipeline
from jpost.errors import ConfigError
from jpost.eval import general, rerank
from jpost.eval.local_judge import preference_margin
from jpost.eval.leaderboard import leaderboard
from jpost.models import hf, pretrained
from jpost.tokenizer import Tokenizer
from jpost.trainers import loop, register, rollout
from jpost.trainers.generate import load_model_and_tokenizer

PAIRWISE_JUDGES = ('verifier', 'endpoint', 'none')
GENERAL_JUDGES = ('likelihood', 'endpoint', 'reward_model', 'none')


def prompt_rows(config, tokenizer: Tokenizer, sources=None, max_len=None) -> list[dict]:
  data, _ = pipeline.build('prompt', pipeline.resolve_sources(list(sources or config.data.eval)),
                           tokenizer, batch_size=config.batch_size,
                           max_len=max_len or config.data.max_prompt_len, num_epochs=1, seed=0,
                           policy=config.data.policy, drop_remainder=False)
  return list(data)


def sample_model(path: str, config, *, sources=None, max_prompt_len=None,
                 max_new_tokens=None, with_samples: bool = True) -> list[dict]:
  """Greedy (and, `with_samples`, sampled) answers of one model to every
  prompt of `sources` (default: the eval data)."""
  model_cfg = config.model.copy_and_resolve_references()
  with model_cfg.unlocked():
    model_cfg.path = path
  model, tokenizer = load_model_and_tokenizer(model_cfg)
  sampled = rollout.sampling_config(config.sampling, tokenizer)
  greedy = sampling.SamplingConfig(max_new_tokens=max_new_tokens or sampled.max_new_tokens,
                                   temperature=0.0, stop_ids=sampled.stop_ids,
                                   scan_layers=sampled.scan_layers)
  out, n = [], sampled.num_samples if with_samples else 0
  prepared = sampling.prepare(model, greedy)  # for every batch, greedy and sampled
  # Several processes: each answers every process_count-th batch on its own
  # devices; the keys follow the batch, so the answers do not depend on it.
  for i, batch in loop.this_process_share(prompt_rows(config, tokenizer, sources,
                                                      max_prompt_len)):
    key = jax.random.fold_in(jax.random.key(config.seed), i)
    mask = batch['segment_ids'] > 0
    first = jax.device_get(sampling.generate(model, batch['tokens'], mask, greedy, key,
                                             prepared=prepared))
    texts = rollout.completion_texts(tokenizer, first.tokens, first.lengths)
    samples = [[]] * len(texts)
    if with_samples:
      many = jax.device_get(sampling.generate(model, batch['tokens'], mask, sampled, key,
                                              prepared=prepared))
      flat = rollout.completion_texts(tokenizer, many.tokens, many.lengths)
      samples = [flat[j * n:(j + 1) * n] for j in range(len(texts))]
    out.append((i, [{'prompt': rollout.prompt_text(prompt), 'extra': batch['extra'][j],
                     'greedy': texts[j], 'truncated': bool(first.truncated[j]),
                     'samples': samples[j]}
                    for j, prompt in enumerate(batch['prompt'])]))
  return loop.merge_in_order(out)


def load_completions(path: pathlib.Path) -> list[dict]:
  """A completions file's rows (blank lines skipped); every row must carry the
  same number of samples, since pass@k and maj@k compare prompts at one k."""
  rows, first = [], None  # first: (sample count, where) of the first row
  for line_no, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    where = f'{path}:{line_no}'
    try:
      row = json.loads(line)
    except ValueError as e:
      raise ConfigError(f'{where}: not a JSON object ({e}).') from None
    if not isinstance(row, dict):
      raise ConfigError(f'{where}: not a JSON object ({type(row).__name__}).')
    missing = {'prompt', 'greedy', 'samples', 'extra'} - set(row)
    if missing:
      raise ConfigError(f'{where}: completions row lacks {sorted(missing)}; use a '
                       'file written by the eval recipe (completions_NAME.jsonl).')
    if not (isinstance(row['samples'], list) and all(isinstance(t, str) for t in row['samples'])):
      raise ConfigError(f'{where}: "samples" must be a list of answer texts.')
    first = first or (len(row['samples']), where)
    if len(row['samples']) != first[0]:
      raise ConfigError(f'{where}: {len(row["samples"])} samples where {first[1]} has '
                        f'{first[0]}; every row of a completions file needs the same number '
                        'of samples.')
    rows.append(row)
  if not rows:
    raise ConfigError(f'{path}: no completions rows.')
  return rows


VERIFIER = 'math'  # the ground truth: answers checked against answer_key


def check_rewards(rewards_config) -> None:
  """The eval's rewards are the verifier alone: correctness is its own
  verdict, and maj@k groups answers by its equivalence."""
  names = set(rewards_config)
  if names != {VERIFIER}:
    raise ConfigError(
        f'config.rewards has {sorted(names)}; the eval scores answers with the {VERIFIER!r} '
        f'verifier alone (correct or not, as maj@k compares them): give only rewards.{VERIFIER}.')
  weight = rewards_config[VERIFIER].get('weight', 1.0)
  if weight != 1.0:
    raise ConfigError(f'config.rewards.{VERIFIER}.weight={weight}: the eval reads the '
                      "verifier's verdict, which a weight does not change; leave it at 1.")


def correctness(reward_fns, rows: list[dict], texts_of) -> tuple[np.ndarray, int]:
  """(verifier score of each row's texts [P, n], 1/0, a failed verification
  counting 0 (not correct); how many verifications failed: raised, timed out,
  NaN or a bad type)."""
  prompts, texts, extras = [], [], []
  for row in rows:
    for text in texts_of(row):
      prompts.append(row['prompt'])
      texts.append(text)
      extras.append(row['extra'])
  result = rewards.score(reward_fns, prompts, texts, extras)
  # The verifier's own 0/1, not a weighted sum that other settings would move.
  verdict = np.nan_to_num(result.per_source[VERIFIER], nan=0.0)
  return verdict.reshape(len(rows), -1), result.failed()


def ground_truth(rows: list[dict], reward_fns, answer_key: str,
                 verify_timeout: float = 5.0) -> dict[str, Any]:
  (greedy, greedy_failed), (samples, samples_failed) = (
      correctness(reward_fns, rows, lambda r: [r['greedy']]),
      correctness(reward_fns, rows, lambda r: r['samples']))
  greedy = greedy[:, 0]
  k = samples.shape[1]
  report = ev.accuracy_report([list(s > 0.5) for s in samples], ks=tuple(sorted({1, k})))
  vote_failures = 0

  def equivalent(a, b):  # maj@k groups answers; one it cannot decide stands alone
    nonlocal vote_failures
    try:
      return rewards.is_equivalent(a, b, timeout=verify_timeout)
    except rewards.VerifyTimeout:
      vote_failures += 1
      return False
  majority = [ev.maj_at_k([rewards.extract_answer(t) for t in r['samples']],
                          str(r['extra'][answer_key]), k, equivalent)
              for r in rows]
  low, high = ev.wilson_interval(float(np.sum(greedy > 0.5)), len(rows))
  return {'greedy_accuracy': float(np.mean(greedy > 0.5)), 'greedy_low': low,
          'greedy_high': high, 'sampled_accuracy': report['accuracy'],
          f'pass@{k}': report[f'pass@{k}'], f'maj@{k}': float(np.mean(majority)),
          'truncated': float(np.mean([r['truncated'] for r in rows])),
          'length_chars': float(np.mean([len(r['greedy']) for r in rows])),
          # Counted as wrong above (and as no match in maj@k's votes).
          'verify_failures': greedy_failed + samples_failed + vote_failures,
          '_greedy': greedy, '_per_prompt': samples.mean(axis=1),
          '_samples': (samples > 0.5).astype(np.float64)}


def _row_key(row: dict) -> str:
  return json.dumps([row['prompt'], row['extra']], sort_keys=True, ensure_ascii=False)


def align(outputs: dict) -> dict:
  """Every model's rows in the first model's prompt order, so battles compare
  answers to the same prompt (a prompt given twice: its rows in turn); a
  prompt some model lacks, or has another number of times, is an error."""
  names = list(outputs)
  order = [_row_key(r) for r in outputs[names[0]]]
  for name in names[1:]:
    by_key = collections.defaultdict(collections.deque)
    for row in outputs[name]:
      by_key[_row_key(row)].append(row)
    wanted = collections.Counter(order)
    missing = [k for k in wanted if len(by_key.get(k, ())) != wanted[k]]
    if missing or len(outputs[name]) != len(order):
      raise ConfigError(
          f'model {name!r} answered other prompts than {names[0]!r} ({len(missing)} of '
          f'{len(wanted)} prompts missing or answered another number of times, e.g. '
          f'{missing[:1]}); evaluate every model on the same data.')
    outputs[name] = [by_key[k].popleft() for k in order]
  return outputs


def verifier_battles(names: list[str], correct: dict[str, np.ndarray]) -> list[dict]:
  battles = []
  for a, b in itertools.combinations(names, 2):
    for i, (ca, cb) in enumerate(zip(correct[a] > 0.5, correct[b] > 0.5)):
      winner = ('tie' if ca and cb else 'both_bad' if not (ca or cb)
                else 'model_a' if ca else 'model_b')
      battles.append({'model_a': a, 'model_b': b, 'winner': winner, 'prompt': i})
  return battles


def judge_battles(names, outputs, pairwise) -> tuple[list[dict], int]:
  chat = rewards.openai_chat(pairwise.endpoint, pairwise.model, temperature=0.0, seed=0,
                             max_tokens=256, timeout=60.0)
  battles, failures = [], 0
  for a, b in itertools.combinations(names, 2):
    for i, (ra, rb) in enumerate(zip(outputs[a], outputs[b])):
      result = ev.judge_pair(chat, ra['prompt'], ra['greedy'], rb['greedy'],
                             retries=pairwise.retries)
      if result.outcome is None:
        failures += 1
        continue
      battles.append(ev.to_battle(a, b, result, prompt=i))
  return battles, failures


def general_section(config, names: list[str], results: dict) -> ev.Section:
  """The forgetting check's first half (jpost.eval.general) for every model
  given by its weights: NLL on general text, and its drift from the first
  model (the anchor) on the same windows; added to each model's results."""
  g = config.general
  text = general.general_text(g.text)
  nll, windows = {}, {}
  for name in names:
    source = str(config.models[name])
    if source.endswith('.jsonl'):
      continue  # saved completions: no weights to score text with
    path = pretrained.resolve(source)
    windows[name] = general.windows(Tokenizer.from_dir(path).encode(text), g.chunks, g.tokens)
    nll[name] = general.window_nll(hf.load(path, dtype=config.model.dtype,
                                           param_dtype=config.model.param_dtype), windows[name])
    results[name] |= {f'general_{k}': v for k, v in general.summary(
        nll[name], rounds=g.bootstrap_rounds, seed=config.seed).items()}
  anchor = names[0]
  for name in nll:
    if name != anchor and anchor in nll and np.array_equal(windows[name], windows[anchor]):
      results[name] |= {f'general_{k}': v for k, v in general.drift(
          nll[name], nll[anchor], rounds=g.bootstrap_rounds, seed=config.seed).items()}
  return ev.Section(
      title='General text (forgetting check)',
      text=f'mean next-token NLL on {g.chunks} windows of {g.tokens} tokens of {g.text!r} '
      f'(bootstrap 95% intervals over windows); drift = NLL minus {anchor}\'s on the same '
      'windows (paired), for models with its tokenizer. A positive drift is forgetting.',
      table=[{'model': n, **{k[8:]: v for k, v in results[n].items()
                             if k.startswith('general_')}} for n in nll])


def instruction_judge(config, anchor: str):
  """(judge(prompt, answer, anchor_answer) -> 'win'|'loss'|'tie'|'both_bad'|None
  for failed, description) for `general.judge`."""
  g = config.general
  if g.judge == 'reward_model':
    from jpost.models import reward
    scorer = reward.load_scorer(g.judge_model)

    def by_reward(prompt, answer, anchor_answer):
      mine, theirs = scorer([prompt, prompt], [answer, anchor_answer])
      return 'win' if mine > theirs else 'loss' if mine < theirs else 'tie'
    return by_reward, f'the reward model {g.judge_model!r} (higher score wins)'
  if g.judge == 'endpoint':
    chat = rewards.openai_chat(g.endpoint, g.model, temperature=0.0, seed=0, max_tokens=256,
                               timeout=60.0)
    what = f'{g.model!r} at {g.endpoint} (pairwise prompt, both orders)'
  else:  # 'likelihood': a local model's verdict probabilities, both orders
    source = g.judge_model or str(config.models[anchor])
    path = pretrained.resolve(source)
    model, tokenizer = hf.load(path, dtype='float32'), Tokenizer.from_dir(path)

    def by_likelihood(prompt, answer, anchor_answer):
      margin = preference_margin(model, tokenizer, prompt, answer, anchor_answer)
      return 'win' if margin > g.margin else 'loss' if margin < -g.margin else 'tie'
    return by_likelihood, (f'{source!r} by verdict likelihood (pairwise prompt in both orders, '
                           f'position bias cancelled; a margin within {g.margin} nats is a tie)')

  def by_chat(prompt, answer, anchor_answer):
    outcome = ev.judge_pair(chat, prompt, answer, anchor_answer, retries=g.retries).outcome
    return {'1': 'win', '2': 'loss', None: None}.get(outcome, outcome)
  return by_chat, what


def judged_section(config, names: list[str], answers: dict, results: dict) -> ev.Section:
  """The forgetting check's second half: every model's answers to general
  instructions judged against the anchor's (the starting model's)."""
  g, anchor = config.general, names[0]
  judge, what = instruction_judge(config, anchor)
  table = []
  for name in answers:
    if name == anchor:
      continue
    outcomes = [judge(mine['prompt'], mine['greedy'], theirs['greedy'])
                for mine, theirs in zip(answers[name], answers[anchor])]
    judged = [o for o in outcomes if o is not None]
    if not judged:
      raise ConfigError(f'general.judge={g.judge!r}: every judgement of {name!r} failed; '
                        'check the judge (endpoint, model or judge_model).')
    stats = general.win_rate(judged, rounds=g.bootstrap_rounds, seed=config.seed)
    stats['failures'] = len(outcomes) - len(judged)
    results[name] |= {f'general_{k}': v for k, v in stats.items()}
    table.append({'model': name, **stats})
  return ev.Section(
      title='General instructions (forgetting check, judged)',
      text=f'{len(answers[anchor])} general instructions ({g.instructions!r}) answered greedily '
      f'(at most {g.max_new_tokens} tokens) by each model and by {anchor}; judged by {what}. '
      'win rate counts ties and both-bad as half; 0.5 = no difference the judge sees, below '
      '0.5 = forgetting. 95% bootstrap intervals over instructions.', table=table)


def drift_vs_gain(names: list[str], results: dict) -> ev.Section:
  """One row per trained model: the task gain next to both forgetting measures."""
  anchor, rows = names[0], []
  for name in names[1:]:
    r = results[name]
    rows.append({'model': name,
                 'task_gain': r['greedy_accuracy'] - results[anchor]['greedy_accuracy'],
                 **{k: r.get(f'general_{k}') for k in ('drift_nll', 'drift_low', 'drift_high',
                                                       'win_rate', 'win_rate_low',
                                                       'win_rate_high')}})
  return ev.Section(title='Forgetting next to task gain',
                    text=f'task gain = greedy accuracy minus {anchor}\'s; drift_nll > 0 and '
                    'win_rate < 0.5 are forgetting (None: that check did not run).', table=rows)


def rerank_section(config, names: list[str], outputs: dict, results: dict) -> ev.Section:
  """Best-of-n over each model's sampled answers: picked by the process
  reward model (`rerank.prm`, each aggregate), by the outcome reward model
  (`rerank.reward_model`), by majority vote; a random pick and pass@n bound it."""
  from jpost.models import reward
  r = config.rerank
  step_scorer = reward.load_step_scorer(r.prm, separator=r.separator or None) if r.prm else None
  outcome = reward.load_scorer(r.reward_model) if r.reward_model else None
  table = []
  for name in names:
    correct, rows = results[name]['_samples'], outputs[name]
    n = correct.shape[1]
    prompts, samples = [row['prompt'] for row in rows], [row['samples'] for row in rows]
    entry = {'model': name, 'n': n, 'random': float(correct.mean()),
             'majority': results[name][f'maj@{n}']}
    if step_scorer is not None:
      for how, scores in rerank.prm_scores(step_scorer, prompts, samples, r.aggregates,
                                           step_scorer.separator).items():
        entry[f'prm_{how}'] = rerank.best_of_n(scores, correct)
    if outcome is not None:
      entry['reward_model'] = rerank.best_of_n(rerank.outcome_scores(outcome, prompts, samples),
                                               correct)
    entry['pass'] = results[name][f'pass@{n}']
    results[name] |= {f'best_of_n_{k}': v for k, v in entry.items() if k not in ('model', 'n')}
    table.append(entry)
  return ev.Section(
      title='Best-of-n reranking',
      text='accuracy of the one sampled answer each method keeps per prompt: random = the mean '
      'sampled accuracy; majority = the most common final answer; prm_AGG = the highest '
      f'aggregate of the process reward model {r.prm!r} over its steps; '
      f'reward_model = the highest score of {r.reward_model!r}; pass = some sample is right '
      '(the ceiling). Tied picks count as a random choice among them.', table=table)


def _save_rows(path: pathlib.Path, rows: list[dict]) -> None:
  if jax.process_index() == 0:
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))


@register('eval')
def run(config, workdir):
  if workdir is None:
    raise ConfigError('--workdir is required: the report is written there.')
  if config.pairwise.judge not in PAIRWISE_JUDGES:
    raise ConfigError(f'config.pairwise.judge={config.pairwise.judge!r}; use one of '
                     f'{PAIRWISE_JUDGES}.')
  rollout.check_answer_key(config)
  check_rewards(config.rewards)
  if (config.rerank.prm or config.rerank.reward_model) and config.sampling.num_samples < 2:
    raise ConfigError(f'config.rerank picks the best of sampling.num_samples answers, which is '
                      f'{config.sampling.num_samples}: sample 2 or more, or unset rerank.')
  judged = bool(config.general.instructions) and config.general.judge != 'none'
  if config.general.judge not in GENERAL_JUDGES:
    raise ConfigError(f'config.general.judge={config.general.judge!r}; use one of '
                      f'{GENERAL_JUDGES}.')
  if judged and config.general.judge == 'reward_model' and not config.general.judge_model:
    raise ConfigError("config.general.judge='reward_model' needs general.judge_model: a reward "
                      'model directory (configs/reward.py exports one to WORKDIR/hf).')
  instructions = general.instructions_source(config.general.instructions) if judged else None
  # Judged against the anchor: only with one more model given by its weights.
  if sum(not str(path).endswith('.jsonl') for path in config.models.values()) < 2:
    instructions = None
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  loop.start_processes(config)
  names = list(config.models)
  if not names:
    raise ConfigError('config.models is empty: give {name: checkpoint path or completions file}.')
  if config.anchor:
    if config.anchor not in names:
      raise ConfigError(f'config.anchor={config.anchor!r} is not one of the models {names}.')
    names.remove(config.anchor)
    names.insert(0, config.anchor)
  reward_fns = rewards.build(config.rewards)
  outputs, general_answers = {}, {}
  for name in names:
    source = pathlib.Path(str(config.models[name]))
    if source.suffix == '.jsonl':
      outputs[name] = load_completions(source)
    else:
      outputs[name] = sample_model(str(config.models[name]), config)
      _save_rows(workdir / f'completions_{name}.jsonl', outputs[name])
      if instructions:
        general_answers[name] = sample_model(
            str(config.models[name]), config, sources=[instructions], max_prompt_len=256,
            max_new_tokens=config.general.max_new_tokens, with_samples=False)
        _save_rows(workdir / f'general_answers_{name}.jsonl', general_answers[name])
  if jax.process_index() != 0:
    return {}  # the answers are sampled; process 0 scores, judges and reports
  outputs, results = align(outputs), {}
  for name in names:
    results[name] = ground_truth(outputs[name], reward_fns, config.answer_key,
                                 config.rewards.get('math', {}).get('verify_timeout', 5.0))
    failed = results[name]['verify_failures']
    print(f'{name}: greedy accuracy {results[name]["greedy_accuracy"]:.3f} on '
          f'{len(outputs[name])} prompts' + (f'; {failed} verifications failed (counted as '
                                             'wrong)' if failed else ''), file=sys.stderr)
  sizes = {len(v) for v in outputs.values()}
  forgetting = general_section(config, names, results) if config.general.chunks else None

  sections = [ev.Section(
      title='Ground truth',
      text=f'{sizes.pop()} prompts; greedy accuracy with a Wilson 95% interval; pass@k and '
      'maj@k over the sampled answers (`sampling` in the config).',
      table=[{'model': n, **{k: v for k, v in r.items() if not k.startswith('_')}}
             for n, r in results.items()],
      images=[ev.plot_scores({n: r['_per_prompt'] for n, r in results.items()},
                             workdir / 'per_prompt_accuracy.png')])]
  if forgetting is not None:
    sections.append(forgetting)
  if names[0] in general_answers and len(general_answers) > 1:
    sections.append(judged_section(config, names, general_answers, results))
  if len(names) > 1 and (forgetting is not None or len(general_answers) > 1):
    sections.append(drift_vs_gain(names, results))
  if config.rerank.prm or config.rerank.reward_model:
    sections.append(rerank_section(config, names, outputs, results))
  if config.rubric.name:
    rubric_fns = rewards.build({'rubric': {'rubric': config.rubric.name,
                                           'judge': dict(config.rubric.judge)}})
    scores = {}
    for name in names:
      result = rewards.score(rubric_fns, [r['prompt'] for r in outputs[name]],
                             [r['greedy'] for r in outputs[name]],
                             [r['extra'] for r in outputs[name]])
      scores[name] = result.per_source['rubric']
      results[name]['rubric'] = float(np.nanmean(scores[name]))
      results[name]['rubric_failures'] = int(np.sum(np.isnan(scores[name])))
    sections.append(ev.Section(
        title='Rubric judge', text=f'rubric {config.rubric.name!r}; score in [0, 1].',
        table=[{'model': n, 'rubric': results[n]['rubric'],
                'failures': results[n]['rubric_failures']} for n in names],
        images=[ev.plot_scores({n: s[np.isfinite(s)] for n, s in scores.items()},
                               workdir / 'rubric_scores.png')]))
  board = []
  if len(names) > 1 and config.pairwise.judge != 'none':
    if config.pairwise.judge == 'verifier':
      battles, failures = verifier_battles(names, {n: results[n]['_greedy'] for n in names}), 0
    else:
      battles, failures = judge_battles(names, outputs, config.pairwise)
    (workdir / 'battles.jsonl').write_text(''.join(json.dumps(b) + '\n' for b in battles))
    board = leaderboard(battles, models=names, anchor=names[0],
                        rounds=config.pairwise.bootstrap_rounds, seed=config.seed)
    sections.append(ev.Section(
        title='Leaderboard',
        text=f'{len(battles)} battles on the greedy answers, judged by {config.pairwise.judge} '
        f'({failures} failed judgements left out); Bradley-Terry ratings anchored at '
        f'{names[0]} = 1000, {config.pairwise.bootstrap_rounds}-round bootstrap 95% intervals.',
        table=board, images=[ev.plot_leaderboard(board, workdir / 'leaderboard.png'),
                             ev.plot_win_matrix(battles, workdir / 'win_matrix.png',
                                                models=names)]))
  examples = [{'prompt': outputs[names[0]][i]['prompt'],
               **{n: outputs[n][i]['greedy'][:200] for n in names}}
              for i in range(min(config.report_examples, len(outputs[names[0]])))]
  sections.append(ev.Section(title='Examples (greedy)', table=examples))
  report = ev.write_report(workdir, title=config.title, sections=sections)
  summary = {n: {k: v for k, v in r.items() if not k.startswith('_')}
             for n, r in results.items()}
  (workdir / 'results.json').write_text(json.dumps(
      {'models': summary, 'leaderboard': board}, indent=2, default=float) + '\n')
  print(f'report: {report}', file=sys.stderr)
  return {'models': summary, 'leaderboard': board, 'report': str(report)}
