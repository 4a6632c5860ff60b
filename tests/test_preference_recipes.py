"""The reward, DPO and pairs recipes end to end on the tiny model."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from jpost.trainers import pairs
import xla_env


def _pairs_file(path, n=12):
  rows = []
  for i in range(n):
    a, b = i + 2, i + 5
    rows.append({'prompt': [{'role': 'user', 'content': f'What is {a} + {b}?'}],
                 'chosen': [{'role': 'assistant', 'content': f'{a} + {b} = {a + b}'}],
                 'rejected': [{'role': 'assistant', 'content': f'I think it is {a * b + 1}.'}]})
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def _run(config, workdir, *extra):
  env = xla_env.env(2)
  return subprocess.run([sys.executable, '-m', 'jpost.main', f'--config={config}',
                         f'--workdir={workdir}', *extra],
                        capture_output=True, text=True, timeout=900, env=env)


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def pair_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('pairs')
  return _pairs_file(folder / 'train.jsonl'), _pairs_file(folder / 'test.jsonl', n=4)


def _data_flags(checkpoint, pair_files):
  train, test = pair_files
  return [f'--config.model.path={checkpoint}', f'--config.data.train=("{train}",)',
          f'--config.data.eval=("{test}",)',
          '--config.transfer_guard=disallow']  # an implicit transfer in a step fails


def test_reward_recipe_trains_evaluates_and_exports(tiny_checkpoint, pair_files, tmp_path):
  # Two training sources mixed 0.7 / 0.3; the mixture is the training
  # stream's, and the one held-out source is read whole.
  train = pair_files[0]
  flags = [f for f in _data_flags(tiny_checkpoint, pair_files) if 'data.train' not in f]
  proc = _run('configs/reward.py:tiny', tmp_path, *flags,
              f'--config.data.train=("{train}","{train}")', '--config.data.weights=(0.7,0.3)',
              '--config.optim.lr=1e-3', '--config.total_steps=6')
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The predicted activations: both sides of the pairs, no LM head (a scalar one).
  assert re.search(r'step activations up to [\d.]+ MB per device, predicted \(saved [\d.]+, '
                   r'layer backward [\d.]+, attention [\d.]+, LM head 0\.0\)', proc.stderr)
  records = _metrics(tmp_path)
  assert {'accuracy', 'margin', 'chosen_reward', 'rejected_reward'} <= set(records[1])
  evals = [r for r in records if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [0, 6]
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss']  # learns the easy pairs
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['architectures'] == ['LlamaForSequenceClassification']


def _dpo(tmp_path, checkpoint, pair_files, *extra):
  return _run('configs/dpo.py:tiny', tmp_path, *_data_flags(checkpoint, pair_files),
              '--config.total_steps=3', '--config.eval_every=3', *extra)


def test_dpo_cached_and_on_the_fly_references_agree(tiny_checkpoint, pair_files, tmp_path):
  # The cached run evaluates its 4 held-out pairs as one batch of 6, filled
  # up with 2 empty pairs (no reference to look up, no weight); the other
  # in batches of 2.
  cached = _dpo(tmp_path / 'cache', tiny_checkpoint, pair_files, '--config.eval_batch_size=6')
  assert cached.returncode == 0, cached.stderr[-3000:]
  assert (tmp_path / 'cache' / 'reference_logps.npz').exists()
  fly = _dpo(tmp_path / 'fly', tiny_checkpoint, pair_files, '--config.dpo.reference=on_the_fly',
             '--config.dpo.kl_prompts=0', '--config.export_hf=False')  # the cached run checks those
  assert fly.returncode == 0, fly.stderr[-3000:]
  a, b = _metrics(tmp_path / 'cache'), _metrics(tmp_path / 'fly')
  # Policy == reference at the start: every DPO loss starts at exactly log 2.
  assert a[0]['eval_loss'] == pytest.approx(np.log(2), abs=1e-5)
  assert a[1]['loss'] == pytest.approx(np.log(2), abs=1e-5)
  for ra, rb in zip(a, b):
    for key in ('loss', 'eval_loss', 'rewards/margin'):
      if key in ra:
        assert ra[key] == pytest.approx(rb[key], abs=1e-5), key
  assert a[-1]['eval_rewards/margin'] > 0 and np.isfinite(a[-1]['eval_logps/chosen'])
  kl = json.loads((tmp_path / 'cache' / 'kl.json').read_text())
  assert kl['samples'] == 2 and np.isfinite(kl['kl_per_token']) and np.isfinite(kl['kl_per_sequence'])


@pytest.mark.parametrize('change, message', [
    ({'dpo.loss_type': 'kto'}, r"config.dpo: loss_type 'kto' unknown"),
    ({'dpo.beta': 0.0}, r'config.dpo: beta must be > 0'),
    ({'dpo.loss_type': 'cdpo'}, r"config.dpo: loss_type='cdpo' needs 0 < label_smoothing < 0.5"),
    ({'dpo.reference': 'on_the_fly', 'lora.adapter': 'runs/sft/adapter'},
     r"reference='on_the_fly' with config.lora.adapter='runs/sft/adapter': the reference would "
     r'be the base'),
])
def test_bad_dpo_options_fail_before_any_work(tiny_checkpoint, tmp_path, change, message):
  """Checked at the start, not when the loss is first traced (after the model
  loaded and the reference pass ran)."""
  sys.path.insert(0, 'configs')
  import dpo as dpo_config
  import overrides
  from jpost.errors import ConfigError
  from jpost.trainers import dpo
  config = overrides.apply(dpo_config.get_config('tiny').unlock(),
                           {'model.path': str(tiny_checkpoint), **change})
  with pytest.raises(ConfigError, match=message):
    dpo.run(config, str(tmp_path))
  assert not any(tmp_path.iterdir())


def test_dpo_stale_reference_cache_is_a_clear_error(tiny_checkpoint, pair_files, tmp_path):
  # A cache left by a run on other data (its keys are other pairs' tokens).
  (tmp_path / 'run').mkdir()
  np.savez(tmp_path / 'run' / 'reference_logps.npz', keys=np.asarray(['0' * 40, '1' * 40]),
           chosen=np.zeros(2, np.float32), rejected=np.zeros(2, np.float32))
  second = _dpo(tmp_path / 'run', tiny_checkpoint, pair_files)
  assert second.returncode != 0
  assert 'no reference log-probs' in second.stderr and 'Delete the file' in second.stderr


# IPO and cDPO train LoRA adapters (their reference: the policy with its
# adapters off, computed in the loss or cached before the first step).
@pytest.mark.parametrize('loss_type, reference', [
    ('ipo', 'lora_on_the_fly'), ('simpo', None), ('cdpo', 'lora_cache')])
def test_dpo_family_runs(tiny_checkpoint, pair_files, tmp_path, loss_type, reference):
  extra = ['--config.dpo.label_smoothing=0.1'] if loss_type == 'cdpo' else []
  if reference:
    extra += ['--config.lora.rank=4', '--config.optim.warmup_steps=0',
              f'--config.dpo.reference={reference.removeprefix("lora_")}']
  # The KL check and the export are the same for every loss: the test above runs them.
  proc = _dpo(tmp_path, tiny_checkpoint, pair_files, f'--config.dpo.loss_type={loss_type}',
              '--config.dpo.kl_prompts=0', '--config.export_hf=False', *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = _metrics(tmp_path)
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  cached = loss_type != 'simpo' and reference != 'lora_on_the_fly'
  assert cached == (tmp_path / 'reference_logps.npz').exists()
  if reference:  # the policy starts as its reference, then moves away from it
    steps = [r for r in records if 'loss' in r]
    assert abs(steps[0]['rewards/margin']) < 1e-6 and abs(steps[-1]['rewards/margin']) > 1e-4
    from jpost.models import hf
    assert steps[0]['memory/trainable_params'] < 0.01 * hf.load(tiny_checkpoint).config.num_params()


def test_choose_pair_needs_a_real_gap():
  assert pairs.choose_pair(np.array([0.0, 1.0, 0.0, 1.0]), 0.5) == (1, 0)
  assert pairs.choose_pair(np.array([1.0, 1.0, 1.0]), 0.5) is None
  assert pairs.choose_pair(np.array([0.2, 0.5]), 0.5) is None
  assert pairs.choose_pair(np.array([np.nan, 1.0, 0.0]), 0.5) == (1, 2)  # failures never win


def test_pairs_recipe_writes_ranked_preference_rows(char_checkpoint, tmp_path):
  sys.path.insert(0, 'configs')
  import pairs as pairs_config
  from jpost import rewards
  from jpost.data import pipeline, rows

  @rewards.register('digit_share_pairs')
  def share(prompt, completion, row):
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)

  config = pairs_config.get_config('tiny').unlock()
  config.model.path = str(char_checkpoint)
  config.data.max_prompt_len = 80
  config.rewards = {'digit_share_pairs': {'weight': 1.0}}
  config.pairs.min_gap = 0.01
  config.pairs.best_min_score = 0.05
  try:
    result = pairs.run(config.lock(), tmp_path)
  finally:
    rewards.unregister('digit_share_pairs')
  train = result['train']
  assert train['prompts'] == 8 and train['samples'] == 32
  assert train['pairs'] + train['no_gap'] + train['identical'] == 8 and train['pairs'] >= 4
  written = [json.loads(line) for line in (tmp_path / 'pairs_train.jsonl').read_text().splitlines()]
  assert len(written) == train['pairs']
  for row in written:
    assert row['chosen_score'] >= row['rejected_score'] + 0.01 and 'answer' in row
  best = [json.loads(line) for line in (tmp_path / 'best_of_n_train.jsonl').read_text().splitlines()]
  assert len(best) == train['best_of_n'] and all(r['score'] >= 0.05 for r in best)
  pipeline.load_examples(str(tmp_path / 'best_of_n_train.jsonl'), 'sft', rows.RowFilter(policy='error'))
  # The rows are valid preference rows for the reward and DPO recipes.
  examples = pipeline.load_examples(str(tmp_path / 'pairs_train.jsonl'), 'preference',
                                    rows.RowFilter(policy='error'))
  assert len(examples) == len(written)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dpo_head_on_response_tokens_alone_equals_the_whole_head(tiny_checkpoint, pair_files,
                                                                 dtype):
  """On one device DPO's head runs on the response tokens alone, 8 rows x 4
  of them a piece (`logits_chunk` 4, ops.head_masked_logprobs); the summed
  log-probs and a DPO loss's gradient equal the whole head's (`logits_chunk`
  0) on real preference batches."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jpost.data import pipeline
  from jpost.losses.dpo import dpo_loss
  from jpost.models import hf, pretrained
  from jpost.tokenizer import Tokenizer
  from jpost.trainers import dpo
  from norms import assert_norm_close

  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  dataset, _ = pipeline.build('preference', pipeline.resolve_sources([str(pair_files[0])]),
                              tokenizer, batch_size=4, max_len=48, truncation='truncate_left',
                              seed=0, num_epochs=1, policy='error')
  batch = next(iter(dataset))
  weights = batch['chosen_loss_mask'][:, 1:].sum() + batch['rejected_loss_mask'][:, 1:].sum()
  assert 0 < weights < 0.5 * 8 * 47  # most slots are prompt or padding
  out = {}
  for chunk in (4, 0):
    model = hf.load(tiny_checkpoint, dtype=dtype, logits_chunk=chunk)
    graphdef, params = nnx.split(model)

    def loss(params):
      chosen, rejected, _, _ = dpo.response_logps(nnx.merge(graphdef, params), batch)
      ref_chosen, ref_rejected = jnp.full((4,), -20.0), jnp.full((4,), -30.0)  # constants
      value, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type='sigmoid',
                          beta=0.3, label_smoothing=0.0, normalizer=4.0)
      return value, (chosen, rejected)
    out[chunk] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (value, sums), grads = out[4]
  (ref_value, ref_sums), ref_grads = out[0]
  # Both heads take float32 logits of the same hidden states: measured 3e-7
  # in either dtype; the bound is loose for other machines' summation order.
  bound = 1e-5
  for got, want in zip(sums, ref_sums):
    assert_norm_close(got, want, bound=bound)
  assert_norm_close(value, ref_value, bound=bound)
  assert sum(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(ref_grads)) > 0
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert_norm_close(g, w, bound=bound * 10)


