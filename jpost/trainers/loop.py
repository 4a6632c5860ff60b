"""The one training loop every recipe runs on, on one process or many.

A recipe builds its train state and a `step_fn(state, step) -> (state,
metrics)`; `train` does everything around it, in the order it happens:
resume (state and data iterator), the baseline evaluation, then per step the
step itself, the NaN stop, evaluation, metrics, checkpoint and SIGTERM.

The helpers are what every step needs on a mesh that may span processes
(`jax.distributed`, one process per host): the mesh, the state init, the
jitted donated update, host batches placed as this process's rows of a
global array, this process's rows read back, and host values gathered over
processes. Every host/device crossing here is explicit (`device_put`,
`device_get`), so steps run under `jax.transfer_guard('disallow')`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jpost import checkpoint, memory, metrics, sharding
from jpost.errors import ConfigError
from jpost.models import lora, pretrained

# Set by tests to SIGKILL the run right after the checkpoint of this step is on
# disk, like a pre-empted machine (JPOST_FAULT_KILL_PROCESS: only that process
# dies, like a lost host); never set in normal runs.
_FAULT_KILL_AT_STEP = int(os.environ.get('JPOST_FAULT_KILL_AT_STEP', '-1'))
_FAULT_KILL_PROCESS = int(os.environ.get('JPOST_FAULT_KILL_PROCESS', '-1'))

GUARDS = ('allow', 'log', 'disallow')


# --- processes and mesh -------------------------------------------------------------


def start_processes(config) -> None:
  """`jax.distributed.initialize()` when config.distributed.enabled.

  The coordinator comes from the cluster (SLURM, Kubernetes, Open MPI: JAX
  detects them) or from JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (the local launcher, JobSet). A process that stops sending
  heartbeats for heartbeat_timeout_s makes every other process exit.
  """
  dist = config.get('distributed')
  if not dist or not dist.enabled or jax.distributed.is_initialized():
    return
  env = {k: os.environ.get(f'JAX_{k.upper()}') for k in ('num_processes', 'process_id')}
  given = {k: int(v) for k, v in env.items() if v not in (None, '')}
  try:
    jax.distributed.initialize(initialization_timeout=int(dist.init_timeout_s),
                               heartbeat_timeout_seconds=int(dist.heartbeat_timeout_s), **given)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(
        f'config.distributed.enabled=True but jax.distributed.initialize() failed: {e}. '
        'Run under SLURM/Kubernetes/Open MPI, or set JAX_COORDINATOR_ADDRESS (host:port of '
        'process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; locally, use '
        '`python -m jpost.launch`.') from e
  logging.info('process %d of %d, %d of %d devices here', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(config, rows: int, what: str, fix: str):
  """The mesh of config.mesh over every process's devices; `rows` (`what`)
  must split over its data x fsdp axes and over the processes."""
  mesh = sharding.make_mesh(dict(config.mesh))
  data_parallel = batch_devices(mesh)
  processes = jax.process_count()
  if rows % data_parallel or rows % processes:
    across = f' and over {processes} processes' if processes > 1 else ''
    raise ConfigError(f'{what} ({rows} rows) is not divisible by the mesh data x fsdp = '
                      f'{data_parallel}{across}; change {fix} or config.mesh.')
  return mesh


def own_rows(rows: int) -> slice:
  """This process's slice of a global batch of `rows` (what it placed)."""
  count = rows // jax.process_count()
  return slice(jax.process_index() * count, (jax.process_index() + 1) * count)


def this_process_share(items) -> list[tuple[int, Any]]:
  """(index, item) for every process_count-th item from this process's
  index: how inference recipes (pairs, eval) split whole batches, each
  process generating on its own devices."""
  count, index = jax.process_count(), jax.process_index()
  return [(i, item) for i, item in enumerate(items) if i % count == index]


def merge_in_order(indexed: list[tuple[int, list]]) -> list:
  """Every process's (index, rows) as one list in index order, on every
  process (JSON-able rows)."""
  merged = sorted((i, rows) for share in gather_json(indexed) for i, rows in share)
  return [row for _, rows in merged for row in rows]


# --- host <-> device ------------------------------------------------------------------


