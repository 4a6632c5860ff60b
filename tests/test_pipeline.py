"""Grain pipelines: masks per mode, packing, resume, mixtures, bad input, shapes."""

import json

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from jpost import assets, ops
from jpost.data import masking, pipeline
from jpost.data.rows import RowError
from jpost.errors import ConfigError
from jpost.models import pretrained
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder
from jpost.tokenizer import Tokenizer

SYSTEM = {'role': 'system', 'content': 'You are terse.'}
TURNS = [{'role': 'user', 'content': 'What is 2 + 3?'},
         {'role': 'assistant', 'content': '2 + 3 = 5.'},
         {'role': 'user', 'content': 'And times 4?'},
         {'role': 'assistant', 'content': '5 * 4 = 20.\nDone.'}]


@pytest.fixture(scope='module', params=['smollm2', 'qwen3'])
def tokenizer(request):
  if request.param == 'smollm2':
    return Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))
  return Tokenizer.from_dir(assets.fetch('qwen3-tokenizer'))


@pytest.fixture(scope='module')
def smollm2():
  return Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))


def _targets(tokens, mask, tokenizer):
  """Decoded runs of consecutive target tokens."""
  runs, current = [], []
  for t, m in zip(tokens, mask):
    if m:
      current.append(int(t))
    elif current:
      runs.append(tokenizer.decode(current))
      current = []
  if current:
    runs.append(tokenizer.decode(current))
  return runs


@pytest.mark.parametrize('system', [False, True])
@pytest.mark.parametrize('mode, row, expected', [
    ('auto', {'messages': TURNS}, ['2 + 3 = 5.<|im_end|>', '5 * 4 = 20.\nDone.<|im_end|>']),
    ('assistant', {'messages': TURNS}, ['2 + 3 = 5.<|im_end|>', '5 * 4 = 20.\nDone.<|im_end|>']),
    ('last_assistant', {'messages': TURNS}, ['5 * 4 = 20.\nDone.<|im_end|>']),
    ('auto', {'prompt': TURNS[:1], 'completion': TURNS[1:2]}, ['2 + 3 = 5.<|im_end|>']),
    ('completion', {'prompt': TURNS[:3], 'completion': TURNS[3:]}, ['5 * 4 = 20.\nDone.<|im_end|>']),
    ('assistant', {'messages': TURNS[:2]}, ['2 + 3 = 5.<|im_end|>']),
])
def test_mask_modes_target_exactly_assistant_text_and_eot(tokenizer, mode, row, expected, system):
  row = json.loads(json.dumps(row))
  key = 'messages' if 'messages' in row else 'prompt'
  if system:
    row[key] = [SYSTEM] + row[key]
  ds, _ = pipeline.build('sft', [row], tokenizer, batch_size=1, max_len=256,
                         mask_mode=mode, packing=False, num_epochs=1)
  batch = next(iter(ds))
  if tokenizer.token_to_id('<think>') is not None:
    # Qwen3 renders an empty think block before the last assistant turn, after
    # its generation prompt: the model writes it, so it is a target.
    expected = expected[:-1] + ['<think>\n\n</think>\n\n' + expected[-1]]
  assert _targets(batch['tokens'][0], batch['loss_mask'][0], tokenizer) == expected


def test_mask_mode_all_covers_every_real_token(smollm2):
  ds, _ = pipeline.build('sft', [{'messages': TURNS}], smollm2, batch_size=1, max_len=128,
                         mask_mode='all', packing=False, num_epochs=1)
  batch = next(iter(ds))
  np.testing.assert_array_equal(batch['loss_mask'], batch['segment_ids'])


def test_plain_text_prompt_completion_ends_with_eos(smollm2):
  ds, _ = pipeline.build('sft', [{'prompt': 'Q: 2+2?\nA:', 'completion': ' 4'}], smollm2,
                         batch_size=1, max_len=32, packing=False, num_epochs=1)
  batch = next(iter(ds))
  assert _targets(batch['tokens'][0], batch['loss_mask'][0], smollm2) == [' 4<|im_end|>']


