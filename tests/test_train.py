"""Training core: accumulation, sharding, exact resume, the SFT recipe end to end."""

import dataclasses
import functools
import json
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import optax
import pytest
import transformers
import torch
from flax import nnx
from safetensors.numpy import load_file

from jpost import memory, optim, sharding
from jpost.models import hf
from jpost.trainers import loop, sft
from norms import assert_norm_close
import overrides
import xla_env

sys.path.insert(0, 'configs')


def _optim(name='sgd', lr=0.1):
  return ml_collections.ConfigDict(dict(
      name=name, lr=lr, warmup_steps=0, schedule='constant', end_lr_ratio=1.0,
      b1=0.0 if name == 'sgd' else 0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=0.0))


def _batch(batch_size, length=24, vocab=49152, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (batch_size, length)).astype(np.int32)
  segments = np.ones((batch_size, length), np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (batch_size, 1))
  for row in range(batch_size):  # uneven padding and a packed second sample
    pad, cut = rng.randint(0, 8), rng.randint(6, 14)
    segments[row, cut:] = 2
    positions[row, cut:] = np.arange(length - cut)
    if pad:
      segments[row, -pad:] = 0
  mask = (rng.rand(batch_size, length) < 0.6).astype(np.int32) * (segments > 0)
  return {'tokens': tokens, 'positions': positions, 'segment_ids': segments, 'loss_mask': mask}


def _one_step(checkpoint, batch, *, accum_steps, mesh, optim_config, steps=1,
              normalization='token', **load):
  model = hf.load(checkpoint, mesh=mesh, **load)
  tx, schedule = optim.build(optim_config, 10)
  graphdef, state = loop.init_state(model, tx, 0, mesh)
  step = loop.make_update(
      graphdef, functools.partial(sft.loss_fn, normalization=normalization),
      functools.partial(sft.normalizer_fn, normalization=normalization), tx, schedule,
      accum_steps=accum_steps, mesh=mesh, state=state)
  losses = []
  for _ in range(steps):
    state, out = step(state, loop.place_batch(batch, mesh))
    losses.append(float(out['loss']))
  return jax.device_get(state['params']), losses


def _assert_updates_close(a, b, checkpoint, bound):
  """The two runs' parameter changes (not the parameters, whose norm would hide
  any error in a 1e-3 step) agree by norm, tensor by tensor."""
  start = jax.device_get(nnx.split(hf.load(checkpoint))[1])
  change = lambda params: jax.tree.map(lambda x, x0: np.asarray(x) - np.asarray(x0), params, start)
  return assert_norm_close(change(a), change(b), bound=bound, what='parameter change ')


def test_sgd_uses_b1_as_momentum_and_decays_matrices_only():
  """Two SGD steps by hand: lr 0.1, momentum (b1) 0.5, weight_decay 0.2 added
  to a matrix's gradient as 0.2 x its value, never to a vector's."""
  config = _optim('sgd', lr=0.1)
  with config.unlocked():
    config.b1, config.weight_decay = 0.5, 0.2
  tx, _ = optim.build(config, 10)
  params = {'w': np.full((2, 2), 3.0, np.float32), 'b': np.full(2, 3.0, np.float32)}
  grads = {'w': np.ones((2, 2), np.float32), 'b': np.ones(2, np.float32)}
  state = tx.init(params)
  first, state = tx.update(grads, state, params)
  np.testing.assert_allclose(first['w'], -0.1 * (1 + 0.2 * 3), rtol=1e-6)
  np.testing.assert_allclose(first['b'], -0.1, rtol=1e-6)
  second, _ = tx.update(grads, state, params)  # the same point: 1.6 + 0.5 x the last 1.6
  np.testing.assert_allclose(second['w'], -0.1 * (1.6 + 0.5 * 1.6), rtol=1e-6)
  np.testing.assert_allclose(second['b'], -0.1 * 1.5, rtol=1e-6)