def _deliberate(fn):
  """Marks a helper as a deliberate host/device crossing: allowed under the
  step's transfer guard (JAX's multi-process array constructors count as
  implicit transfers otherwise)."""
  @functools.wraps(fn)
  def crossing(*args, **kwargs):
    with jax.transfer_guard('allow'):
      return fn(*args, **kwargs)
  return crossing


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  """Leading axis over the mesh's batch axes, the rest whole."""
  lead = sharding.logical_to_spec(('batch',), mesh=mesh)
  return NamedSharding(mesh, PartitionSpec(*lead, *([None] * (ndim - 1))))


@_deliberate
def place_batch(batch: dict, mesh, *, replicate_uneven: tuple[str, ...] = ()) -> dict:
  """This process's host rows -> global arrays sharded over the batch axes.

  Arrays named in `replicate_uneven` whose leading dim does not divide over
  those axes (e.g. a few shared prompts) are replicated instead; every
  process then passes the same whole array.
  """
  spec = sharding.logical_to_spec(('batch',), mesh=mesh)
  axes = [a for part in spec if part for a in ((part,) if isinstance(part, str) else part)]
  shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

  def place(name, x):
    x = np.asarray(x)
    whole = name in replicate_uneven and (x.shape[0] * jax.process_count()) % shards != 0
    if whole:  # every process's rows, on every device
      return replicate(gather_rows(x), mesh)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return {k: place(k, v) for k, v in batch.items() if isinstance(v, np.ndarray)}


@_deliberate
def replicate(x: np.ndarray, mesh) -> jax.Array:
  """A host value every process holds alike, on every device of the mesh."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()),
                                                np.asarray(x))


@_deliberate
def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded (or replicated) over its
  leading axis, in order: what `place_batch` was given."""
  if x.is_fully_addressable and jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  by_start = {s.index[0].start or 0: s for s in x.addressable_shards}  # replicas dedupe
  return np.concatenate([np.asarray(jax.device_get(by_start[k].data)) for k in sorted(by_start)])


@_deliberate
def gather_rows(x: np.ndarray) -> np.ndarray:
  """Host rows of every process, concatenated in process order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def gather_json(value) -> list:
  """A JSON-able value from every process, in process order."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  longest = int(gather_rows(np.array([data.size])).max())
  padded = gather_rows(np.pad(data, (0, longest - data.size))[None])
  return [json.loads(bytes(row).rstrip(b'\0')) for row in padded]


def any_process(flag: bool) -> bool:
  return bool(gather_rows(np.array([flag], np.int32)).any())


@_deliberate
def fetch(tree):
  """Whole arrays on every process's host (a collective when the mesh spans
  processes, where device_get cannot read other hosts' shards)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# --- state and update ------------------------------------------------------------------


def init_state(model, tx, seed: int, mesh):
  """(graphdef, state): the model split at the jit boundary and a train state
  {params, opt_state, step, rng} on `mesh`: optimiser moments sharded like
  their params, scalars replicated. With LoRA adapters the optimiser holds
  moments for the trainable part only (lora.trainable)."""
  graphdef, params = nnx.split(model)
  trainable, _ = lora.trainable(params)
  replicated = NamedSharding(mesh, PartitionSpec())
  param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, trainable), param_shardings,
      transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  scalars = jax.device_put({'step': np.zeros((), np.int32),
                            'rng': np.asarray(jax.random.key_data(jax.random.key(seed)))},
                           replicated)
  return graphdef, {'params': params, 'opt_state': opt_state, **scalars}


def tree_mb(tree) -> float:
  """MB of a tree's arrays (global sizes, over every device)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def state_sizes(state) -> dict[str, float]:
  """What a train state holds: trainable parameters, and the MB of the
  parameters (as stored: a quantised base's codes and scales) and of the
  optimiser state (global sizes, over every device)."""
  trainable, _ = lora.trainable(state['params'])
  return {'memory/trainable_params': sum(x.size for x in jax.tree.leaves(trainable)),
          'memory/params_mb': tree_mb(state['params']),
          'memory/opt_state_mb': tree_mb(state['opt_state'])}


def print_sizes(sizes: dict, label: str = '') -> None:
  """`label`: whose state, e.g. 'critic: ' (default: the model's)."""
  if jax.process_index() == 0:
    print(f'{label}trainable parameters {sizes["memory/trainable_params"]:,}; parameters '
          f'{sizes["memory/params_mb"]:.1f} MB, optimiser state '
          f'{sizes["memory/opt_state_mb"]:.1f} MB', file=sys.stderr)