def test_evaluation_fills_up_its_last_batch_with_pairs_that_weigh_nothing(tiny_checkpoint,
                                                                          tmp_path):
  """5 held-out pairs at eval_batch_size 3: a batch of 3, then 2 and an empty
  pair (one compiled step), give the metrics of eval_batch_size 1 (nothing
  filled up), for DPO (SimPO: no reference) and for a reward model."""
  import functools

  import jax
  import ml_collections
  from flax import nnx

  from jpost import sharding
  from jpost.models import hf, pretrained
  from jpost.models import reward as reward_model
  from jpost.tokenizer import Tokenizer
  from jpost.trainers import dpo, offline, reward

  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  path = _pairs_file(tmp_path / 'eval.jsonl', n=5)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  data = ml_collections.ConfigDict(dict(max_len=48, truncation='truncate_left', weights=(),
                                        policy='error', num_threads=0))
  simpo = ml_collections.ConfigDict(dict(loss_type='simpo', beta=2.0, label_smoothing=0.0,
                                         simpo_gamma=0.5))
  tasks = {
      'dpo': (offline.Task(loss_fn=functools.partial(dpo.loss_fn, loss_cfg=simpo),
                           normalizer_fn=dpo.normalizer_fn, train_data=None,
                           eval_metrics=dpo.EVAL_METRICS), hf.load(tiny_checkpoint)),
      'reward': (offline.Task(loss_fn=functools.partial(reward.loss_fn, center_coef=0.0),
                              normalizer_fn=reward.normalizer_fn, train_data=None,
                              eval_metrics=reward.EVAL_METRICS),
                 reward_model.load(tiny_checkpoint)),
  }
  for name, (task, model) in tasks.items():
    graphdef, params = nnx.split(model)
    results = {}
    for size in (1, 3):
      batches = list(reward.preference_data(data, sources=[str(path)], epochs=1, seed=0,
                                            batch_size=size, pad_last=True)(tokenizer, 0, 1)[0])
      assert len(batches) == (5 if size == 1 else 2)
      step = jax.jit(offline.make_eval_step(graphdef, task, mesh))
      results[size] = offline.evaluate(step, params, batches, mesh)
      assert step._cache_size() == 1
    assert not batches[-1]['chosen_segment_ids'][-1].any()  # the empty pair
    assert batches[-1]['chosen_segment_ids'][-2].any()
    assert set(results[3]) == set(results[1]) and len(results[1]) > 1
    for k in results[1]:
      np.testing.assert_allclose(results[3][k], results[1][k], rtol=1e-5, err_msg=(name, k))