def _sft_rows(n, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for i in range(n):
    a, b = rng.randint(1, 100, 2)
    out.append({'prompt': [{'role': 'user', 'content': f'Row {i}: what is {a} + {b}?'}],
                'completion': [{'role': 'assistant', 'content': f'{a} + {b} = {a + b}.' * (1 + i % 3)}]})
  return out


def test_packed_loss_equals_unpacked_loss(smollm2):
  cfg = ModelConfig(vocab_size=smollm2.vocab_size, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2)
  model = Decoder(cfg, rngs=nnx.Rngs(0))

  @nnx.jit
  def per_token_loss(model, batch):
    logits = model(batch['tokens'], batch['positions'], batch['segment_ids'])
    targets, weights = ops.next_token_targets(batch['tokens'], batch['loss_mask'], batch['segment_ids'])
    return -ops.token_logprobs(logits, targets) * weights, weights

  rows_ = _sft_rows(12)
  packed, _ = pipeline.build('sft', rows_, smollm2, batch_size=2, max_len=128, num_epochs=1, seed=3)
  padded, _ = pipeline.build('sft', rows_, smollm2, batch_size=1, max_len=128, num_epochs=1,
                             packing=False, seed=3)
  # Per-sample loss sums keyed by the sample's tokens, from both layouts.
  def sample_losses(batches):
    out = {}
    for batch in batches:
      loss, weights = jax.device_get(per_token_loss(model, batch))
      for row in range(batch['tokens'].shape[0]):
        seg = batch['segment_ids'][row]
        for s in set(seg.tolist()) - {0}:
          idx = np.nonzero(seg == s)[0]
          key = tuple(batch['tokens'][row, idx])
          out[key] = (loss[row, idx[:-1]].sum(), weights[row, idx[:-1]].sum())
    return out
  packed_batches = list(packed)
  assert max(len(set(b['segment_ids'][0].tolist()) - {0}) for b in packed_batches) >= 2
  # Positions restart at 0 in every packed sample (RoPE sees only relative
  # positions, so the losses below could not tell).
  for batch in packed_batches:
    for seg, pos in zip(batch['segment_ids'], batch['positions']):
      for s in set(seg.tolist()) - {0}:
        np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
  a, b = sample_losses(packed_batches), sample_losses(padded)
  assert a.keys() == b.keys() and len(a) == 12
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_packed_rows_hold_at_most_max_segments(smollm2):
  """The packer closes a row at `max_segments` samples (what attention='cudnn'
  is compiled for) and loses none of them."""
  def segments(max_segments):
    ds, _ = pipeline.build('sft', _sft_rows(12), smollm2, batch_size=1, max_len=512,
                           num_epochs=1, seed=3, max_segments=max_segments)
    return [len(set(b['segment_ids'][0].tolist()) - {0}) for b in ds]
  free, capped = segments(None), segments(2)
  assert max(free) > 2 and max(capped) == 2
  assert sum(free) == sum(capped) == 12


def test_pack_window_is_passed_to_the_packer_and_checked(smollm2):
  def segments(pack_window):
    ds, _ = pipeline.build('sft', _sft_rows(12), smollm2, batch_size=1, max_len=512,
                           num_epochs=1, seed=3, pack_window=pack_window)
    return [len(set(b['segment_ids'][0].tolist()) - {0}) for b in ds]
  assert segments(1) == [1] * 12 and max(segments(12)) > 1
  for bad in (0, -2, 2.5):
    with pytest.raises(ConfigError, match=rf'pack_window={bad}: .* 1 or more'):
      segments(bad)


def test_no_attention_across_segments():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2)
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  tokens = np.arange(1, 13)[None] % 64
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]])
  segments = np.array([[1] * 5 + [2] * 4 + [3] * 3])
  base = np.asarray(model(tokens, positions, segments))
  changed = tokens.copy()
  changed[0, :5] = 40  # rewrite segment 1 only
  after = np.asarray(model(changed, positions, segments))
  np.testing.assert_array_equal(base[0, 5:], after[0, 5:])
  assert not np.allclose(base[0, :5], after[0, :5])


def _batches(it, n):
  return [jax.tree.map(np.copy, next(it)) for _ in range(n)]


@pytest.mark.parametrize('packing, num_threads', [(True, 0), (False, 0), (True, 2)])
@pytest.mark.parametrize('resume_after', [2, 6])  # 6 batches = one epoch of 12 rows unpacked
def test_iterator_state_restores_exactly(smollm2, packing, num_threads, resume_after):
  """With prefetch threads, the fresh iterator has started them (and read
  ahead) before its state is set."""
  def make():
    return pipeline.build('sft', _sft_rows(12), smollm2, batch_size=2, max_len=96,
                          packing=packing, seed=5, num_epochs=3, num_threads=num_threads)[0]
  it = iter(make())
  _batches(it, resume_after)
  state = it.get_state()
  expected = _batches(it, 5)
  fresh = iter(make())
  if num_threads:
    next(fresh)  # the threads run and prefetch rows the restored state must discard
  fresh.set_state(state)
  for a, b in zip(expected, _batches(fresh, 5)):
    chex.assert_trees_all_equal(a, b)


