"""Padding-free SFT rows (config.data.padding_free): the packer's layout, the
recipe's choice of it, and the loss and gradients they give, equal to those
of the same samples in rows of max_len."""

import dataclasses
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jpost.data import packing, pipeline
from jpost.errors import ConfigError
from jpost.models import cpu_attention, hf, pretrained
from jpost.models.config import ModelConfig
from jpost.tokenizer import Tokenizer
from jpost.trainers import sft
from norms import assert_norm_close

sys.path.insert(0, 'configs')


@pytest.fixture(scope='module')
def smollm2():
  return Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))


def _samples(batch):
  """Each row's samples as (tokens, loss mask) tuples, checking that every
  one is whole: one contiguous run of its segment id, positions 0, 1, ..."""
  found = []
  for tokens, mask, seg, pos in zip(batch['tokens'], batch['loss_mask'], batch['segment_ids'],
                                    batch['positions']):
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert where.size and np.all(np.diff(where) == 1), f'segment {s} is not one run'
      np.testing.assert_array_equal(pos[where], np.arange(where.size))
      found.append((tuple(tokens[where]), tuple(mask[where])))
  return found


def test_a_batch_of_rows_packs_as_fewer_longer_rows(smollm2):
  """One epoch of 'gsm8k:sft' in batches of 8 rows of 256 tokens, and as 2
  rows of 1024 and 1 of 2048: the same slots a batch, every sample whole and
  at most 256 tokens, each once, and fuller rows."""
  build = lambda batch_size=8, **kw: pipeline.build(
      'sft', pipeline.resolve_sources('gsm8k:sft'), smollm2, batch_size=batch_size, max_len=256,
      truncation='truncate_left', num_epochs=1, **kw)
  layouts = {row_len: list(build(row_len=row_len)[0]) for row_len in (None, 1024, 2048)}
  unpacked, _ = build(batch_size=1, packing=False)
  every_sample = [s for batch in unpacked for s in _samples(batch)]
  fill = {}
  for row_len, batches in layouts.items():
    shape = (8, 256) if row_len is None else (2048 // row_len, row_len)
    assert all(b['tokens'].shape == shape for b in batches), row_len
    samples = [s for batch in batches for s in _samples(batch)]
    assert max(len(tokens) for tokens, _ in samples) <= 256
    assert len(set(samples)) == len(samples)  # no sample twice
    assert set(samples) <= set(every_sample)
    fill[row_len] = sum(len(t) for t, _ in samples) / (2048 * len(batches))
  # Measured 0.811 (rows of 256), 0.937 (1024), 0.893 (2048): the epoch is
  # one window of 100 examples, whose last row is part-filled (9 rows of
  # 2048 tokens hold 18.3k, and the ninth is a whole batch).
  assert fill[None] + 0.05 < min(fill[1024], fill[2048]), fill


@pytest.mark.parametrize('row_len, message', [
    (300, 'row_len=300: padding-free rows hold the samples of whole rows'),
    (768, 'must split into rows of 3 x max_len'),
])
def test_a_row_length_that_does_not_split_the_batch_is_an_error(smollm2, row_len, message):
  with pytest.raises(ConfigError, match=message):
    pipeline.build('sft', pipeline.resolve_sources('gsm8k:sft'), smollm2, batch_size=8,
                   max_len=256, row_len=row_len)


def test_a_state_from_rows_of_another_length_is_a_clear_error():
  examples = [{'tokens': np.arange(10, dtype=np.int32) + 100 * i,
               'loss_mask': np.ones(10, np.int32)} for i in range(8)]
  def make(length):
    parent = grain.MapDataset.source(examples).to_iter_dataset()
    return iter(packing.BestFitDecreasingPackIterDataset(parent, length=length, window=4))
  it = make(32)
  next(it)
  with pytest.raises(ConfigError, match='packer of 32-token rows, this one packs 64-token'):
    make(64).set_state(it.get_state())
  make(32).set_state(it.get_state())


def _model_config(**kw):
  return ModelConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_layers=1,
                     num_heads=4, num_kv_heads=2, dtype='bfloat16', **kw)


