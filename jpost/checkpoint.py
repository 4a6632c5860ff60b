"""Orbax checkpoints of the train state, the data iterator and the run's metadata.

One CheckpointManager under workdir/checkpoints keeps the last `keep` steps.
Each step holds `state` (params, optimiser state, step, rng: arrays, restored
with their shardings) and `data` (the Grain iterator state as JSON), so a
resumed run neither replays nor skips a sample.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from jpost.errors import ConfigError


class Checkpointer:
  def __init__(self, workdir: str | pathlib.Path, *, every: int, keep: int = 2,
               async_save: bool = True):
    if every <= 0 or keep <= 0:
      raise ConfigError(f'config.checkpoint.every ({every}) and .keep ({keep}) must be positive.')
    self.every = every
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save),
        item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts saving (asynchronously); the previous save finishes first."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, target_state):
    """(state, data_state) of `step`; arrays take `target_state`'s shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
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