def test_epochs_reshuffle_and_same_seed_same_order(smollm2):
  def order(seed):
    ds, _ = pipeline.build('sft', _sft_rows(8), smollm2, batch_size=1, max_len=96,
                           packing=False, seed=seed, num_epochs=2)
    texts = [smollm2.decode(b['tokens'][0][b['segment_ids'][0] == 1]) for b in ds]
    return [t[t.index('Row '):t.index(':', t.index('Row '))] for t in texts]
  first = order(0)
  assert first == order(0) and first != order(1)
  assert sorted(first[:8]) == sorted(first[8:]) and first[:8] != first[8:]


def test_mixture_weights_are_honoured(smollm2):
  a = [{'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'A'}]}] * 5
  b = [{'messages': [{'role': 'user', 'content': 'b'}, {'role': 'assistant', 'content': 'B'}]}] * 7
  def draw(seed):
    ds, _ = pipeline.build('sft', [a, b], smollm2, batch_size=4, max_len=64, packing=False,
                           weights=[0.75, 0.25], seed=seed)
    it = iter(ds)
    return [smollm2.decode(t[s == 1]).count('<|im_start|>user\na') for batch in _batches(it, 100)
            for t, s in zip(batch['tokens'], batch['segment_ids'])]
  picks = draw(0)
  assert abs(np.mean(picks) - 0.75) < 0.05
  assert picks == draw(0)


def test_preference_batches(smollm2):
  row = {'prompt': [{'role': 'user', 'content': 'Pick a number.'}],
         'chosen': [{'role': 'assistant', 'content': 'Seven.'}],
         'rejected': [{'role': 'assistant', 'content': 'No.'}]}
  rows_ = [row, row | {'margin': 1.5}, row]
  ds, _ = pipeline.build('preference', rows_, smollm2, batch_size=3, max_len=48, seed=0)
  batch = next(iter(ds))
  for side in ('chosen', 'rejected'):
    for field in ('tokens', 'positions', 'segment_ids', 'loss_mask'):
      chex.assert_shape(batch[f'{side}_{field}'], (3, 48))
  # Each pair's margin (0 where the row has none), for the reward model's loss.
  assert batch['margin'].dtype == np.float32 and sorted(batch['margin']) == [0.0, 0.0, 1.5]
  assert _targets(batch['chosen_tokens'][0], batch['chosen_loss_mask'][0], smollm2) == ['Seven.<|im_end|>']
  assert _targets(batch['rejected_tokens'][0], batch['rejected_loss_mask'][0], smollm2) == ['No.<|im_end|>']


def test_prompt_batches_left_padded_with_extras(smollm2):
  rows_ = [{'prompt': [{'role': 'user', 'content': 'Hi' * (i + 1)}], 'answer': str(i), 'meta': {'k': i}}
           for i in range(4)]
  ds, _ = pipeline.build('prompt', rows_, smollm2, batch_size=4, max_len=40, num_epochs=1)
  batch = next(iter(ds))
  for field in ('tokens', 'positions', 'segment_ids'):
    chex.assert_shape(batch[field], (4, 40))
  assert sorted(e['answer'] for e in batch['extra']) == ['0', '1', '2', '3']
  for row in range(4):
    seg, pos = batch['segment_ids'][row], batch['positions'][row]
    n = seg.sum()
    assert seg[-n:].all() and not seg[:-n].any()  # right-aligned
    np.testing.assert_array_equal(pos[-n:], np.arange(n))
    text = smollm2.decode(batch['tokens'][row][-n:])
    assert text.endswith('<|im_start|>assistant\n')


def test_sft_batch_shapes(smollm2):
  ds, _ = pipeline.build('sft', _sft_rows(10), smollm2, batch_size=3, max_len=64)
  batch = next(iter(ds))
  for field in ('tokens', 'positions', 'segment_ids', 'loss_mask'):
    chex.assert_shape(batch[field], (3, 64))
    assert batch[field].dtype == np.int32
  assert (batch['loss_mask'] <= (batch['segment_ids'] > 0)).all()  # padding is never a target
  assert (batch['segment_ids'].max(axis=1) > 0).all()  # no padding-only rows


# --- bad input, truncation --------------------------------------------------

def test_too_long_rows_dropped_and_counted(smollm2):
  rows_ = _sft_rows(6) + [{'messages': [{'role': 'user', 'content': 'x ' * 300},
                                        {'role': 'assistant', 'content': 'ok'}]}]
  ds, stats = pipeline.build('sft', rows_, smollm2, batch_size=1, max_len=128, packing=False,
                             num_epochs=1)
  assert len(list(ds)) == 6
  report = stats.as_dict()
  assert report['rows']['skipped_by_reason'] == {'too_long': 1}
  assert 'rows[6]' in report['rows']['examples'][0]['message']


def test_an_endless_stream_of_only_dropped_rows_is_an_error_not_a_hang(smollm2):
  too_long = [{'messages': [{'role': 'user', 'content': 'x ' * 300},
                            {'role': 'assistant', 'content': 'ok'}]}] * 3
  ds, _ = pipeline.build('sft', too_long, smollm2, batch_size=1, max_len=64, packing=False,
                         num_epochs=None)  # repeats forever: every row dropped, every pass
  with pytest.raises(ValueError, match='every one of 3 rows was dropped'):
    next(iter(ds))


def test_truncate_left_cuts_the_prompt_not_the_answer(smollm2):
  long = {'prompt': [{'role': 'user', 'content': 'word ' * 100}],
          'completion': [{'role': 'assistant', 'content': 'The answer is 42.'}]}
  ds, stats = pipeline.build('sft', [long], smollm2, batch_size=1, max_len=48, packing=False,
                             truncation='truncate_left', num_epochs=1)
  batch = next(iter(ds))
  assert stats.as_dict()['encoded'] == {'truncated': 1}
  assert batch['segment_ids'][0].all()
  assert _targets(batch['tokens'][0], batch['loss_mask'][0], smollm2) == ['The answer is 42.<|im_end|>']


def test_truncate_right_cuts_the_completion_and_drops_rows_without_targets(smollm2):
  long_answer = {'prompt': [{'role': 'user', 'content': 'Count.'}],
                 'completion': [{'role': 'assistant', 'content': ' '.join(map(str, range(100)))}]}
  long_prompt = {'prompt': [{'role': 'user', 'content': 'word ' * 100}],
                 'completion': [{'role': 'assistant', 'content': 'ok'}]}
  ds, stats = pipeline.build('sft', [long_answer, long_prompt], smollm2, batch_size=1, max_len=48,
                             packing=False, truncation='truncate_right', num_epochs=1)
  batches = list(ds)
  assert len(batches) == 1
  report = stats.as_dict()
  assert report['encoded'] == {'truncated': 1, 'dropped_too_long': 1}
  targets = _targets(batches[0]['tokens'][0], batches[0]['loss_mask'][0], smollm2)
  assert targets[0].startswith('0 1 2 3') and '<|im_end|>' not in targets[0]


def test_no_assistant_turn_error_and_skip(smollm2):
  bad = {'messages': [{'role': 'user', 'content': 'hello?'}]}
  ds, _ = pipeline.build('sft', [bad] + _sft_rows(2), smollm2, batch_size=1, max_len=128,
                         packing=False, num_epochs=1, seed=0)
  with pytest.raises(RowError, match=r'rows\[0\].*no target message'):
    list(ds)
  ds, stats = pipeline.build('sft', [bad] + _sft_rows(2), smollm2, batch_size=1, max_len=128,
                             packing=False, num_epochs=1, policy='skip')
  assert len(list(ds)) == 2
  assert stats.as_dict()['rows']['skipped_by_reason'] == {'no_assistant_turn': 1}


PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize('policy', ['error', 'skip'])
def test_a_template_that_ends_turns_in_plain_text_is_an_error(smollm2, policy):
  """With no special token after an assistant turn, its content alone would be
  the targets (ending in '\\n'), and eos never one: the model would not learn to
  stop. That is the template's doing, not a row's, so no policy skips it."""
  plain = smollm2.with_chat_template(PLAIN_TEMPLATE)
  for recipe, rows in (('sft', _sft_rows(2)),
                       ('preference', [{'prompt': [{'role': 'user', 'content': '2 + 3?'}],
                                        'chosen': [{'role': 'assistant', 'content': '5.'}],
                                        'rejected': [{'role': 'assistant', 'content': '6.'}]}])):
    ds, _ = pipeline.build(recipe, rows, plain, batch_size=1, max_len=128, packing=False,
                           num_epochs=1, policy=policy)
    with pytest.raises(ConfigError, match=r'rows\[0\]: the chat template ends message 1 '
                                          r'\(assistant\) with no special token'):
      list(ds)


def test_bad_rows_reported_with_location(tmp_path, smollm2):
  path = tmp_path / 'train.jsonl'
  good = json.dumps(_sft_rows(1)[0])
  path.write_text('\n'.join([good, '{"messages": [', good,
                             json.dumps({'prompt': 'q', 'chosen': 'a', 'rejected': 'a'}),
                             json.dumps({'prompt': 'q', 'chosen': 'a', 'rejected': 'b'})]) + '\n')
  with pytest.raises(RowError, match=r'train\.jsonl:2: line is not valid JSON'):
    pipeline.build('sft', str(path), smollm2, batch_size=1, max_len=64)
  _, stats = pipeline.build('sft', str(path), smollm2, batch_size=1, max_len=64, policy='skip')
  skipped = stats.as_dict()['rows']['skipped_by_reason']
  assert skipped == {'malformed_json': 1, 'missing_key': 2}  # the two preference rows
  _, stats = pipeline.build('preference', str(path), smollm2, batch_size=1, max_len=64,
                            policy='skip')
  report = stats.as_dict()['rows']
  assert report['skipped_by_reason'] == {'chosen_equals_rejected': 1, 'malformed_json': 1,
                                         'missing_key': 2}
  assert report['seen'] == 5 and report['kept'] == 1


def test_mask_config_validation():
  with pytest.raises(ValueError, match="mask_mode 'assistants' unknown"):
    masking.MaskConfig(max_len=8, mask_mode='assistants')
  with pytest.raises(ValueError, match="truncation 'cut' unknown"):
    masking.MaskConfig(max_len=8, truncation='cut')


def test_process_shards_split_every_global_batch(smollm2):
  """batch_size is the global batch: process k reads rows k*B/n .. of each
  batch one process would read, so the processes' batches side by side are
  the one-process batches."""
  def batches(shard_index, shard_count, num_threads=0):
    ds, _ = pipeline.build('sft', _sft_rows(12), smollm2, batch_size=4, max_len=128,
                           packing=False, num_epochs=1, shard_index=shard_index,
                           shard_count=shard_count, num_threads=num_threads)
    texts = [[smollm2.decode(b['tokens'][r][b['segment_ids'][r] == 1])
              for r in range(len(b['tokens']))] for b in ds]
    return [[t[t.index('Row '):t.index(':', t.index('Row '))] for t in rows] for rows in texts]
  whole, a, b = batches(0, 1), batches(0, 2), batches(1, 2)
  assert len(whole) == len(a) == len(b) == 3 and all(len(rows) == 2 for rows in a + b)
  assert [x + y for x, y in zip(a, b)] == whole
  assert sorted(sum(whole, [])) == sorted(f'Row {i}' for i in range(12))
  assert batches(0, 2, num_threads=2) == a  # prefetch threads keep the order
  with pytest.raises(ValueError, match='divide over 3 processes'):
    batches(0, 3)


@pytest.mark.parametrize('pairs', [7, 6, 3, 9])
def test_evaluation_shards_read_every_pair_once(smollm2, pairs):
  """With pad_last (held-out passes) the processes read the pairs past the
  last whole global batch too, dealt out one to each in turn: every pair
  once over the shards, as many batches in each (but where a shard's last
  block is empty), every batch filled up to its shard's rows. Without it
  they stop at the last whole global batch."""
  rows = [{'prompt': f'Question {i}?', 'chosen': f'Answer {i}.', 'rejected': 'No.'}
          for i in range(pairs)]

  def answers(shard_index, pad_last=True):
    ds, _ = pipeline.build('preference', rows, smollm2, batch_size=4, max_len=48,
                           num_epochs=1, shard_index=shard_index, shard_count=2,
                           drop_remainder=False, pad_last=pad_last)
    out = []
    for batch in ds:
      assert batch['chosen_tokens'].shape[0] == 2  # this shard's share of the batch of 4
      real = batch['chosen_loss_mask'].sum(axis=1) > 0
      out.append([smollm2.decode(t[m == 1]) for t, m, r in zip(
          batch['chosen_tokens'], batch['chosen_loss_mask'], real) if r])
    return out
  shards = answers(0), answers(1)
  read = sorted(a for shard in shards for batch in shard for a in batch)
  assert read == sorted(f'Answer {i}.<|im_end|>' for i in range(pairs))
  assert len(shards[0]) == -(-pairs // 4)  # 7: [0, 1], [4, 6]; 6: [0, 1], [4]; 9: .., [8]
  assert len(shards[1]) == len(shards[0]) - (pairs % 4 == 1)  # 9: shard 1's last block is empty
  whole = sum(len(batch) for shard in (answers(0, False), answers(1, False)) for batch in shard)
  assert whole == pairs // 4 * 4


def test_several_sources_for_one_epoch_are_read_once_each(smollm2):
  a, b = _sft_rows(3), _sft_rows(5, seed=1)
  ds, _ = pipeline.build('sft', [a, b], smollm2, batch_size=1, max_len=128, packing=False,
                         num_epochs=1)
  assert len(list(ds)) == 8  # finite: an eval set of two files ends
  with pytest.raises(ValueError, match='weighted mixture of 2 sources is an endless stream'):
    pipeline.build('sft', [a, b], smollm2, batch_size=1, max_len=128, weights=[0.5, 0.5],
                   num_epochs=1)
  for weights in ([0.0, 1.0], [-1.0, 2.0], [float('inf'), 1.0]):  # grain: an error, a /0
    with pytest.raises(ConfigError, match=r'mixture weights .*: each must be a positive finite'):
      pipeline.build('sft', [a, b], smollm2, batch_size=1, max_len=128, weights=weights)


@pytest.mark.parametrize('num_threads', [0, 2])
def test_num_threads_is_the_number_of_prefetch_threads(smollm2, num_threads):
  """0 reads in the caller's thread (Grain's defaults would start 16)."""
  import threading
  before = set(threading.enumerate())  # other tests' threads may still be ending
  ds, _ = pipeline.build('sft', _sft_rows(12), smollm2, batch_size=1, max_len=128, packing=False,
                         num_epochs=1, num_threads=num_threads)
  it = iter(ds)
  next(it)
  started = set(threading.enumerate()) - before
  assert sum(t.name.startswith('grain-prefetch') for t in started) == num_threads


QWEN_REASONING = [{'role': 'user', 'content': 'What is 2 + 3?'},
                  {'role': 'assistant', 'content': '5.', 'reasoning_content': 'Two plus three.'}]


def test_reasoning_rendered_before_the_answer_is_trained():
  """Qwen3 renders reasoning_content as a <think> block between the generation
  prompt and the content: the model writes it, so reasoning SFT must train it
  (masking only the content trained answers without their reasoning)."""
  qwen = Tokenizer.from_dir(assets.fetch('qwen3-tokenizer'))
  ds, _ = pipeline.build('sft', [{'messages': QWEN_REASONING}], qwen, batch_size=1,
                         max_len=128, packing=False, num_epochs=1)
  batch = next(iter(ds))
  assert _targets(batch['tokens'][0], batch['loss_mask'][0], qwen) == [
      '<think>\nTwo plus three.\n</think>\n\n5.<|im_end|>']
  # The prompt the model is sampled from ends where the targets start.
  prompt = qwen.encode_chat(QWEN_REASONING[:1], add_generation_prompt=True).ids
  first = int(np.argmax(batch['loss_mask'][0]))
  assert list(batch['tokens'][0][:first]) == prompt


def test_reasoning_inside_the_content_qwen3_moves_is_a_counted_bad_row():
  """Qwen3's template moves <think> text out of the last turn's content, so
  the content's span cannot be found: a RowError ('skip' counts it), not a
  traceback."""
  qwen = Tokenizer.from_dir(assets.fetch('qwen3-tokenizer'))
  inline = {'messages': [QWEN_REASONING[0], {'role': 'assistant',
                                             'content': '<think>\nTwo plus three.\n</think>\n\n5.'}]}
  good = {'messages': QWEN_REASONING}
  ds, _ = pipeline.build('sft', [inline, good], qwen, batch_size=1, max_len=128,
                         packing=False, num_epochs=1, seed=0)
  with pytest.raises(RowError, match=r'rows\[0\].*cannot locate the message contents.*'
                                     r'reasoning_content'):
    list(ds)
  ds, stats = pipeline.build('sft', [inline, good], qwen, batch_size=1, max_len=128,
                             packing=False, num_epochs=1, policy='skip')
  assert len(list(ds)) == 1
  assert stats.as_dict()['rows']['skipped_by_reason'] == {'unlocatable_content': 1}