@pytest.mark.parametrize('scale', [0.0, 0.1, 1.0, 7.0])
def test_clip_by_global_norm_matches_optax(scale):
  """jpost's clip (one scalar factor, which fuses into AdamW) gives optax's
  values: unchanged gradients below the bound (bit for bit, zero included),
  the same direction at norm max_norm above it."""
  rng = np.random.RandomState(0)
  grads = {'w': scale * rng.randn(6, 5).astype(np.float32),
           'b': scale * rng.randn(5).astype(np.float32)}
  ours, _ = optim.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  theirs, _ = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  norm = float(optax.global_norm(grads))
  for name in grads:
    if norm < 2.0:
      np.testing.assert_array_equal(ours[name], grads[name])
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=0)
  assert float(optax.global_norm(ours)) == pytest.approx(min(norm, 2.0), rel=1e-6)


@pytest.mark.parametrize('normalization', ['token', 'sequence'])
def test_grad_accumulation_equals_one_large_batch(tiny_checkpoint, normalization):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  batch = _batch(8)
  kw = dict(mesh=mesh, optim_config=_optim(), normalization=normalization)
  full, full_loss = _one_step(tiny_checkpoint, batch, accum_steps=1, **kw)
  accum, accum_loss = _one_step(tiny_checkpoint, batch, accum_steps=4, **kw)
  np.testing.assert_allclose(accum_loss, full_loss, rtol=1e-6)
  # Measured 6e-6 to 7e-6: float32 rounding of (parameter - start) for a step
  # of ~1e-3 of the weight; a per-micro-batch normaliser is off by O(1e-1).
  _assert_updates_close(accum, full, tiny_checkpoint, bound=1e-4)
  # Normalising each micro-batch by its own count would differ: the test can fail.
  counts = [sft.normalizer_fn({k: v[i:i + 2] for k, v in batch.items()}, normalization='token')
            for i in range(0, 8, 2)]
  assert len(set(np.asarray(counts).tolist())) > 1


# With SGD the LM head goes 8 positions at a time: over the target tokens
# alone on one device (ops._weighted_head_compacted), per row over the mesh.
@pytest.mark.parametrize('optimizer, logits_chunk', [('sgd', 8), ('adamw', 0)])
def test_fsdp_tensor_parallel_equals_one_device(tiny_checkpoint, optimizer, logits_chunk):
  batch = _batch(8, seed=1)
  one = sharding.make_mesh(devices=jax.devices()[:1])
  many = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  config = _optim(optimizer, 0.1 if optimizer == 'sgd' else 1e-3)
  kw = dict(accum_steps=1, optim_config=config, steps=2, logits_chunk=logits_chunk)
  params_one, loss_one = _one_step(tiny_checkpoint, batch, mesh=one, **kw)
  params_many, loss_many = _one_step(tiny_checkpoint, batch, mesh=many, **kw)
  np.testing.assert_allclose(loss_many, loss_one, rtol=1e-5)
  # Adam divides by sqrt(v): for a weight whose gradient is ~0, summation-order
  # noise between layouts becomes a visible fraction of lr, hence Adam's bound.
  # Measured in the worst tensor: SGD 5e-6 (the rounding of parameter - start),
  # AdamW 8e-5; a missing all-reduce over the 4-way FSDP axis is off by O(1).
  _assert_updates_close(params_many, params_one, tiny_checkpoint,
                        bound=1e-4 if optimizer == 'sgd' else 1e-3)


def test_a_data_parallel_bfloat16_step_gathers_no_rows(tiny_checkpoint):
  """On one CPU device the weight gradients' 16-bit operand is laid out
  transposed in memory (decoder._transposed); over a mesh that layout made
  XLA all-gather every device's rows first (the tied LM head's [vocab,
  tokens] float32 gradient on each device). Data parallel needs no gather."""
  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  model = hf.load(tiny_checkpoint, mesh=mesh, dtype='bfloat16')
  tx, schedule = optim.build(_optim(), 10)
  graphdef, state = loop.init_state(model, tx, 0, mesh)
  step = loop.make_update(
      graphdef, functools.partial(sft.loss_fn, normalization='token'),
      functools.partial(sft.normalizer_fn, normalization='token'), tx, schedule,
      accum_steps=1, mesh=mesh, state=state)
  hlo = step.lower(state, loop.place_batch(_batch(8), mesh)).compile().as_text()
  assert 'all-reduce' in hlo and 'all-gather' not in hlo