def test_accumulated_pair_updates_equal_one_batch_with_an_empty_pair(tiny_checkpoint, tmp_path):
  """accum_steps=2 over 4 pairs, the last one empty (a process whose data ran
  out fills its batch so): the gradient is the whole batch's, divided by its 3
  real pairs, for DPO (SimPO: no reference) and a reward model. Each
  micro-batch normalised by its own pairs (2 and 1) would weigh them unequally."""
  import functools

  import jax
  import ml_collections
  from flax import nnx

  from jpost import optim, sharding
  from jpost.models import hf, pretrained
  from jpost.models import reward as reward_model
  from jpost.tokenizer import Tokenizer
  from jpost.trainers import dpo, loop, reward
  from norms import assert_norm_close

  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  data = ml_collections.ConfigDict(dict(max_len=48, truncation='truncate_left', weights=(),
                                        policy='error', num_threads=0))
  batch = next(iter(reward.preference_data(
      data, sources=[str(_pairs_file(tmp_path / 'train.jsonl', n=3))], epochs=1, seed=0,
      batch_size=4, pad_last=True)(tokenizer, 0, 1)[0]))
  assert [bool(row.any()) for row in batch['chosen_segment_ids']] == [True] * 3 + [False]
  assert float(reward.normalizer_fn(batch)) == 3.0
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  simpo = ml_collections.ConfigDict(dict(loss_type='simpo', beta=2.0, label_smoothing=0.0,
                                         simpo_gamma=0.5))
  optim_config = ml_collections.ConfigDict(dict(
      name='sgd', lr=0.1, warmup_steps=0, schedule='constant', end_lr_ratio=1.0, b1=0.0,
      b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=0.0))
  recipes = {
      'dpo': (functools.partial(dpo.loss_fn, loss_cfg=simpo), dpo.normalizer_fn,
              lambda: hf.load(tiny_checkpoint)),
      'reward': (functools.partial(reward.loss_fn, center_coef=0.01), reward.normalizer_fn,
                 lambda: reward_model.load(tiny_checkpoint, seed=0, init_std=0.5)),
  }
  for name, (loss_fn, normalizer_fn, load) in recipes.items():
    start = nnx.state(load())
    updates = {}
    for accum_steps in (1, 2):
      tx, schedule = optim.build(optim_config, 10)
      graphdef, state = loop.init_state(load(), tx, 0, mesh)
      step = loop.make_update(graphdef, loss_fn, normalizer_fn, tx, schedule,
                              accum_steps=accum_steps, mesh=mesh, state=state)
      state, _ = step(state, loop.place_batch(batch, mesh))
      updates[accum_steps] = jax.tree.map(lambda x, x0: np.asarray(x) - np.asarray(x0),
                                          jax.device_get(state['params']), start)
    assert_norm_close(updates[2], updates[1], bound=1e-4, what=f'{name} update ')