def print_activations(parts: dict, what: str, trainable=None) -> None:
  """One line: activation bytes by part (jpost.memory's prediction). Given
  the `trainable` parameters (placed, so the device's memory in use holds the
  state), warns when those activations and the gradients (one device's
  shards of `trainable`) exceed the memory the first device has left: before
  anything is compiled, not after minutes of it."""
  mb = {name: value / 2**20 for name, value in parts.items()}
  if jax.process_index() == 0:
    print(f"{what} activations up to {sum(mb.values()):.1f} MB per device, predicted "
          f"(saved {mb['saved_activations']:.1f}, layer backward {mb['layer_backward']:.1f}, "
          f"attention {mb['attention']:.1f}, LM head {mb['lm_head']:.1f})", file=sys.stderr)
  if trainable is None:
    return
  grads = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
              for x in jax.tree.leaves(trainable))
  warning = memory_warning(what, sum(parts.values()), grads,
                           jax.local_devices()[0].memory_stats())
  if warning:
    print(warning, file=sys.stderr, flush=True)


def memory_warning(what: str, activations: float, grads: float, stats) -> str | None:
  """The warning for a step whose predicted activations and gradients (bytes
  per device) exceed what the device's memory `stats` say is free, or None."""
  needed = activations + grads
  short = memory.shortfall(needed, stats)
  if short is None:
    return None
  return (f'jpost: warning: the {what} needs about {needed / 2**30:.2f} GB per device '
          f'(activations {activations / 2**30:.2f}, gradients {grads / 2**30:.2f}; predicted) '
          f'beside the state, and the device has {short[0] / 2**30:.2f} of its '
          f'{short[1] / 2**30:.2f} GB free: it may run out of memory. Make the batch smaller '
          '(batch_size or prompts_per_step) or split it (accum_steps; rl.minibatches), set '
          "model.remat='full', or shard the state over more devices (mesh fsdp).")


