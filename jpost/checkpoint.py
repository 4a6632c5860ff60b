"""Orbax checkpoints of the train state, the data iterator and the run's metadata.

One CheckpointManager under workdir/checkpoints keeps the last `keep` steps.
Each step holds `state` (params, optimiser state, step, rng: arrays, restored
with their shardings) and `data` (the Grain iterator state as JSON), so a
resumed run neither replays nor skips a sample.

Orbax compresses each array chunk with zstd by default. On a CPU backend
that work competes with training for the same cores, so there
`config.checkpoint.compression='auto'` saves uncompressed (`compresses`).
"""

from __future__ import annotations

import inspect
import pathlib
import shutil
import sys

import jax
import orbax.checkpoint as ocp

from jpost.errors import ConfigError


COMPRESSION = ('auto', 'zstd', 'none')


def compresses(compression: str, backend: str | None = None) -> bool:
  """Whether checkpoints compress their arrays (`config.checkpoint.compression`:
  'zstd', 'none' or 'auto'). 'auto' compresses except on a CPU backend,
  where zstd runs on the cores that train and slows the steps after an
  asynchronous save (SmolLM2's 1.6 GB float32 state: 4.3-15.6 s a save
  with zstd against 2.3-10.3 s without, 1250 against 1614 MB;
  bench/RESULTS.md). Beside an accelerator the host's cores are free."""
  if compression not in COMPRESSION:
    raise ConfigError(f'config.checkpoint.compression={compression!r}; use one of {COMPRESSION}.')
  if compression == 'auto':
    return (backend or jax.default_backend()) != 'cpu'
  return compression == 'zstd'


def _state_handler(compression: str):
  """Orbax's pytree handler, compressing as `compresses` says. Orbax before
  0.11.26 always compresses: there 'auto' does too, and 'none' is an error."""
  compress = compresses(compression)
  if 'use_compression' in inspect.signature(ocp.PyTreeCheckpointHandler).parameters:
    return ocp.PyTreeCheckpointHandler(use_compression=compress)
  if compression == 'none':
    raise ConfigError(
        "config.checkpoint.compression='none' needs orbax-checkpoint >= 0.11.26 (this one "
        f"always compresses: {getattr(ocp, '__version__', 'unknown')}); upgrade it or use 'auto'.")
  return ocp.PyTreeCheckpointHandler()


class Checkpointer:
  def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int = 2,
               async_save: bool = True, compression: str = 'auto'):
    if every <= 0 or keep <= 0:
      raise ConfigError(f'config.checkpoint.every ({every}) and .keep ({keep}) must be positive.')
    self.every = every
    self.keep = keep
    self.compresses = compresses(compression)
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_handlers={'state': _state_handler(compression),
                       'data': ocp.JsonCheckpointHandler()})

  def check_space(self, state_bytes: int) -> None:
    """Before the first step: a ConfigError if the disk under the checkpoints
    cannot hold one uncompressed save of `state_bytes` (the run saves at its
    last step at least, and would fail there, after all its steps, in a
    storm of the writer threads' tracebacks); a warning on stderr if it
    cannot hold `keep` of them plus the one being written. The steps already
    there count as free: they are replaced."""
    free = shutil.disk_usage(self.directory).free + _bytes_under(self.directory)
    gb = lambda n: f'{n / 2**30:.2f} GB'
    where = (f'{self.directory} has {gb(free)} free (counting earlier checkpoints there) '
             f'for a train state of {gb(state_bytes)}')
    if free < state_bytes and not self.compresses:
      raise ConfigError(f'{where}: not one checkpoint fits. Free space there or use another '
                        '--workdir.')
    if free < (self.keep + 1) * state_bytes and jax.process_index() == 0:
      print(f'jpost: warning: {where}, and config.checkpoint.keep={self.keep} keeps '
            f'{self.keep} (plus the one being written): a save may fail on a full disk. Free '
            'space, lower config.checkpoint.keep or use another --workdir.', file=sys.stderr)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving (asynchronously); the previous save finishes first."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, target_state):
    """(state, data_state) of `step`; arrays take `target_state`'s shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
          data=ocp.args.JsonRestore()))
    except ValueError as e:
      raise ConfigError(
          f'cannot resume from step {step} in {self.directory}: the saved train state does '
          'not match this run (the model or config.optim changed, e.g. clip_norm or the '
          'optimiser name). Resume with the config that wrote it, or use a new --workdir.'
          f'\n{str(e)[:1500]}') from e
    return restored['state'], restored['data']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _bytes_under(directory: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in directory.rglob('*') if f.is_file())
