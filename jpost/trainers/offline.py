"""The offline recipes (sft, reward, dpo) on the loop library.

A recipe supplies a `Task`: how to build its data, compute its loss from a
model and a batch, and normalise over the whole batch. `run` sets up, in the
order it happens: mesh, model, data (this process's rows of every global
batch), the update and eval steps; then hands a one-batch `step_fn` to
`loop.train`, which owns checkpoints, resume, SIGTERM, the NaN stop and
metrics. The train state is a plain pytree {params, opt_state, step, rng};
the NNX model is split at the jit boundary and merged inside the step.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from jpost import metrics, optim, sharding
from jpost.errors import ConfigError
from jpost.models import hf, lora, pretrained
from jpost.tokenizer import Tokenizer
from jpost.trainers import loop


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """What differs between offline recipes.

  loss_fn(model, batch, normalizer) -> (loss, metrics): loss already divided
    by the whole batch's normaliser, so micro-batch losses add up.
  normalizer_fn(batch) -> scalar: that normaliser, from the whole batch.
  train_data(tokenizer, shard_index, shard_count, **packing) -> (grain.IterDataset,
    stats), `packing` what `Task.packing` gives (nothing without it).
  eval_data(tokenizer, shard_index, shard_count, **packing) -> same, finite; or None.
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
  # activations(model_config, rows, seq_len) -> bytes by part of a step over
  # `rows` rows on one device (jpost.memory), printed before the first step.
  activations: Callable | None = None
  # packing(model_config, batch_devices) -> keyword arguments for train_data
  # and eval_data that depend on the loaded model: SFT's packed row length
  # (`row_len`, data.max_len where absent) and segment limit.
  packing: Callable | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """What a batch hook may need; built by `run` after loading the model."""

  config: Any
  workdir: pathlib.Path
  model_dir: pathlib.Path
  model: Any
  tokenizer: Tokenizer
  mesh: Any


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


def make_eval_step(graphdef, task: Task, mesh):
  """params, batch -> (normalizer, {'eval_loss': .., 'eval_<metric>': ..} x normalizer)."""
  def step(params, batch):
    model = nnx.merge(graphdef, params)
    normalizer = task.normalizer_fn(batch)
    with sharding.activation_rules(mesh):
      loss, aux = task.loss_fn(model, batch, normalizer)
    sums = {'eval_loss': loss * normalizer}
    sums |= {f'eval_{k}': aux[k] * normalizer for k in task.eval_metrics}
    return normalizer, sums
  return step


