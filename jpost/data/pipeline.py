"""Grain pipelines: rows -> validated examples -> tokens + masks -> packed batches.

    sources (JSONL / Parquet / lists)  -- read and validated up front, so bad
      rows are reported (file:line) before training starts
    -> per-process shard -> shuffle(seed) -> repeat(epochs) -> mix(weights)
    -> map(tokenise + mask + truncate)            (lazily, counted)
    -> pack (SFT) or pad -> batch -> numpy dicts of the batch contract

Every pipeline is a `grain.IterDataset`: deterministic for a seed, and its
iterator's `get_state()` / `set_state()` resume exactly (the checkpoint stores
that state). Batches follow the contract of ../DESIGN.md: `tokens`,
`positions`, `segment_ids` (0 = padding), `loss_mask`, all [B, T] int32.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Any, Callable, Sequence

import grain
import numpy as np

from jpost.data import masking, rows, sources, steps
from jpost.data.packing import BestFitDecreasingPackIterDataset
from jpost.errors import ConfigError
from jpost.tokenizer import Tokenizer

KINDS = ('sft', 'preference', 'prompt', 'steps')
_NORMALIZE = {'sft': rows.normalize_sft, 'preference': rows.normalize_preference,
              'prompt': rows.normalize_prompt, 'steps': rows.normalize_steps}


class PipelineStats:
  """Counts of what the pipeline did with rows: validation skips (by reason,
  with examples) from the RowFilter, and truncations/drops while encoding."""

  def __init__(self, row_filter: rows.RowFilter):
    self.row_filter = row_filter
    self.encoded = collections.Counter()
    self.rows_per_pass = 0  # valid rows over all sources (one epoch)
    self.dropped_in_a_row = 0
    self._lock = threading.Lock()  # Grain may map in several threads

  def count(self, key: str, n: int = 1):
    with self._lock:
      self.encoded[key] += n

  def as_dict(self) -> dict[str, Any]:
    with self._lock:
      return {'rows': self.row_filter.stats(), 'encoded': dict(self.encoded)}

  def __getstate__(self):
    return {'row_filter': self.row_filter, 'encoded': self.encoded,
            'rows_per_pass': self.rows_per_pass}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def resolve_sources(specs):
  """Named built-in data sets ('gsm8k:sft_train', 'arith:train') -> files;
  others unchanged."""
  def one(spec):
    if isinstance(spec, str) and spec.startswith('gsm8k:'):
      from jpost.data import gsm8k
      files = gsm8k.build_gsm8k()
      name = spec.split(':', 1)[1]
      if name not in files:
        raise ConfigError(f'data source {spec!r}: unknown split; use gsm8k:{{{", ".join(files)}}}.')
      return str(files[name])
    if isinstance(spec, str) and spec.startswith('arith:'):
      from jpost.data import arith
      return str(arith.build(spec.split(':', 1)[1]))
    return spec
  if isinstance(specs, (list, tuple)) and not (specs and isinstance(specs[0], dict)):
    return [one(s) for s in specs]
  return one(specs)


def load_examples(source, kind: str, row_filter: rows.RowFilter, **normalize_kw) -> list[dict]:
  """Reads one source and normalises every row (bad rows: error or counted skip)."""
  normalize = _NORMALIZE[kind]
  examples = []
  for row in sources.load_source(source, row_filter=row_filter):
    where = row[rows.WHERE_KEY]
    example = row_filter.apply(functools.partial(normalize, where=where, **normalize_kw),
                               row, where, new_row=False)
    if example is not None:
      example['_where'] = where
      examples.append(example)
  return examples


def _examples_dataset(source_specs: Sequence, kind: str, *, weights, seed: int,
                      num_epochs: int | None, stats: PipelineStats,
                      **normalize_kw) -> grain.MapDataset:
  if not isinstance(source_specs, (list, tuple)) or (
      source_specs and isinstance(source_specs[0], dict)):
    source_specs = [source_specs]  # one path, or one list of row dicts
  if weights is not None and len(weights) != len(source_specs):
    raise ConfigError(f'{len(weights)} mixture weights for {len(source_specs)} sources; '
                     'give one weight per source.')
  if weights is not None and not all(isinstance(w, (int, float)) and w > 0 and w < math.inf
                                     for w in weights):
    raise ConfigError(f'mixture weights {list(weights)}: each must be a positive finite '
                      'number (drop a source rather than weigh it 0).')
  # Several sources for a finite pass are read one after the other; otherwise
  # they are endless streams interleaved by weight (equal weights by default).
  concatenate = len(source_specs) > 1 and num_epochs is not None
  if concatenate and weights:
    raise ConfigError(
        f'a weighted mixture of {len(source_specs)} sources is an endless stream; set '
        'num_epochs=None (train for a number of steps), or drop the weights to read each '
        'source num_epochs times one after the other.')
  datasets = []
  for i, spec in enumerate(source_specs):
    examples = load_examples(spec, kind, stats.row_filter, **normalize_kw)
    stats.rows_per_pass += len(examples)
    if not examples:
      raise ConfigError(f'data source {i} ({str(spec)[:80]}) has no usable rows '
                       f'(row stats: {stats.row_filter.stats()}).')
    ds = grain.MapDataset.source(examples)
    # Each source its own seed, each epoch its own order (Grain reshuffles per repeat).
    ds = ds.shuffle(seed=seed + 7919 * i)
    datasets.append(ds.repeat(num_epochs if len(source_specs) == 1 or concatenate else None))
  if len(datasets) == 1:
    return datasets[0]
  if concatenate:
    return grain.MapDataset.concatenate(datasets)
  return grain.MapDataset.mix(datasets, list(weights) if weights else [1.0] * len(datasets))


def _process_block(ds: grain.MapDataset, *, block: int, shard_index: int,
                   shard_count: int, tail: bool = False) -> grain.MapDataset:
  """Shard `shard_index`'s examples of the one global order: block j of
  every shard_count consecutive blocks of `block` examples. With block =
  batch_size / shard_count, shard k's batch i holds rows k*block.. of the
  global batch i one process would read (exactly, when rows are neither
  packed nor dropped), so a run's batches do not depend on its processes.
  The examples past the last whole round of blocks are left out, or with
  `tail` read too, dealt out one to each shard in turn (so that a shard
  gets none of them only where they are fewer than the shards): every
  shard then runs as many rounds, None where its last block runs out."""
  if shard_count == 1:
    return ds
  per_round = block * shard_count
  whole = len(ds) // per_round
  rounds = -(-len(ds) // per_round) if tail else whole

  def pick(local: int):
    round_, offset = divmod(local, block)
    if round_ < whole:
      index = (round_ * shard_count + shard_index) * block + offset
    else:  # the tail
      index = whole * per_round + offset * shard_count + shard_index
    return ds[index] if index < len(ds) else None
  return grain.MapDataset.range(rounds * block).map(pick)


def _counted(fn: Callable, stats: PipelineStats) -> Callable:
  """Wraps an encoder: RowErrors become counted drops (None) under the row
  filter's policy; 'error' stops the run with the row's location."""
  def encode(example):
    try:
      out = fn(example)
    except rows.RowError as e:
      if stats.row_filter.policy == 'error' and e.reason != 'too_long':
        raise
      stats.row_filter.record(e.reason, e.where, str(e))
      stats.count(f'dropped_{e.reason}')
      stats.dropped_in_a_row += 1
      # An endless stream in which no row can be used would look for one
      # forever (Grain skips the dropped rows silently).
      if stats.dropped_in_a_row > stats.rows_per_pass:
        raise ConfigError(
            f'every one of {stats.rows_per_pass} rows was dropped while encoding '
            f'({stats.as_dict()["encoded"]}); check max_len, truncation and the rows.') from e
      return None
    stats.dropped_in_a_row = 0
    return out
  return encode


def _pad(array: np.ndarray, length: int, value: int = 0) -> np.ndarray:
  return np.pad(array, (0, length - len(array)), constant_values=value)


def _sequence_fields(tokens, mask, length: int, prefix: str = '') -> dict[str, np.ndarray]:
  n = len(tokens)
  return {f'{prefix}tokens': _pad(tokens, length), f'{prefix}positions': _pad(np.arange(n, dtype=np.int32), length),
          f'{prefix}segment_ids': _pad(np.ones(n, np.int32), length),
          f'{prefix}loss_mask': _pad(mask, length)}


def _encode_sft(example, *, tokenizer, mask_config, stats):
  tokens, mask = masking.encode_sft(example, tokenizer, mask_config.mask_mode)
  tokens, mask, truncated = masking.truncate(tokens, mask, mask_config, where=example['_where'])
  stats.count('truncated' if truncated else 'encoded')
  return {'tokens': tokens, 'loss_mask': mask}


def _encode_preference(example, *, tokenizer, mask_config, stats):
  out = {}
  for side in ('chosen', 'rejected'):
    tokens, mask = masking.encode_response(example, side, tokenizer)
    tokens, mask, truncated = masking.truncate(tokens, mask, mask_config, where=example['_where'])
    if truncated:
      stats.count(f'truncated_{side}')
    out |= _sequence_fields(tokens, mask, mask_config.max_len, f'{side}_')
  if np.array_equal(out['chosen_tokens'], out['rejected_tokens']):
    raise rows.RowError('chosen_equals_rejected', example['_where'],
                        'chosen and rejected are identical after truncation',
                        'raise max_len or remove the row')
  stats.count('encoded')
  return out | {'margin': np.float32(example['margin'])}


def _encode_prompt(example, *, tokenizer, max_len, stats):
  tokens = masking.encode_prompt(example, tokenizer)
  if len(tokens) > max_len:
    raise rows.RowError('too_long', example['_where'],
                        f'prompt has {len(tokens)} tokens, more than max_prompt_len={max_len}',
                        'raise max_prompt_len or shorten the prompt')
  stats.count('encoded')
  return {'tokens': tokens, 'extra': example['extra'], 'prompt': example['prompt']}


def _encode_steps(example, *, tokenizer, max_len, separator, stats):
  where = example['_where']
  encoding = steps.encode_steps(example['prompt'], example['steps'], tokenizer,
                                separator=separator, max_len=max_len, where=where)
  out = steps.training_fields(encoding, example['labels'], length=max_len, where=where)
  if encoding.steps_cut:  # the row is kept with the steps that fit
    stats.count('truncated')
    stats.count('steps_cut', encoding.steps_cut)
  else:
    stats.count('encoded')
  return out


def _left_pad_batch(items: Sequence[dict], *, length: int, pad_id: int) -> dict[str, Any]:
  """Prompts right-aligned to `length`; positions start at 0 on the first real token."""
  batch = {'tokens': np.full((len(items), length), pad_id, np.int32),
           'positions': np.zeros((len(items), length), np.int32),
           'segment_ids': np.zeros((len(items), length), np.int32)}
  for row, item in enumerate(items):
    n = len(item['tokens'])
    batch['tokens'][row, length - n:] = item['tokens']
    batch['positions'][row, length - n:] = np.arange(n)
    batch['segment_ids'][row, length - n:] = 1
  batch['extra'] = [item['extra'] for item in items]
  batch['prompt'] = [item['prompt'] for item in items]
  return batch


def _filled_up(batch: dict, *, size: int) -> dict:
  """`batch` with empty (all-zero) rows added up to `size` rows."""
  return {k: np.concatenate([v, np.zeros((size - len(v), *v.shape[1:]), v.dtype)])
          for k, v in batch.items()}


def stream_weights(weights, epochs) -> list[float] | None:
  """`data.weights` for a pipeline of `epochs`: the mixture of an endless
  training stream (epochs None); a held-out pass (epochs=1) reads each of its
  own sources whole, however many there are."""
  return list(weights) if weights and epochs is None else None


def build(kind: str, source_specs, tokenizer: Tokenizer, *, batch_size: int, max_len: int,
          mask_mode: str = 'auto', truncation: str = 'drop', packing: bool = True,
          weights: Sequence[float] | None = None, seed: int = 0, num_epochs: int | None = None,
          policy: str = 'error', shard_index: int = 0, shard_count: int = 1,
          num_threads: int = 0, require_assistant: bool = False, drop_remainder: bool = True,
          step_separator: str = steps.DEFAULT_SEPARATOR, max_segments: int | None = None,
          pack_window: int = 128, row_len: int | None = None, pad_last: bool = False):
  """(grain.IterDataset of batches, PipelineStats) for `kind` in KINDS.

  sft: packed (or padded) rows of `tokens, positions, segment_ids, loss_mask`;
    a packed row holds at most `max_segments` samples (the model's
    `attention_max_segments`, which attention='cudnn' is compiled for).
    `row_len` (a multiple of max_len; default max_len) packs the samples of
    row_len // max_len rows into one row, padding-free: a batch still holds
    batch_size x max_len tokens, as batch_size x max_len // row_len rows,
    and samples still have at most max_len tokens.
    Packing is best-fit-decreasing over windows of `pack_window` consecutive
    examples (data/packing.py); a wider window fills rows better and mixes
    examples from further apart (and, in endless streams, from adjacent
    epochs); README, "Data", has the fill it measured on GSM8K.
  preference: `chosen_*` and `rejected_*` of the same row side by side, padded.
  prompt: left-padded `tokens, positions, segment_ids` plus `extra` (the row's
    other columns, unchanged) and `prompt`, lists of length batch_size.
  steps: right-padded `tokens, positions, segment_ids` plus `step_targets`
    (float32 label at each step's last token) and `step_mask` (1 there), for
    process reward models; steps joined by `step_separator` (see data/steps.py).
  `num_epochs=None` repeats forever. `batch_size` is the global batch:
  `shard_index/shard_count` (jax.process_index() / jax.process_count())
  give each process batch_size / shard_count rows of it (see
  _process_block). `drop_remainder` False keeps a last, smaller batch
  (passes that must see every row once; with several shards, the rows past
  the last whole global batch are not read); `pad_last` (preference and
  steps) reads those too, and fills each shard's last batch up with empty
  rows (zeros: no tokens, no targets), so that it has the others' shape and
  a pass compiles one step, whatever its batch size; the losses give empty
  pairs and rows no weight. (A shard whose last block holds no row gives
  one batch fewer, as one whose rows a filter dropped may; the evaluation
  loop feeds an empty batch there.)
  """
  if kind not in KINDS:
    raise ValueError(f'pipeline kind {kind!r} unknown; use one of {KINDS}.')
  if batch_size <= 0 or batch_size % shard_count:
    raise ConfigError(f'batch_size={batch_size}: must be positive and divide over '
                      f'{shard_count} processes.')
  if not isinstance(pack_window, int) or pack_window < 1:
    raise ConfigError(f'pack_window={pack_window!r}: the SFT packer packs windows of this '
                      'many examples; give a whole number, 1 or more (128 by default).')
  batch_size //= shard_count  # this process's rows of each batch
  row_len = row_len or max_len
  if kind == 'sft' and row_len != max_len:
    merged = row_len // max_len
    if row_len % max_len or not packing or batch_size % merged:
      raise ConfigError(
          f'row_len={row_len}: padding-free rows hold the samples of whole rows of '
          f'max_len={max_len}, packed; {batch_size} rows a process must split into rows of '
          f'{merged} x max_len. Use a row length that divides batch_size x max_len.')
  stats = PipelineStats(rows.RowFilter(policy=policy))
  normalize_kw = {'require_assistant': require_assistant} if kind == 'sft' else {}
  ds = _examples_dataset(source_specs, kind, weights=weights, seed=seed, num_epochs=num_epochs,
                         stats=stats, **normalize_kw)
  ds = _process_block(ds, block=batch_size, shard_index=shard_index, shard_count=shard_count,
                      tail=pad_last and kind in ('preference', 'steps'))
  if kind == 'prompt':
    encode = functools.partial(_encode_prompt, tokenizer=tokenizer, max_len=max_len, stats=stats)
  elif kind == 'steps':
    encode = functools.partial(_encode_steps, tokenizer=tokenizer, max_len=max_len,
                               separator=step_separator, stats=stats)
  else:
    mask_config = masking.MaskConfig(max_len=max_len, mask_mode=mask_mode, truncation=truncation)
    encoder = _encode_sft if kind == 'sft' else _encode_preference
    encode = functools.partial(encoder, tokenizer=tokenizer, mask_config=mask_config, stats=stats)
  counted = _counted(encode, stats)
  ds = ds.map(lambda example: None if example is None else counted(example))
  # num_threads=0 reads in the caller's thread. (Grain's default options,
  # which `None` would give, start 16 threads that prefetch 500 rows.)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=4 * batch_size if num_threads else 0))
  it = it.filter(lambda x: x is not None)
  if kind == 'sft':
    if packing:
      it = BestFitDecreasingPackIterDataset(it, length=row_len, window=pack_window,
                                            max_segments=max_segments, seed=seed)
    else:
      it = it.map(lambda x: _sequence_fields(x['tokens'], x['loss_mask'], max_len))
    it = it.batch(batch_size * max_len // row_len, drop_remainder=True)
  elif kind in ('preference', 'steps'):
    it = it.batch(batch_size, drop_remainder=drop_remainder and not pad_last)
    if pad_last:
      it = it.map(functools.partial(_filled_up, size=batch_size))
  else:
    it = it.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=functools.partial(_left_pad_batch, length=max_len,
                                             pad_id=tokenizer.pad_id))
  return it, stats