def batch_devices(mesh) -> int:
  """Devices a batch's rows are split over (the data and fsdp axes)."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def make_update(graphdef, loss_fn: Callable, normalizer_fn: Callable, tx, lr_schedule, *,
                accum_steps: int, mesh, state):
  """Jitted, donated `state, batch -> state, metrics`.

  loss_fn(model, batch, normalizer) -> (loss, metrics), the loss already
  divided by normalizer_fn(whole batch), so micro-batch losses add up:
  micro-batches are scanned and their gradients summed, and the update
  equals one step on the whole batch. Activations follow the mesh's
  sharding rules. Gradients are taken for the trainable parameters only
  (with LoRA: the adapters; the frozen base passes through unchanged).
  """
  grad_fn = jax.value_and_grad(
      lambda trainable, frozen, micro, n: loss_fn(nnx.merge(graphdef, trainable, frozen),
                                                  micro, n), has_aux=True)

  def step(state, batch):
    trainable, frozen = lora.trainable(state['params'])
    # LoRA dropout (if configured) draws from the run's key and the step.
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    with sharding.activation_rules(mesh), lora.dropout(key):
      normalizer = normalizer_fn(batch)
      if accum_steps == 1:  # no accumulator: one params-sized buffer less
        (loss, aux), grads = grad_fn(trainable, frozen, batch, normalizer)
        losses, aux = loss[None], jax.tree.map(lambda x: x[None], aux)
      else:
        micro_batches = jax.tree.map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

        def accumulate(grads, micro_and_index):
          micro, index = micro_and_index
          with lora.dropout(jax.random.fold_in(key, index)):
            (loss, aux), g = grad_fn(trainable, frozen, micro, normalizer)
          return jax.tree.map(jnp.add, grads, g), (loss, aux)
        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, (losses, aux) = jax.lax.scan(accumulate, zeros,
                                            (micro_batches, jnp.arange(accum_steps)))
    updates, opt_state = tx.update(grads, state['opt_state'], trainable)
    out = {'loss': jnp.sum(losses), 'grad_norm': optax.tree.norm(grads),
           'lr': lr_schedule(state['step']), 'normalizer': normalizer}
    out |= {k: jnp.mean(v) for k, v in aux.items() if k != 'loss'}
    params = nnx.merge_state(optax.apply_updates(trainable, updates), frozen)
    return {'params': params, 'opt_state': opt_state,
            'step': state['step'] + 1, 'rng': state['rng']}, out

  shardings = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))


# --- the loop ----------------------------------------------------------------------------


class _Stop(Exception):
  pass


@dataclasses.dataclass(frozen=True)
class Finished:
  step: int  # the last step done (total_steps unless stopped by SIGTERM)
  state: Any
  last: dict  # the last step's metrics
  before: dict  # the baseline evaluation (empty when resumed or not asked for)


@contextlib.contextmanager
def _sigterm() -> Iterator[dict]:
  stop = {'requested': False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
  try:
    yield stop
  finally:
    signal.signal(signal.SIGTERM, previous)


RUN_FILE = 'run.json'


def _run_identity(config) -> dict:
  """What makes a run the one its checkpoints continue: the starting weights,
  the training data and the seed (a longer total_steps or another lr may
  continue it)."""
  data = config.get('data')
  identity = {'model.path': str(config.model.path),
              'data.train': list(data.get('train', ())) if data is not None else [],
              'seed': config.get('seed')}
  return json.loads(json.dumps(identity))


def _same_run(config, workdir: pathlib.Path, *, resuming: bool) -> None:
  """Resuming continues the checkpoints' run, so a workdir whose run.json
  names other starting weights, data or seed is an error, not a silent
  continuation of that other run; a new run records its own."""
  identity, path = _run_identity(config), pathlib.Path(workdir) / RUN_FILE
  if resuming and path.exists():
    saved = json.loads(path.read_text())
    changed = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if changed:
      what = '; '.join(f'{k} {a!r} there, {b!r} now' for k, (a, b) in changed.items())
      raise ConfigError(
          f'{workdir} holds checkpoints of another run ({what}), and resuming would continue '
          'its weights. Give this run another --workdir, or delete that one to start over.')
  elif not resuming and jax.process_index() == 0:
    path.write_text(json.dumps(identity, indent=1) + '\n')


def train(config, workdir: pathlib.Path, *, state, data_iter, step_fn: Callable,
          evaluate: Callable | None = None) -> Finished:
  """Runs step_fn(state, step) -> (state, metrics) up to config.total_steps,
  resuming from workdir's latest checkpoint (the state and `data_iter`'s
  position, per process). evaluate(state, step) -> metrics runs before the
  first step and every config.eval_every steps. A SIGTERM on any process
  saves and stops every process; a non-finite loss stops without saving."""
  for name, least in (('log_every', 1), ('eval_every', 0)):
    if not isinstance(config[name], int) or config[name] < least:
      raise ConfigError(f'config.{name}={config[name]!r}: must be an integer >= {least}'
                        + (' (0: never).' if least == 0 else '.'))
  ckpt = checkpoint.Checkpointer(workdir, every=config.checkpoint.every,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save,
                                 compression=config.checkpoint.get('compression', 'auto'))
  ckpt.check_space(round(tree_mb(_saved_part(state)) * 2**20))
  step = ckpt.latest_step() or 0
  _same_run(config, workdir, resuming=bool(step))
  if step:
    saved, data_states = ckpt.restore(step, _saved_part(state))
    state = _with_frozen(saved, state)
    data_iter.set_state(_own_data_state(data_states, ckpt.directory, step))
    print(f'resumed from step {step} of {ckpt.directory}', file=sys.stderr)
  writer = metrics.MetricsWriter(workdir, tensorboard=config.tensorboard, resume_step=step)
  eval_due = lambda s: evaluate is not None and config.eval_every and (
      s % config.eval_every == 0 or s == config.total_steps)
  before, last = {}, {}
  if step == 0 and eval_due(0):
    before = evaluate(state, 0)
    writer.write(0, before)
    _console(0, config.total_steps, before)
  guard = config.get('transfer_guard', 'allow')
  if guard not in GUARDS:
    raise ConfigError(f'config.transfer_guard={guard!r}; use one of {GUARDS}.')
  try:
    with _sigterm() as stop:
      while step < config.total_steps:
        with jax.transfer_guard(guard):
          state, out = step_fn(state, step)
        step += 1
        _stop_if_not_finite(out, step, ckpt, _nan_hint(config))
        evaluated = eval_due(step)
        if evaluated:
          out |= evaluate(state, step)
        writer.write(step, out)
        if step % config.log_every == 0 or step == config.total_steps or evaluated:
          _console(step, config.total_steps, out)
        last = out
        stopping = any_process(stop['requested'])
        if ckpt.due(step) or step == config.total_steps or stopping:
          ckpt.save(step, _saved_part(state), {'processes': gather_json(data_iter.get_state())})
        if stopping:
          raise _Stop
        _fault_kill(step, ckpt)
  except _Stop:
    logging.warning('SIGTERM: saved step %d to %s and stopped.', step, ckpt.directory)
  finally:
    ckpt.close()
    writer.close()
  return Finished(step=step, state=state, last=last, before=before)


def _saved_part(state):
  """What a checkpoint holds: the state with every 'params' cut to its
  trainable part. A frozen (LoRA) base is the model's files, read again on
  resume, so a checkpoint holds adapters and their moments, not the base."""
  if not isinstance(state, dict):
    return state
  return {k: lora.trainable(v)[0] if k == 'params' else _saved_part(v) for k, v in state.items()}


def _with_frozen(saved, state):
  """A restored `_saved_part` with `state`'s frozen parameters put back."""
  if not isinstance(state, dict):
    return saved
  return {k: nnx.merge_state(saved[k], lora.trainable(v)[1]) if k == 'params'
          else _with_frozen(saved[k], v) for k, v in state.items()}