def _train(workdir, checkpoint, *extra, env=None, steps=8):
  args = [sys.executable, '-m', 'jpost.main', '--config=configs/sft.py:tiny', f'--workdir={workdir}',
          f'--config.model.path={checkpoint}', f'--config.total_steps={steps}',
          '--config.checkpoint.every=4', '--config.checkpoint.async_save=True',
          '--config.transfer_guard=disallow', *extra]
  env = {**xla_env.env(1), **(env or {})}
  return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)


def _losses(workdir):
  return [json.loads(line)['loss'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_resume_after_sigkill_is_exact(tiny_checkpoint, tmp_path):
  straight = _train(tmp_path / 'a', tiny_checkpoint)
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = _train(tmp_path / 'b', tiny_checkpoint, env={'JPOST_FAULT_KILL_AT_STEP': '4'})
  assert killed.returncode == -9  # really killed, right after checkpoint 4
  assert not (tmp_path / 'b' / 'hf').exists() and len(_losses(tmp_path / 'b')) == 4
  resumed = _train(tmp_path / 'b', tiny_checkpoint)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step 4' in resumed.stderr
  assert _losses(tmp_path / 'b') == _losses(tmp_path / 'a') and len(_losses(tmp_path / 'a')) == 8
  a = load_file(tmp_path / 'a' / 'hf' / 'model.safetensors')
  b = load_file(tmp_path / 'b' / 'hf' / 'model.safetensors')
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_checkpoint_compression_is_chosen_and_either_restores_the_other(tmp_path, monkeypatch):
  """'zstd' compresses (a zero array to a fraction of its bytes), 'none'
  writes the bytes, 'auto' compresses beside an accelerator only; a
  checkpoint of either kind, and one written by StandardSave (the format
  before the option), restores with either setting."""
  import orbax.checkpoint as ocp
  from jpost import checkpoint
  from jpost.errors import ConfigError
  state = {'w': jax.numpy.zeros((512, 512), np.float32), 'step': jax.numpy.asarray(3)}
  target = jax.tree.map(jax.numpy.ones_like, state)
  manager = ocp.CheckpointManager(  # as jpost wrote checkpoints before
      tmp_path / 'checkpoints', item_names=('state', 'data'),
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave({'at': 1})))
  manager.wait_until_finished()
  manager.close()
  sizes = {}
  for step, compression in ((2, 'none'), (3, 'zstd')):
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, compression=compression)
    restored, data = ckpt.restore(1, target)
    assert data == {'at': 1}
    np.testing.assert_array_equal(restored['w'], state['w'])
    ckpt.save(step, state, {'at': step})
    ckpt.close()
    sizes[compression] = sum(f.stat().st_size for f in
                             (tmp_path / 'checkpoints' / str(step) / 'state').rglob('*'))
  assert sizes['none'] > 512 * 512 * 4 > 10 * sizes['zstd'], sizes  # the rest is metadata
  for step, compression in ((2, 'zstd'), (3, 'none')):
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, compression=compression)
    restored, data = ckpt.restore(step, target)
    ckpt.close()
    assert data == {'at': step} and int(restored['step']) == 3
    np.testing.assert_array_equal(restored['w'], state['w'])
  assert [checkpoint.compresses('auto', b) for b in ('cpu', 'gpu', 'tpu')] == [False, True, True]
  with pytest.raises(ConfigError, match=r"compression='lz4'; use one of"):
    checkpoint.compresses('lz4')

  class Before0_11_26(ocp.PyTreeCheckpointHandler):  # no use_compression: always zstd
    def __init__(self):
      super().__init__()
  monkeypatch.setattr(ocp, 'PyTreeCheckpointHandler', Before0_11_26)
  assert isinstance(checkpoint._state_handler('auto'), Before0_11_26)
  with pytest.raises(ConfigError, match=r"'none' needs orbax-checkpoint >= 0.11.26"):
    checkpoint.Checkpointer(tmp_path / 'older', every=1, compression='none')