def test_the_reward_loss_subtracts_each_rows_margin(tiny_checkpoint):
  """A preference row's 'margin' reaches the reward model's loss:
  mean(-log sigmoid(r_chosen - r_rejected - margin)), checked in numpy."""
  import jax

  from jpost.data import pipeline
  from jpost.models import pretrained
  from jpost.models import reward as reward_model
  from jpost.tokenizer import Tokenizer
  from jpost.trainers import reward

  tokenizer = Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  rows = [{'prompt': f'What is {i} + 2?', 'chosen': f'{i + 2}.', 'rejected': f'{i * 7}.',
           'margin': margin} for i, margin in enumerate((0.0, 1.5, -0.5))]
  ds, _ = pipeline.build('preference', rows, tokenizer, batch_size=3, max_len=32, seed=0,
                         num_epochs=1)
  batch = next(iter(ds))
  model = reward_model.load(tiny_checkpoint, seed=0, init_std=0.5)
  chosen, rejected = (np.asarray(r, np.float64) for r in reward.pair_rewards(model, batch))
  loss, _ = jax.jit(lambda b: reward.loss_fn(model, b, 3.0, center_coef=0.0))(batch)
  logits = chosen - rejected - batch['margin']
  assert sorted(batch['margin']) == [-0.5, 0.0, 1.5]
  assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-logits))), rel=1e-5)
  without = jax.jit(lambda b: reward.loss_fn(model, b, 3.0, center_coef=0.0))(
      batch | {'margin': np.zeros(3, np.float32)})[0]
  assert abs(float(without) - float(loss)) > 1e-3  # the margins matter