def _packing(model_config, batch_devices=1, **data):
  import sft as sft_config
  config = sft_config.get_config().unlock()  # batch 4 x 256, padding_free 'auto'
  for key, value in data.items():
    config.data[key] = value
  return sft.packing(config, model_config, batch_devices)


def test_the_recipe_packs_padding_free_where_attention_runs_on_the_cpu_kernel():
  rows = {'row_len': 256, 'max_segments': 16}
  kernel = _model_config(attention='cpu')
  # 'auto': where the kernel runs (it must build here for 'cpu' to be chosen).
  if cpu_attention.available():
    assert _packing(kernel) == {'row_len': 1024, 'max_segments': 64}
    assert _packing(kernel, batch_devices=2) == {'row_len': 512, 'max_segments': 32}
  # Not where attention pays for the whole row, nor in float32, nor for
  # heads the kernel does not take (a head size of 16).
  assert _packing(_model_config(attention='blockwise')) == rows
  assert _packing(dataclasses.replace(kernel, dtype='float32')) == rows
  assert _packing(_model_config(attention='cpu', head_dim=16)) == rows
  # Asked for: on whatever attention, as a command line spells it too.
  blockwise = _model_config(attention='blockwise')
  for on in ('true', 'True'):
    assert _packing(blockwise, padding_free=on) == {'row_len': 1024, 'max_segments': 64}
  assert _packing(kernel, padding_free='false') == rows
  # cuDNN is compiled for attention_max_segments a row, whatever its length.
  cudnn = _model_config(attention='cudnn')
  assert _packing(cudnn, padding_free='true') == {'row_len': 1024, 'max_segments': 16}
  with pytest.raises(ConfigError, match="padding_free='maybe'; use true, false or auto"):
    _packing(kernel, padding_free='maybe')
  with pytest.raises(ConfigError, match='needs config.data.packing=True'):
    _packing(blockwise, padding_free='true', packing=False)
  # Unpacked rows stay unpacked under 'auto'.
  assert _packing(kernel, packing=False) == rows


def _layouts():
  """The same four samples as 2 rows of 64 tokens and as one row of 128."""
  rng = np.random.RandomState(0)
  samples = [{'tokens': rng.randint(0, 500, n), 'loss_mask': (rng.rand(n) < 0.7).astype(np.int32)}
             for n in (30, 20, 40, 10)]
  def layout(rows, length):
    packed = [packing.packed_row([samples[i] for i in members], length) for members in rows]
    return {k: np.stack([row[k] for row in packed]) for k in packed[0]}
  return layout([[0, 1], [2, 3]], 64), layout([[0, 1, 2, 3]], 128)


@pytest.mark.parametrize('normalization', ['token', 'sequence'])
def test_padding_free_rows_give_the_loss_and_gradients_of_rows_of_max_len(tiny_checkpoint,
                                                                          normalization):
  """sft.loss_fn with max_len 64 on both layouts (float32, a head chunk of
  8 positions a row, so that the head runs in pieces either way)."""
  model = hf.load(tiny_checkpoint, logits_chunk=8)
  graphdef, params = nnx.split(model)

  def loss(params, batch):
    normalizer = sft.normalizer_fn(batch, normalization=normalization)
    return sft.loss_fn(nnx.merge(graphdef, params), batch, normalizer,
                       normalization=normalization, max_len=64)

  rows, free = (jax.tree.map(jnp.asarray, b) for b in _layouts())
  (loss_rows, metrics_rows), grads_rows = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, rows)
  (loss_free, metrics_free), grads_free = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, free)
  assert float(metrics_rows['target_tokens']) == float(metrics_free['target_tokens']) > 50
  np.testing.assert_allclose(float(loss_free), float(loss_rows), rtol=1e-5)
  assert_norm_close(jax.tree.leaves(grads_free), jax.tree.leaves(grads_rows), bound=1e-5,
                    what='gradient ')