def _own_data_state(saved: dict, directory, step: int):
  states = saved.get('processes', [saved])  # one-process checkpoints of before 'processes'
  if len(states) != jax.process_count():
    raise ConfigError(
        f'the checkpoint of step {step} in {directory} was written by {len(states)} '
        f'processes and this run has {jax.process_count()}; each process resumes its own '
        'data shard, so resume with the same number of processes.')
  return states[jax.process_index()]


def _stop_if_not_finite(out: dict, step: int, ckpt, hint: str = '') -> None:
  if not math.isfinite(float(out['loss'])):
    raise FloatingPointError(
        f'loss is {out["loss"]} at step {step}; stopping without saving. The last good '
        f'checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept. Lower '
        'config.optim.lr, enable clipping (config.optim.clip_norm) or check the data '
        f'and rewards.{hint}')


def _nan_hint(config) -> str:
  """What else makes this run's loss NaN: attention='cudnn' ('auto' on a
  GPU may pick it) poisons a packed row with more segments than it was
  compiled for (models/attention.py); SFT's packer never makes one."""
  model = config.get('model') or {}
  if model.get('attention') != 'cudnn' and not (
      model.get('attention', 'auto') == 'auto' and jax.default_backend() == 'gpu'):
    return ''
  return (" With attention='cudnn', a packed row of more than "
          f"config.model.attention_max_segments ({model.get('attention_max_segments', 16)}) "
          'segments gives NaN outputs: raise it.')


def _console(step: int, total: int, out: dict) -> None:
  if jax.process_index() == 0:
    metrics.console_line(step, total, out)


def _fault_kill(step: int, ckpt) -> None:
  if step == _FAULT_KILL_AT_STEP and _FAULT_KILL_PROCESS in (-1, jax.process_index()):
    ckpt.wait()
    os.kill(os.getpid(), signal.SIGKILL)


def export(config, workdir: pathlib.Path, graphdef, params, tokenizer, save: Callable) -> None:
  """The final model in HF format at workdir/hf (LoRA adapters merged in)
  and, with LoRA, the adapters in PEFT format at workdir/adapter, written by
  process 0."""
  if not config.export_hf:
    return
  params = fetch(params)
  if jax.process_index() == 0:
    model = nnx.merge(graphdef, params)
    path = save(model, workdir / 'hf', tokenizer=tokenizer)
    print(f'exported HF checkpoint to {path}' + (' (LoRA adapters merged)' if
          model.config.lora else ''), file=sys.stderr)
    if model.config.lora:
      # The folder the base was read from, which peft and transformers can load
      # (an embedded name or a .gguf file is neither a folder nor a hub id).
      base = pretrained.resolve(config.model.path).resolve()
      path = lora.save_peft(model, workdir / 'adapter', base_model=str(base))
      print(f'exported the LoRA adapter (PEFT format) to {path}', file=sys.stderr)