def test_checkpoints_that_cannot_fit_the_disk_are_said_before_the_first_step(tmp_path, capsys):
  """Against the real free space under tmp_path: a state larger than the
  disk is a ConfigError (uncompressed; compressed it may fit, so a
  warning); one that fits once but not `keep` + 1 times is a warning; a
  small one says nothing. Earlier checkpoints there count as free."""
  import shutil
  from jpost import checkpoint
  from jpost.errors import ConfigError
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2, compression='none')
  free = shutil.disk_usage(tmp_path).free
  with pytest.raises(ConfigError, match=r'not one checkpoint fits\. Free space there'):
    ckpt.check_space(free + 2**30)
  ckpt.check_space(free // 2)
  assert 'checkpoint.keep=2 keeps 2 (plus the one being written)' in capsys.readouterr().err
  ckpt.check_space(2**20)
  assert capsys.readouterr().err == ''
  # Earlier checkpoints are replaced: 256 MB of them, and a state 128 MB over
  # the free space (the margin: other tests write beside this one).
  (ckpt.directory / 'old').write_bytes(bytes(2**28))
  ckpt.check_space(shutil.disk_usage(tmp_path).free + 2**27)
  assert 'a save may fail' in capsys.readouterr().err
  ckpt.close()
  zstd = checkpoint.Checkpointer(tmp_path / 'z', every=1, compression='zstd')
  zstd.check_space(free + 2**30)
  assert 'a save may fail' in capsys.readouterr().err
  zstd.close()


def test_metrics_on_resume_only_process_0_drops_lines_after_the_checkpoint(tmp_path,
                                                                           monkeypatch, capsys):
  """Every process builds a writer; if another one rewrote the file too, it
  could read it while process 0 had it truncated and write back nothing
  (seen once: a resumed 2-process run kept only its last step's line). Half
  a line, left by a run killed while writing it, is dropped and counted."""
  from jpost.metrics import MetricsWriter
  lines = ''.join(json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in (1, 2, 3))
  (tmp_path / 'metrics.jsonl').write_text(lines)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  MetricsWriter(tmp_path, resume_step=2).write(3, {'loss': 9.0})
  assert (tmp_path / 'metrics.jsonl').read_text() == lines  # not its file
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "lo')  # a run killed while writing its last line
  MetricsWriter(tmp_path, resume_step=2).write(3, {'loss': 0.5})
  assert [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [
      {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 0.5}, {'step': 3, 'loss': 0.5}]
  assert [p.name for p in tmp_path.iterdir()] == ['metrics.jsonl']
  assert 'dropped 1 unreadable line(s)' in capsys.readouterr().err


def test_sigterm_saves_and_resumes(tiny_checkpoint, tmp_path):
  proc = subprocess.Popen(
      [sys.executable, '-m', 'jpost.main', '--config=configs/sft.py:tiny', f'--workdir={tmp_path}',
       f'--config.model.path={tiny_checkpoint}', '--config.total_steps=100000',
       '--config.checkpoint.every=100000'], stderr=subprocess.PIPE, text=True,
      env=xla_env.env(1))
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline, 'no second step logged in 300 s'
    time.sleep(0.05)  # a bare loop took a core from the run it waits for
  proc.terminate()
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(saved) == 1 and saved[0] == len(_losses(tmp_path))


@pytest.fixture(scope='module')
def run_of_4_steps(tiny_checkpoint, tmp_path_factory):
  """One finished 4-step run (checkpoint at step 4, TensorBoard on), shared by
  the tests that inspect it or resume from a copy of it."""
  workdir = tmp_path_factory.mktemp('run_of_4_steps')
  proc = _train(workdir, tiny_checkpoint, '--config.tensorboard=True', steps=4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _copy_of(workdir, tmp_path):
  return pathlib.Path(shutil.copytree(workdir, tmp_path / 'run'))


def test_nan_loss_stops_without_overwriting_checkpoint(tiny_checkpoint, run_of_4_steps, tmp_path):
  workdir = _copy_of(run_of_4_steps, tmp_path)
  # Resume with an absurd learning rate: the loss blows up to inf/NaN.
  blown = _train(workdir, tiny_checkpoint, '--config.optim.lr=1e30',
                 '--config.optim.warmup_steps=0', steps=40)
  assert blown.returncode != 0
  assert 'stopping without saving' in blown.stderr
  assert 'last good checkpoint (step 4)' in blown.stderr
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == [4]  # nothing written after the blow-up


def test_nan_stop_names_the_cudnn_segment_limit():
  """attention='cudnn' poisons a packed row with too many segments (NaN), so
  the NaN stop names that limit too; other runs get the usual advice only."""
  import ml_collections
  from jpost.trainers import loop
  config = ml_collections.ConfigDict({'model': {'attention': 'cudnn',
                                                'attention_max_segments': 32}})
  assert 'config.model.attention_max_segments (32)' in loop._nan_hint(config)
  config.model.attention = 'auto'
  assert loop._nan_hint(config) == ''  # 'auto' picks cuDNN on a GPU only
  assert loop._nan_hint(ml_collections.ConfigDict({'total_steps': 1})) == ''


def test_resume_with_another_optimiser_structure_is_a_clear_error(tiny_checkpoint, run_of_4_steps,
                                                                  tmp_path):
  workdir = _copy_of(run_of_4_steps, tmp_path)
  proc = _train(workdir, tiny_checkpoint, '--config.optim.clip_norm=0', steps=6)
  assert proc.returncode != 0
  assert 'cannot resume from step 4' in proc.stderr and 'config.optim' in proc.stderr


def test_a_workdir_of_another_run_is_not_resumed(tiny_checkpoint, run_of_4_steps, tmp_path):
  """Other starting weights or another seed in a workdir with checkpoints
  would continue that run's weights: refused before any step (run.json holds
  what the run was started with). Another lr or a longer run continues it
  (the NaN test above resumes this run with lr 1e30)."""
  import sft as sft_config
  from jpost.errors import ConfigError
  from jpost.trainers import loop
  workdir = _copy_of(run_of_4_steps, tmp_path)
  config = sft_config.get_config('tiny').unlock()
  config.model.path = str(tiny_checkpoint)
  loop._same_run(config, workdir, resuming=True)  # the same run: fine
  for field, value, changed in (('model.path', str(tmp_path / 'other'), 'model.path'),
                                ('seed', 7, 'seed 0 there, 7 now')):
    other = overrides.apply(sft_config.get_config('tiny').unlock(),
                            {'model.path': str(tiny_checkpoint), field: value})
    with pytest.raises(ConfigError, match=rf'holds checkpoints of another run \({changed}'):
      loop._same_run(other, workdir, resuming=True)
  # Through the recipe: it stops before restoring or stepping (8 rows on 8 devices).
  overrides.apply(config, {'seed': 7, 'batch_size': 8, 'total_steps': 6})
  with pytest.raises(ConfigError, match='holds checkpoints of another run'):
    sft.run(config, str(workdir))
  assert len(_losses(workdir)) == 4


@pytest.mark.parametrize('override, message', [
    ({'optim.lr': -1e-5}, r'config\.optim\.lr=-1e-05: the learning rate must be positive'),
    ({'optim.name': 'adafactorx'}, r"config\.optim\.name='adafactorx': unknown optimiser"),
    ({'batch_size': 3}, r'config\.batch_size=3 .* not divisible by the mesh'),
    ({'accum_steps': 3}, r'config\.accum_steps=3: must be positive and divide'),
    ({'data.pack_window': 0}, r'pack_window=0: the SFT packer packs windows'),
    ({'checkpoint.compression': 'lz4'}, r"checkpoint\.compression='lz4'; use one of"),
    ({'log_every': 0}, r'config\.log_every=0: must be an integer >= 1'),
    ({'loss.normalization': 'sample'}, r"config\.loss\.normalization='sample'; use one of"),
    ({'eval_every': -2}, r'config\.eval_every=-2: must be an integer >= 0 \(0: never\)'),
])
def test_bad_config_fails_before_compiling(tiny_checkpoint, tmp_path, override, message):
  """In this process (its 8 devices); test_main.py runs such errors through
  the command line, where each is one line with exit status 2."""
  import sft as sft_config
  from jpost.errors import ConfigError
  config = sft_config.get_config('tiny').unlock()
  config.model.path, config.batch_size = str(tiny_checkpoint), 8  # 8 rows split over 8 devices
  overrides.apply(config, override)
  with pytest.raises(ConfigError, match=message):
    sft.run(config, str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_default_sft_lowers_held_out_loss_and_exports(shallow_smollm2, tmp_path):
  """configs/sft.py as shipped (GSM8K, bfloat16 with remat), shortened to 3
  steps, on SmolLM2's first 6 layers (the whole model: `make demo`, and
  test_online.py's step of the shipped GRPO config)."""
  proc = subprocess.run(
      [sys.executable, '-m', 'jpost.main', '--config=configs/sft.py', f'--workdir={tmp_path}',
       f'--config.model.path={shallow_smollm2}',
       '--config.total_steps=3', '--config.eval_every=3', '--config.checkpoint.every=3'],
      capture_output=True, text=True, timeout=1200,
      env=xla_env.env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Before the first step: the step's activations per device, predicted.
  import sft as sft_config
  config = sft_config.get_config()
  model_config = hf.load(shallow_smollm2, **hf.compute_options(config)).config
  # The run has one device, where 'auto' takes the fused CPU kernel if it
  # builds (attention.choose); this process has 8, where it would not.
  from jpost.models import cpu_attention
  model_config = dataclasses.replace(
      model_config, attention='cpu' if cpu_attention.available() else 'blockwise')
  # There data.padding_free='auto' packs each batch as one row (sft.packing).
  row_len = sft.packing(config, model_config, 1)['row_len']
  if cpu_attention.available():
    assert row_len == config.batch_size * config.data.max_len
    assert f'data: padding-free rows of {row_len} tokens' in proc.stderr
  step = memory.step_activations(
      model_config, config.batch_size * config.data.max_len / row_len / config.accum_steps,
      row_len, head_len=config.data.max_len)
  assert (f'step activations up to {sum(step.values()) / 2**20:.1f} MB per device, predicted '
          f"(saved {step['saved_activations'] / 2**20:.1f}, ") in proc.stderr
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = {r['step']: r['eval_loss'] for r in records if 'eval_loss' in r}
  # Measured 14.91 -> 14.05: six of 30 layers start far off (the whole model: 1.40 -> 1.24).
  assert set(evals) == {0, 3} and evals[3] < evals[0] - 0.05, evals
  # The export loads in transformers and gives jpost's logits.
  exported = tmp_path / 'hf'
  ours = hf.load(exported)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  from jpost.tokenizer import Tokenizer
  ids = Tokenizer.from_dir(exported).encode_chat(
      [{'role': 'user', 'content': 'Natalia sold 48 clips in April. How many in May if half as many?'}],
      add_generation_prompt=True).ids
  tokens = np.asarray(ids)[None]
  logits = np.asarray(ours(tokens, np.arange(len(ids))[None], np.ones_like(tokens)))
  with torch.no_grad():
    reference = theirs(torch.tensor(tokens)).logits.numpy()
  assert np.abs(logits - reference).max() < 1e-3


def test_tensorboard_event_files_when_enabled(run_of_4_steps):
  events = list((run_of_4_steps / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 0


def test_sequence_normalizer_counts_samples_with_targets():
  batch = _batch(8, seed=3)
  targets = batch['loss_mask'][:, 1:] * (batch['segment_ids'][:, 1:] == batch['segment_ids'][:, :-1])
  expected = sum(len({s for s, w in zip(batch['segment_ids'][r, 1:], targets[r]) if w and s})
                 for r in range(8))
  assert int(sft.normalizer_fn(batch, normalization='sequence')) == expected
  assert int(sft.normalizer_fn(batch, normalization='token')) == targets.sum()


@pytest.mark.parametrize('guard', ['disallow', 'allow'])
def test_an_implicit_transfer_in_a_step_fails_under_the_guard(tiny_checkpoint, tmp_path,
                                                               monkeypatch, guard):
  """Every recipe test runs its steps with config.transfer_guard='disallow';
  here a step that hands the update host arrays (an implicit transfer) fails
  under it, and runs when the guard allows it."""
  import sft as sft_config
  config = sft_config.get_config('tiny')
  with config.unlocked():
    config.model.path, config.total_steps = str(tiny_checkpoint), 1
    config.batch_size, config.export_hf, config.transfer_guard = 8, False, guard
  monkeypatch.setattr(loop, 'place_batch', lambda batch, mesh, **_: {
      k: v for k, v in batch.items() if isinstance(v, np.ndarray)})
  if guard == 'allow':
    assert sft.run(config, tmp_path)['step'] == 1
    return
  with pytest.raises(jax.errors.JaxRuntimeError, match='Disallowed host-to-device transfer'):
    sft.run(config, tmp_path)
