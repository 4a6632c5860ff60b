"""Best-fit-decreasing packing of SFT examples into fixed-length rows.

Grain's packers (FirstFitPackIterDataset, BestFitPackIterDataset) emit all
their open bins as soon as one example fits none of them, so rows leave
the room a later, shorter example would have filled. This packer reads a
window of examples, packs the whole window by best-fit-decreasing (as TRL's
SFTTrainer does), and emits its rows in a shuffled order:

    parent examples {'tokens', 'loss_mask'} (1-D, at most `length` long)
    -> windows of `window` consecutive examples (the last may be shorter)
    -> best_fit_decreasing(lengths) -> rows of example indices
    -> shuffle the rows (seed, window index) -> one row at a time:
       {'tokens', 'positions', 'segment_ids', 'loss_mask'}, [length] int32

The iterator's state is the parent's state at the start of the current
window, the window's index (its rows' order) and how many of its rows were
emitted; restoring reads that window again, packs it the same way and skips
those rows.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import grain
import numpy as np

from jpost.errors import ConfigError


def best_fit_decreasing(lengths: Sequence[int], capacity: int,
                        max_segments: int | None = None) -> list[list[int]]:
  """Rows of indices into `lengths`, each summing to at most `capacity` and
  holding at most `max_segments` indices (None: no limit).

  Longest first (equal lengths in index order), each into the open row with
  the least room left that still fits it (equal room: the row opened first),
  else into a new row. Within a row, indices are in the order placed.
  """
  for i, n in enumerate(lengths):
    if n > capacity:
      raise ValueError(f'example {i} has {n} tokens, more than the row length {capacity}.')
  rows: list[list[int]] = []
  room: list[int] = []  # free slots of each row
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    fits = [r for r in range(len(rows)) if room[r] >= lengths[i]
            and (max_segments is None or len(rows[r]) < max_segments)]
    if fits:
      r = min(fits, key=lambda r: (room[r], r))
    else:
      r = len(rows)
      rows.append([])
      room.append(capacity)
    rows[r].append(i)
    room[r] -= lengths[i]
  return rows


def packed_row(examples: Sequence[dict], length: int) -> dict[str, np.ndarray]:
  """One row of the batch contract: the examples one after the other, segment
  ids 1, 2, ..., positions from 0 in each, zeros after the last."""
  row = {key: np.zeros(length, np.int32)
         for key in ('tokens', 'positions', 'segment_ids', 'loss_mask')}
  start = 0
  for segment, example in enumerate(examples, 1):
    end = start + len(example['tokens'])
    row['tokens'][start:end] = example['tokens']
    row['loss_mask'][start:end] = example['loss_mask']
    row['segment_ids'][start:end] = segment
    row['positions'][start:end] = np.arange(end - start)
    start = end
  return row


def pack_window(examples: Sequence[dict], *, length: int, max_segments: int | None,
                seed: int, window_index: int) -> list[dict[str, np.ndarray]]:
  """The window's rows, best-fit-decreasing, in an order drawn from (seed,
  window_index): the packer makes them longest first, and batches should not
  be sorted by length."""
  groups = best_fit_decreasing([len(e['tokens']) for e in examples], length, max_segments)
  order = np.random.default_rng((seed, window_index)).permutation(len(groups))
  return [packed_row([examples[i] for i in groups[r]], length) for r in order]


class BestFitDecreasingPackIterDataset(grain.IterDataset):
  """Packs its parent's examples into rows of `length` tokens, `window`
  examples at a time (see the module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, length: int, window: int,
               max_segments: int | None = None, seed: int = 0):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f'window={window}: the packer needs at least 1 example per window.')
    if max_segments is not None and max_segments < 1:
      raise ValueError(f'max_segments={max_segments}: must be positive, or None.')
    self._length, self._window = length, window
    self._max_segments, self._seed = max_segments, seed

  def __iter__(self) -> grain.DatasetIterator:
    return _BestFitDecreasingPackIterator(
        self._parent.__iter__(), length=self._length, window=self._window,
        max_segments=self._max_segments, seed=self._seed)

  def __str__(self) -> str:
    return f'BestFitDecreasingPackIterDataset(length={self._length}, window={self._window})'


class _BestFitDecreasingPackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, *, length: int, window: int,
               max_segments: int | None, seed: int):
    super().__init__(parent)
    self._length, self._window = length, window
    self._max_segments, self._seed = max_segments, seed
    self._window_index = 0  # windows read before the current one
    self._window_start = None  # the parent's state before the current window
    self._rows = None  # the current window's rows; None between windows
    self._emitted = 0  # of the current window's rows (to skip, after set_state)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._rows is None:
      self._window_start = self._parent.get_state()
      examples = list(itertools.islice(self._parent, self._window))
      if not examples:
        raise StopIteration
      self._rows = pack_window(examples, length=self._length, max_segments=self._max_segments,
                               seed=self._seed, window_index=self._window_index)
      if self._emitted >= len(self._rows):
        raise ConfigError(f'packer state skips {self._emitted} rows of window '
                          f'{self._window_index}, which packs into {len(self._rows)}: the '
                          'state is from other data or another packer configuration.')
    row = self._rows[self._emitted]
    self._emitted += 1
    if self._emitted == len(self._rows):
      self._window_index += 1
      self._window_start, self._rows, self._emitted = None, None, 0
    return row

  def get_state(self) -> dict[str, Any]:
    # Between windows the parent already stands at the next window's start.
    parent = self._parent.get_state() if self._rows is None else self._window_start
    return {'parent': parent, 'window_index': self._window_index, 'emitted': self._emitted,
            'window': self._window, 'length': self._length}

  def set_state(self, state: dict[str, Any]) -> None:
    # Rows emitted count within a window of this size; in another's they
    # would skip the wrong rows.
    if state.get('window') != self._window or 'window_index' not in state:
      raise ConfigError(
          f'the data iterator state {str(state)[:120]} is not that of a packer of '
          f'{self._window}-example windows: resume with the data.pack_window it was saved '
          'with (a checkpoint from before best-fit-decreasing packing cannot resume its '
          'data position).')
    # So do rows of another length. (A state saved before the packer
    # recorded its row length is taken as it is.)
    if state.get('length', self._length) != self._length:
      raise ConfigError(
          f'the data iterator state is that of a packer of {state["length"]}-token rows, this '
          f'one packs {self._length}-token rows: resume with the row layout it was saved with '
          '(data.max_len and data.padding_free).')
    self._parent.set_state(state['parent'])
    self._window_index, self._emitted = state['window_index'], state['emitted']
    # The window is read again (and its emitted rows skipped) on the next row.
    self._window_start, self._rows = None, None

  def __str__(self) -> str:
    return 'BestFitDecreasingPackIterator'