def evaluate(eval_step, params, dataset, mesh, hook=None) -> dict[str, float]:
  """Means over the whole eval set, each batch weighted by its normaliser.

  Processes may hold different numbers of (packed) batches: one that has run
  out feeds an all-zero batch (no tokens, no weight) until every one has."""
  totals, count, rows, shape = {}, 0.0, iter(dataset), None
  while True:
    batch = next(rows, None)
    if not loop.any_process(batch is not None):
      break
    if batch is None and shape is None:
      raise ConfigError(
          f'process {jax.process_index()} has no held-out rows while others have some: '
          f'the evaluation data holds fewer rows than there are processes '
          f'({jax.process_count()}), or its rows were all dropped here. Give it more rows.')
    if batch is None:
      batch = {k: np.zeros_like(v) for k, v in shape.items()}
    shape = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
    batch = hook(batch) if hook else batch
    n, sums = jax.device_get(eval_step(params, loop.place_batch(batch, mesh)))
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
  loop.start_processes(config)

  # --- mesh ------------------------------------------------------------------
  mesh = loop.make_mesh(config, config.batch_size // config.accum_steps,
                        f'config.batch_size={config.batch_size} / accum_steps='
                        f'{config.accum_steps}', 'config.batch_size or accum_steps')

  # --- model -----------------------------------------------------------------
  model_dir = pretrained.resolve(config.model.path)
  tokenizer = Tokenizer.from_dir(model_dir)
  model = (task.load_model(model_dir, mesh, config) if task.load_model else hf.load(
      model_dir, mesh=mesh, **hf.compute_options(config), **lora.load_options(config)))
  hook = task.batch_hook(Setup(config=config, workdir=workdir, model_dir=model_dir,
                               model=model, tokenizer=tokenizer, mesh=mesh)) \
      if task.batch_hook else None
  tx, lr_schedule = optim.build(config.optim, config.total_steps)
  graphdef, state = loop.init_state(model, tx, config.seed, mesh)
  sizes = loop.state_sizes(state)
  loop.print_sizes(sizes)
  packing = task.packing(model.config, loop.batch_devices(mesh)) if task.packing else {}
  if packing.get('row_len', config.data.max_len) != config.data.max_len:
    print(f"data: padding-free rows of {packing['row_len']} tokens, each packed with the "
          f"samples of {packing['row_len'] // config.data.max_len} rows of "
          f'{config.data.max_len}', file=sys.stderr, flush=True)
  if task.activations is not None:
    # A batch holds batch_size rows of max_len tokens, or as many tokens in
    # rows of row_len.
    row_len = packing.get('row_len', config.data.max_len)
    rows = (config.batch_size * config.data.max_len / row_len / config.accum_steps
            / loop.batch_devices(mesh))
    loop.print_activations(task.activations(model.config, rows, row_len), 'step',
                           lora.trainable(state['params'])[0])

  # --- data ------------------------------------------------------------------
  # Each process reads its rows of every global batch (pipeline.build's shard).
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count(), **packing)
  train_ds, train_stats = task.train_data(tokenizer, **shard)
  train_iter = iter(train_ds)

  # --- step ------------------------------------------------------------------
  update = loop.make_update(graphdef, task.loss_fn, task.normalizer_fn, tx, lr_schedule,
                            accum_steps=config.accum_steps, mesh=mesh, state=state)
  eval_step = jax.jit(make_eval_step(graphdef, task, mesh))
  # MFU's denominator: every process's devices (each host measures its own).
  peak = float(loop.gather_rows(np.array([metrics.measured_peak_flops(model.config.dtype)])).sum())

  def step_fn(state, step):
    tic = time.perf_counter()
    batch = next(train_iter)
    batch = hook(batch) if hook else batch
    state, out = update(state, loop.place_batch(batch, mesh))
    out = jax.device_get(out)
    seconds = time.perf_counter() - tic
    segments = [v for k, v in batch.items() if k.endswith('segment_ids')]
    local = sum(np.sum(v > 0) for v in segments)
    tokens = float(loop.gather_rows(np.array([local])).sum())
    # Attention counted over what each token attends to (this process's rows).
    flops_per_token = metrics.flops_per_token(model.config, metrics.attended_length(*segments))
    out |= {'tokens_per_s': tokens / seconds, 'step_seconds': seconds,
            'mfu': tokens * flops_per_token / seconds / peak}
    out |= sizes if step == 0 else {}
    return state, out | _data_metrics(train_stats)

  def evaluate_fn(state, step):
    return evaluate(eval_step, state['params'], task.eval_data(tokenizer, **shard)[0], mesh,
                    hook)

  # --- loop ------------------------------------------------------------------
  done = loop.train(config, workdir, state=state, data_iter=train_iter, step_fn=step_fn,
                    evaluate=evaluate_fn if task.eval_data is not None else None)
  if done.step >= config.total_steps:
    loop.export(config, workdir, graphdef, done.state['params'], tokenizer,
                task.export or hf.save)
  return {'step': done.step, 'last': done.last, 'data': train_stats.as_dict(),
          'state': done.state}


def _data_metrics(stats) -> dict[str, float]:
  """This process's rows encoded / truncated / skipped so far, by kind."""
  report = stats.as_dict()
  return ({f'data/{k}': v for k, v in report['encoded'].items()}
          | {f'data/skipped_{k}': v for k, v in report['rows']['skipped_by_reason'].items()})
