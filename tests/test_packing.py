"""Best-fit-decreasing window packing: hand-computed rows, nothing lost or
repeated, the segment limit, exact resume, and a fuller fill than Grain's
first-fit on GSM8K."""

import collections
import json

import grain
import numpy as np
import pytest

from jpost.data import packing, pipeline
from jpost.errors import ConfigError
from jpost.models import pretrained
from jpost.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def smollm2():
  return Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))


def _example(i, n):
  """Example i: n tokens 1000 * (i + 1), +1, ...; targets after its first third."""
  return {'tokens': 1000 * (i + 1) + np.arange(n, dtype=np.int32),
          'loss_mask': (np.arange(n) >= n // 3).astype(np.int32)}


def _rows(examples, **kw):
  parent = grain.MapDataset.source(examples).to_iter_dataset()
  return list(packing.BestFitDecreasingPackIterDataset(parent, **kw))


def _segments(row):
  """The row's samples as tuples of their tokens, in order."""
  segment_ids = row['segment_ids']
  return [tuple(row['tokens'][segment_ids == s]) for s in range(1, segment_ids.max() + 1)]


@pytest.mark.parametrize('lengths, max_segments, expected', [
    # 200 opens a row (56 left); 120 fits none, opens one (136 left); 100 fits
    # only there (36 left); 60 fits none; 50 fits rows 0 (56) and 2 (196):
    # the fuller is row 0.
    ([200, 120, 100, 60, 50], None, [[0, 4], [1, 2], [3]]),
    # First-fit in read order would put 150 and 50 together; best-fit puts 50
    # with 200, where it leaves 6 slots rather than 56.
    ([150, 200, 50], None, [[1, 2], [0]]),
    ([200, 200, 56], None, [[0, 2], [1]]),  # equal room: the row opened first
    ([50, 200, 50], None, [[1, 0], [2]]),  # equal lengths: in index order
    ([10] * 5, 2, [[0, 1], [2, 3], [4]]),  # room left, but two samples a row
    ([256, 1], 1, [[0], [1]]),
    ([], None, []),
])
def test_best_fit_decreasing_by_hand(lengths, max_segments, expected):
  assert packing.best_fit_decreasing(lengths, 256, max_segments) == expected


def test_an_example_longer_than_a_row_is_an_error():
  with pytest.raises(ValueError, match='example 1 has 257 tokens'):
    packing.best_fit_decreasing([10, 257], 256)


def test_window_rows_by_hand():
  """The five examples of the first case above, as the rows the iterator emits."""
  examples = [_example(i, n) for i, n in enumerate([200, 120, 100, 60, 50])]
  def expected(indices):
    pad = 256 - sum(len(examples[i]['tokens']) for i in indices)
    cat = lambda parts: np.concatenate([*parts, np.zeros(pad, np.int32)])
    return {'tokens': cat(examples[i]['tokens'] for i in indices),
            'positions': cat(np.arange(len(examples[i]['tokens'])) for i in indices),
            'segment_ids': cat(np.full(len(examples[i]['tokens']), s, np.int32)
                               for s, i in enumerate(indices, 1)),
            'loss_mask': cat(examples[i]['loss_mask'] for i in indices)}
  want = {row['tokens'][0]: row for row in map(expected, [[0, 4], [1, 2], [3]])}
  got = _rows(examples, length=256, window=5)
  assert sorted(row['tokens'][0] for row in got) == sorted(want)  # each row once
  for row in got:
    assert row.keys() == want[row['tokens'][0]].keys()
    for key, value in row.items():
      assert value.dtype == np.int32 and value.shape == (256,)
      np.testing.assert_array_equal(value, want[row['tokens'][0]][key], err_msg=key)


@pytest.mark.parametrize('window', [1, 5, 23, 64])
@pytest.mark.parametrize('max_segments', [None, 1, 3])
def test_every_example_once_and_at_most_max_segments(window, max_segments):
  """23 examples: windows of 5 leave a partial last one of 3."""
  lengths = np.random.default_rng(0).integers(1, 65, size=23)
  examples = [_example(i, n) for i, n in enumerate(lengths)]
  rows = _rows(examples, length=64, window=window, max_segments=max_segments)
  seen = collections.Counter(s for row in rows for s in _segments(row))
  assert seen == collections.Counter(tuple(e['tokens']) for e in examples)
  for row in rows:
    segments = row['segment_ids']
    real = np.sum(segments > 0)
    assert (segments[:real] > 0).all() and not segments[real:].any()  # padding at the end
    assert max_segments is None or segments.max() <= max_segments
    for s in range(1, segments.max() + 1):
      np.testing.assert_array_equal(row['positions'][segments == s],
                                    np.arange(np.sum(segments == s)))
  if max_segments == 1:
    assert len(rows) == 23


def test_rows_are_shuffled_by_seed_and_window():
  """BFD makes a window's rows longest first; they leave in an order drawn
  from (seed, window index), the same for the same seed."""
  examples = [_example(i, 10 + 4 * i) for i in range(32)]  # longer with i
  def first_samples(seed):  # each row's first (its longest) sample
    rows = _rows(examples, length=160, window=16, seed=seed)
    return [row['tokens'][0] // 1000 - 1 for row in rows]
  order = first_samples(0)
  assert order == first_samples(0) and order != first_samples(1)
  assert sorted(order) == sorted(first_samples(1))
  window_0, window_1 = [i for i in order if i < 16], [i for i in order if i >= 16]
  assert order == window_0 + window_1
  assert window_0 != sorted(window_0, reverse=True) and window_1 != sorted(window_1, reverse=True)


@pytest.mark.parametrize('num_threads', [0, 2])
def test_state_restores_exactly_after_every_row(num_threads):
  """The state after k rows (through JSON, as checkpoints store it), set on a
  fresh iterator whose parent has already read ahead, gives the rows an
  uninterrupted iterator gives next."""
  lengths = np.random.default_rng(1).integers(1, 49, size=19)
  examples = [_example(i, n) for i, n in enumerate(lengths)]
  def make():
    parent = grain.MapDataset.source(examples).shuffle(seed=3).repeat(2).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8 if num_threads else 0))
    return iter(packing.BestFitDecreasingPackIterDataset(parent, length=48, window=6, seed=2))
  everything = list(make())
  assert len(everything) >= 2 * 7  # 7 windows (the last of 2 examples), several rows each
  for k in range(len(everything) + 1):
    it = make()
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    fresh = make()
    next(fresh)
    fresh.set_state(state)
    assert fresh.get_state() == state
    rest = list(fresh)
    assert len(rest) == len(everything) - k
    for a, b in zip(rest, everything[k:]):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_a_state_from_another_window_size_is_a_clear_error():
  examples = [_example(i, 10) for i in range(8)]
  def make(window):
    parent = grain.MapDataset.source(examples).to_iter_dataset()
    return iter(packing.BestFitDecreasingPackIterDataset(parent, length=32, window=window))
  it = make(4)
  next(it)
  with pytest.raises(ConfigError, match='not that of a packer of 8-example windows'):
    make(8).set_state(it.get_state())
  with pytest.raises(ConfigError, match='data.pack_window'):  # Grain's first-fit packer's
    make(4).set_state({'parent': it.get_state()['parent'], 'next_row': 1, 'counter': 1})


def test_fills_gsm8k_rows_better_than_grains_first_fit(smollm2):
  """configs/sft.py's rows (256 tokens, truncate_left, 16 samples at most,
  windows of 128) over one epoch of 'gsm8k:sft', both packers on the same examples: real
  tokens over slots. Grain's first-fit has as many bins as a batch of 8 rows,
  as pipeline.build used it."""
  unpacked, _ = pipeline.build('sft', pipeline.resolve_sources('gsm8k:sft'), smollm2,
                               batch_size=1, max_len=256, truncation='truncate_left',
                               packing=False, num_epochs=1)
  examples = []
  for batch in unpacked:
    n = int(batch['segment_ids'][0].sum())
    examples.append({'tokens': batch['tokens'][0, :n], 'loss_mask': batch['loss_mask'][0, :n]})
  real = sum(len(e['tokens']) for e in examples)
  assert len(examples) >= 100
  def source():
    return grain.MapDataset.source(examples).to_iter_dataset()
  first_fit = list(grain.experimental.FirstFitPackIterDataset(
      source(), length_struct={'tokens': 256, 'loss_mask': 256}, num_packing_bins=8,
      shuffle_bins=False, max_sequences_per_bin=16))
  bfd = _rows(examples, length=256, window=128, max_segments=16)
  assert sum(np.sum(r['tokens_segment_ids'] > 0) for r in first_fit) == real
  assert sum(np.sum(r['segment_ids'] > 0) for r in bfd) == real
  first_fit_fill, bfd_fill = real / (256 * len(first_fit)), real / (256 * len(bfd))
  assert bfd_fill > first_fit_fill, (bfd_fill, first_fit_fill)
