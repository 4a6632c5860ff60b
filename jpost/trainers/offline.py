"""The offline training loop shared by SFT (and later reward and DPO recipes).

A recipe supplies a `Task`: how to build its data, compute its loss from a
model and a batch, and normalise over the whole batch. Everything else is
here, in the order it happens: setup, mesh, data, model, step, checkpoint,
loop. The train state is a plain pytree {params, opt_state, step, rng}; the
NNX model is split at the jit boundary and merged inside the step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jpost import checkpoint, metrics, optim, sharding
from jpost.errors import ConfigError
from jpost.models import hf, pretrained
from jpost.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """What differs between offline recipes.

  loss_fn(model, batch, normalizer) -> (loss, metrics): loss already divided
    by the whole batch's normaliser, so micro-batch losses add up.
  normalizer_fn(batch) -> scalar: that normaliser, from the whole batch.
  train_data(tokenizer, shard_index, shard_count) -> (grain.IterDataset, stats).
  eval_data(tokenizer, shard_index, shard_count) -> same, finite; or None.
  """

  loss_fn: Callable
  normalizer_fn: Callable
  train_data: Callable
  eval_data: Callable | None = None
  # load_model(model_dir, mesh, config) -> NNX model; default: the decoder (hf.load).
  load_model: Callable | None = None
  # export(model, path, tokenizer): the final model in HF format; default hf.save.
  export: Callable | None = None
  # batch_hook(Setup) -> (host batch -> host batch), built once the model is
  # loaded: adds fields computed outside the step (DPO's reference log-probs).
  batch_hook: Callable | None = None
  # Loss metrics also reported on eval data (means weighted by the normaliser).
  eval_metrics: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """What a batch hook may need; built by `run` after loading the model."""

  config: Any
  workdir: pathlib.Path
  model_dir: pathlib.Path
  model: Any
  tokenizer: Tokenizer
  mesh: Any


class StopRequested(Exception):
  pass


# Set by tests to SIGKILL the run right after the checkpoint of this step is on
# disk, like a pre-empted machine; never set in normal runs.
_FAULT_KILL_AT_STEP = int(os.environ.get('JPOST_FAULT_KILL_AT_STEP', '-1'))


def validate(config) -> None:
  """Config errors that must surface before anything is compiled."""
  if config.total_steps <= 0:
    raise ConfigError(f'config.total_steps={config.total_steps}: must be positive.')
  if config.batch_size <= 0:
    raise ConfigError(f'config.batch_size={config.batch_size}: must be positive.')
  if config.accum_steps <= 0 or config.batch_size % config.accum_steps:
    raise ConfigError(
        f'config.accum_steps={config.accum_steps}: must be positive and divide '
        f'config.batch_size={config.batch_size}.')
  optim.validate(config.optim, config.total_steps)


def place_batch(batch: dict, mesh, *, replicate_uneven: tuple[str, ...] = ()) -> dict:
  """Host arrays -> global arrays sharded over the batch axes of the mesh.

  Arrays named in `replicate_uneven` whose leading dim does not divide over
  those axes (e.g. a few shared prompts) are replicated instead.
  """
  spec = sharding.logical_to_spec(('batch',), mesh=mesh)
  axes = [a for part in spec if part for a in ((part,) if isinstance(part, str) else part)]
  shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  def place(name, x):
    x = np.asarray(x)
    lead = spec if name not in replicate_uneven or x.shape[0] % shards == 0 else (None,)
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec(*lead, *([None] * (x.ndim - 1)))), x)
  return {k: place(k, v) for k, v in batch.items() if isinstance(v, np.ndarray)}


def init_state(model, tx, seed: int, mesh):
  """(graphdef, state): the model split at the jit boundary and a train state
  on `mesh`: optimiser moments sharded like their params, scalars replicated."""
  graphdef, params = nnx.split(model)
  replicated = NamedSharding(mesh, PartitionSpec())
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  scalars = jax.device_put({'step': jnp.zeros((), jnp.int32),
                            'rng': jax.random.key_data(jax.random.key(seed))}, replicated)
  return graphdef, {'params': params, 'opt_state': opt_state, **scalars}


def make_train_step(graphdef, task: Task, tx, lr_schedule, accum_steps: int):
  """state, batch -> state, metrics. Micro-batches are scanned and their
  gradients summed; the loss is normalised by the whole batch, so the update
  equals one step on the full batch."""

  def micro_loss(params, micro, normalizer):
    model = nnx.merge(graphdef, params)
    return task.loss_fn(model, micro, normalizer)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch):
    normalizer = task.normalizer_fn(batch)
    micro_batches = jax.tree.map(
        lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

    def accumulate(grads, micro):
      (loss, aux), g = grad_fn(state['params'], micro, normalizer)
      return jax.tree.map(jnp.add, grads, g), (loss, aux)

    if accum_steps == 1:  # no accumulator: one params-sized buffer less
      (loss, aux), grads = grad_fn(state['params'], batch, normalizer)
      losses, aux = loss[None], jax.tree.map(lambda x: x[None], aux)
    else:
      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      grads, (losses, aux) = jax.lax.scan(accumulate, zeros, micro_batches)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    out = {'loss': jnp.sum(losses), 'grad_norm': optax.tree.norm(grads),
           'lr': lr_schedule(state['step']), 'normalizer': normalizer}
    out |= {k: jnp.mean(v) for k, v in aux.items() if k != 'loss'}
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1,
            'rng': state['rng']}, out

  return step


def make_eval_step(graphdef, task: Task):
  """params, batch -> (normalizer, {'eval_loss': .., 'eval_<metric>': ..} x normalizer)."""
  def step(params, batch):
    model = nnx.merge(graphdef, params)
    normalizer = task.normalizer_fn(batch)
    loss, aux = task.loss_fn(model, batch, normalizer)
    sums = {'eval_loss': loss * normalizer}
    sums |= {f'eval_{k}': aux[k] * normalizer for k in task.eval_metrics}
    return normalizer, sums
  return step


def evaluate(eval_step, params, dataset, mesh, hook=None) -> dict[str, float]:
  """Means over the whole eval set, each batch weighted by its normaliser."""
  totals, count = {}, 0.0
  for batch in dataset:
    batch = hook(batch) if hook else batch
    n, sums = jax.device_get(eval_step(params, place_batch(batch, mesh)))
    count += float(n)
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {k: v / max(count, 1.0) for k, v in totals.items()}


def run(config, workdir: str | None, task: Task) -> dict[str, Any]:
  """Trains for config.total_steps, resuming from workdir's latest checkpoint."""
  # --- setup ---------------------------------------------------------------
  validate(config)
  if workdir is None:
    raise ConfigError('--workdir is required for training (checkpoints and metrics go there).')
  workdir = pathlib.Path(workdir)
  if config.get('distributed', False):
    jax.distributed.initialize()

  # --- mesh ------------------------------------------------------------------
  mesh = sharding.make_mesh(dict(config.mesh))
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  if (config.batch_size // config.accum_steps) % data_parallel:
    raise ConfigError(
        f'config.batch_size={config.batch_size} / accum_steps={config.accum_steps} is not '
        f'divisible by the mesh data x fsdp = {data_parallel}; change batch_size or config.mesh.')

  # --- model -----------------------------------------------------------------
  model_dir = pretrained.resolve(config.model.path)
  tokenizer = Tokenizer.from_dir(model_dir)
  model_kw = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                  remat=config.model.remat)
  model = (task.load_model(model_dir, mesh, config) if task.load_model
           else hf.load(model_dir, mesh=mesh, **model_kw))
  hook = task.batch_hook(Setup(config=config, workdir=workdir, model_dir=model_dir,
                               model=model, tokenizer=tokenizer, mesh=mesh)) \
      if task.batch_hook else None
  tx, lr_schedule = optim.build(config.optim, config.total_steps)
  graphdef, state = init_state(model, tx, config.seed, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  # --- data ------------------------------------------------------------------
  shard = (jax.process_index(), jax.process_count())
  train_ds, train_stats = task.train_data(tokenizer, *shard)
  train_iter = iter(train_ds)

  # --- step ------------------------------------------------------------------
  train_step = jax.jit(make_train_step(graphdef, task, tx, lr_schedule, config.accum_steps),
                       in_shardings=(state_shardings, None),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(graphdef, task))

  # --- checkpoint ----------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir, every=config.checkpoint.every,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state = ckpt.restore(start, state)
    train_iter.set_state(data_state)
    print(f'resumed from step {start} of {ckpt.directory}', file=sys.stderr)
  writer = metrics.MetricsWriter(workdir, tensorboard=config.tensorboard, resume_step=start)
  flops_per_token = metrics.flops_per_token(model.config, config.data.max_len)
  peak = metrics.measured_peak_flops(config.model.dtype)

  def run_eval():
    return evaluate(eval_step, state['params'], task.eval_data(tokenizer, *shard)[0], mesh, hook)

  if start == 0 and task.eval_data is not None and config.eval_every:
    baseline = run_eval()
    writer.write(0, baseline)
    metrics.console_line(0, config.total_steps, baseline)

  stop = {'requested': False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
  # --- loop ------------------------------------------------------------------
  step, last = start, {}
  try:
    while step < config.total_steps:
      tic = time.perf_counter()
      batch = next(train_iter)
      batch = hook(batch) if hook else batch
      state, out = train_step(state, place_batch(batch, mesh))
      out = jax.device_get(out)
      step += 1
      if not math.isfinite(float(out['loss'])):
        raise FloatingPointError(
            f'loss is {out["loss"]} at step {step}; stopping without saving. The last good '
            f'checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept. Lower '
            'config.optim.lr, enable clipping (config.optim.clip_norm) or check the data.')
      seconds = time.perf_counter() - tic
      tokens = float(sum(np.sum(v > 0) for k, v in batch.items() if k.endswith('segment_ids')))
      out |= {'tokens_per_s': tokens / seconds, 'step_seconds': seconds,
              'mfu': tokens * flops_per_token / seconds / peak}
      data_report = train_stats.as_dict()  # rows skipped / truncated so far, by kind
      out |= {f'data/{k}': v for k, v in data_report['encoded'].items()}
      out |= {f'data/skipped_{k}': v for k, v in data_report['rows']['skipped_by_reason'].items()}
      if task.eval_data is not None and config.eval_every and (
          step % config.eval_every == 0 or step == config.total_steps):
        out |= run_eval()
      writer.write(step, out)
      if step % config.log_every == 0 or step == config.total_steps or 'eval_loss' in out:
        metrics.console_line(step, config.total_steps, out)
      last = out
      if ckpt.due(step) or step == config.total_steps or stop['requested']:
        ckpt.save(step, state, train_iter.get_state())
      if stop['requested']:
        raise StopRequested
      if step == _FAULT_KILL_AT_STEP:  # fault injection for the resume tests
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
  except StopRequested:
    logging.warning('SIGTERM: saved step %d to %s and stopped.', step, ckpt.directory)
  finally:
    signal.signal(signal.SIGTERM, previous)
    ckpt.close()
    writer.close()

  data_report = train_stats.as_dict()
  if step >= config.total_steps and config.export_hf and jax.process_index() == 0:
    save = task.export or hf.save
    export = save(nnx.merge(graphdef, state['params']), workdir / 'hf', tokenizer=tokenizer)
    print(f'exported HF checkpoint to {export}', file=sys.stderr)
  return {'step': step, 'last': last, 'data': data_report, 'state': state}
