"""Process reward models: step rows, step-end targets, the loss, the metrics,
the recipe end to end and the scorer of its export."""

import json
import math
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CHAR_TEMPLATE
from jpost import assets, trainers
from jpost.data import pipeline, steps
from jpost.data.rows import RowError, RowFilter, normalize_steps
from jpost.losses.prm import step_bce_loss
from jpost.models import pretrained
from jpost.models import reward as reward_model
from jpost.tokenizer import Tokenizer
from jpost.trainers import prm
from overrides import apply

sys.path.insert(0, 'configs')
import prm as prm_config  # noqa: E402  (configs/prm.py)

QUESTION = 'What is (2 + 3) * 2?'
SOLUTION = ['2 + 3 = 5.', 'Then 5 * 2 = 10.', 'The answer is 10.']


@pytest.fixture(scope='module')
def smollm2():
  return Tokenizer.from_dir(pretrained.resolve('smollm2-135m-instruct'))


@pytest.fixture(scope='module')
def qwen3():
  return Tokenizer.from_dir(assets.fetch('qwen3-tokenizer'))


@pytest.fixture(scope='module')
def chars(char_checkpoint):
  return Tokenizer.from_dir(char_checkpoint)


def _tokens(tokenizer, ids):
  return [tokenizer.id_to_token(int(i)) for i in ids]


# --- rows -------------------------------------------------------------------------------


def test_normalize_steps_canonical_row():
  row = {'prompt': 'Q?', 'steps': ['a', 'b', 'c'], 'labels': [1, 0.25, False], 'id': 3,
         '_where': 'x.jsonl:1'}
  assert normalize_steps(row, where='x.jsonl:1') == {
      'prompt': [{'role': 'user', 'content': 'Q?'}], 'steps': ['a', 'b', 'c'],
      'labels': [1.0, 0.25, 0.0]}
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Q?'}]
  assert normalize_steps({'prompt': messages, 'steps': ['a'], 'labels': [True]},
                         where='r')['prompt'] == messages


BAD_ROWS = [
    ({'prompt': 'Q', 'steps': ['a', 'b'], 'labels': [1]}, 'steps_labels_mismatch',
     '2 steps but 1 labels'),
    ({'prompt': 'Q', 'steps': ['a', 'b'], 'labels': [1, 1.5]}, 'bad_label',
     'labels[1] is 1.5, outside [0, 1]'),
    ({'prompt': 'Q', 'steps': ['a'], 'labels': [-1]}, 'bad_label', 'outside [0, 1]'),
    ({'prompt': 'Q', 'steps': ['a'], 'labels': ['+']}, 'bad_label',
     "labels[0] is a str ('+'), not a number"),
    ({'prompt': 'Q', 'steps': ['a', ' \n'], 'labels': [1, 0]}, 'empty_step',
     'steps[1] is empty or whitespace'),
    ({'prompt': 'Q', 'steps': [], 'labels': []}, 'no_steps', "'steps' is an empty list"),
    ({'prompt': 'Q', 'steps': 'a\nb', 'labels': [1, 1]}, 'bad_type', "'steps' is a str"),
    ({'prompt': ' ', 'steps': ['a'], 'labels': [1]}, 'empty_prompt', "'prompt' is empty"),
    ({'steps': ['a'], 'labels': [1]}, 'missing_key', "row has no 'prompt'"),
]


@pytest.mark.parametrize('row, reason, fragment', BAD_ROWS)
def test_bad_step_rows_name_file_and_line(row, reason, fragment, tmp_path):
  good = {'prompt': 'Q', 'steps': ['a'], 'labels': [1]}
  path = tmp_path / 'steps.jsonl'
  path.write_text(json.dumps(good) + '\n\n' + json.dumps(row) + '\n')  # the bad row: line 3
  with pytest.raises(RowError) as error:
    pipeline.load_examples(path, 'steps', RowFilter(policy='error'))
  assert error.value.reason == reason
  assert str(error.value).startswith(f'{path}:3: ') and fragment in str(error.value)
  row_filter = RowFilter(policy='skip')
  kept = pipeline.load_examples(path, 'steps', row_filter)
  assert [e['_where'] for e in kept] == [f'{path}:1']
  stats = row_filter.stats()
  assert (stats['seen'], stats['skipped'], stats['skipped_by_reason']) == (2, 1, {reason: 1})


# --- step ends --------------------------------------------------------------------------


def test_step_ends_smollm2_space_separator_merges_into_the_next_word(smollm2):
  # ' ' never stands alone here: it is the start of ' Then' and ' The', while
  # the lone 'Ġ' tokens sit before every digit. Searching for it finds nothing
  # useful; offsets put each end on the step's '.'.
  encoding = steps.encode_steps(QUESTION, SOLUTION, smollm2, separator=' ')
  prompt = smollm2.encode_chat([{'role': 'user', 'content': QUESTION}],
                               add_generation_prompt=True).ids
  start = len(prompt)  # 42: the default system prompt, the question, the header
  assert encoding.tokens[:start].tolist() == prompt
  assert _tokens(smollm2, encoding.tokens[start:]) == [
      '2', 'Ġ+', 'Ġ', '3', 'Ġ=', 'Ġ', '5', '.',                          # 0-7
      'ĠThen', 'Ġ', '5', 'Ġ*', 'Ġ', '2', 'Ġ=', 'Ġ', '1', '0', '.',       # 8-18
      'ĠThe', 'Ġanswer', 'Ġis', 'Ġ', '1', '0', '.', '<|im_end|>', 'Ċ']   # 19-27
  np.testing.assert_array_equal(encoding.step_ends, start + np.array([7, 18, 25]))
  assert encoding.num_steps == 3 and encoding.steps_cut == 0


def test_step_ends_qwen3_newline_separator_merges_with_the_full_stop(qwen3):
  # Qwen3 encodes '.\n' as one token, so no '\n' token is left between the
  # steps; the step's last token is '.\n'. Its template also puts an empty
  # think block before the answer, which the located content skips.
  encoding = steps.encode_steps(QUESTION, SOLUTION, qwen3, separator='\n')
  text = qwen3.apply_chat_template([{'role': 'user', 'content': QUESTION},
                                    {'role': 'assistant', 'content': '\n'.join(SOLUTION)}])
  assert qwen3.decode(encoding.tokens) == text
  start = 24  # <|im_start|>user\n Q <|im_end|>\n <|im_start|>assistant\n <think>\n\n</think>\n\n
  assert _tokens(qwen3, encoding.tokens[start - 4:start]) == ['<think>', 'ĊĊ', '</think>', 'ĊĊ']
  assert _tokens(qwen3, encoding.tokens[start:]) == [
      '2', 'Ġ+', 'Ġ', '3', 'Ġ=', 'Ġ', '5', '.Ċ',                           # 0-7
      'Then', 'Ġ', '5', 'Ġ*', 'Ġ', '2', 'Ġ=', 'Ġ', '1', '0', '.Ċ',         # 8-18
      'The', 'Ġanswer', 'Ġis', 'Ġ', '1', '0', '.', '<|im_end|>', 'Ċ']      # 19-27
  assert qwen3.encode('\n')[0] not in encoding.tokens[start:start + 26]
  np.testing.assert_array_equal(encoding.step_ends, start + np.array([7, 18, 25]))


@pytest.mark.parametrize('template, solution, separator, ends', [
    # <|im_start|> user \n 2+3? <|im_end|> \n <|im_start|> assistant \n = 23
    # tokens, then one per character: '2+3=5' ends at 23 + 4, 'ok' at 23 + 7.
    (CHAR_TEMPLATE, ['2+3=5', 'ok'], '\n', [27, 30]),
    # A multi-character separator, and trailing spaces that are not the end.
    (CHAR_TEMPLATE, ['2+3=5  ', 'ok'], ' ; ', [27, 34]),
    # A template that trims the content: the leading space is not printed.
    (CHAR_TEMPLATE.replace("m['content']", "m['content'] | trim"), [' 2+3=5', 'ok '], '\n',
     [27, 30]),
])
def test_step_ends_char_tokenizer(chars, template, solution, separator, ends):
  tokenizer = chars.with_chat_template(template)
  encoding = steps.encode_steps('2+3?', solution, tokenizer, separator=separator)
  np.testing.assert_array_equal(encoding.step_ends, ends)
  assert [tokenizer.id_to_token(int(encoding.tokens[i])) for i in ends] == ['5', 'k']


def test_two_steps_ending_in_one_token_is_an_error(qwen3):
  with pytest.raises(RowError, match=r"rows\[4\]: steps\[0\] and steps\[1\] end in the same "
                                     r"token \('abcd'\)") as error:
    steps.encode_steps('hi', ['ab', 'cd'], qwen3, separator='', where='rows[4]')
  assert error.value.reason == 'merged_step_ends'


def test_max_len_keeps_the_steps_that_end_inside(chars):
  full = steps.encode_steps('2+3?', ['2+3=5', 'ok', 'done'], chars)  # ends 27, 30, 35
  np.testing.assert_array_equal(full.step_ends, [27, 30, 35])
  cut = steps.encode_steps('2+3?', ['2+3=5', 'ok', 'done'], chars, max_len=31)
  np.testing.assert_array_equal(cut.step_ends, [27, 30])
  assert len(cut.tokens) == 31 and cut.steps_cut == 1
  fields = steps.training_fields(cut, [1.0, 0.0, 1.0], length=31)
  assert np.flatnonzero(fields['step_mask']).tolist() == [27, 30]
  with pytest.raises(RowError, match=r'x:7: no step ends within max_len=27') as error:
    steps.training_fields(steps.encode_steps('2+3?', ['2+3=5'], chars, max_len=27), [1.0],
                          length=27, where='x:7')
  assert error.value.reason == 'too_long'


def test_pipeline_batches_and_counts_cut_rows(chars):
  rows = [{'prompt': '2+3?', 'steps': ['2+3=5', 'ok', 'done'], 'labels': [1, 0.25, 0]},
          {'prompt': [{'role': 'user', 'content': '1+1?'}], 'steps': ['2'], 'labels': [1]},
          {'prompt': 'a very long question that leaves no room', 'steps': ['x'], 'labels': [1]}]
  ds, stats = pipeline.build('steps', rows, chars, batch_size=2, max_len=32, num_epochs=1,
                             policy='skip')
  (batch,) = list(ds)
  chex.assert_shape([batch[k] for k in ('tokens', 'positions', 'segment_ids', 'step_targets',
                                        'step_mask')], (2, 32))
  assert batch['step_targets'].dtype == np.float32 and batch['step_mask'].dtype == np.int32
  by_prompt = {int(batch['tokens'][r, 6]): r for r in range(2)}  # '2' or '1' after 'user\n'
  first, second = by_prompt[chars.token_to_id('2')], by_prompt[chars.token_to_id('1')]
  assert np.flatnonzero(batch['step_mask'][first]).tolist() == [27, 30]  # 'done' is cut
  np.testing.assert_array_equal(batch['step_targets'][first, [27, 30]], [1.0, 0.25])
  assert batch['step_targets'][first].sum() == 1.25
  assert np.flatnonzero(batch['step_mask'][second]).tolist() == [23]
  assert batch['segment_ids'][second].sum() == 26  # 23 + '2' + <|im_end|> + '\n'
  np.testing.assert_array_equal(batch['positions'][second, :26], np.arange(26))
  report = stats.as_dict()
  assert report['encoded'] == {'truncated': 1, 'steps_cut': 1, 'encoded': 1,
                               'dropped_too_long': 1}
  assert report['rows']['skipped_by_reason'] == {'too_long': 1}


# --- loss -------------------------------------------------------------------------------


def test_step_bce_loss_hand_computed():
  logits = jnp.array([[2.0, 9.0, -1.0, 0.0], [0.5, 3.0, -7.0, 4.0]])
  targets = jnp.array([[1.0, 0.0, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0]])
  mask = jnp.array([[1, 0, 1, 0], [1, 0, 0, 0]])
  # softplus(x) - x y per step end:
  #   x=2,  y=1:    log(1 + e^-2)          = 0.126928
  #   x=-1, y=0.25: log(1 + e^-1) + 0.25   = 0.563262
  #   x=0.5, y=0:   log(1 + e^0.5)         = 0.974077
  per_step = [0.126928, 0.563262, 0.974077]
  loss, metrics = jax.jit(step_bce_loss)(logits, targets, mask)
  np.testing.assert_allclose(loss, sum(per_step) / 3, rtol=1e-5)
  # Agreement: 2 >= 0 with y=1 yes; -1 < 0 with y=0.25 yes; 0.5 >= 0 with y=0 no.
  np.testing.assert_allclose(metrics['step_accuracy'], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics['step_label'], 1.25 / 3, rtol=1e-6)
  sigmoid = lambda x: 1 / (1 + math.exp(-x))
  np.testing.assert_allclose(metrics['step_prob'], (sigmoid(2) + sigmoid(-1) + sigmoid(0.5)) / 3,
                             rtol=1e-6)
  # A whole-batch normaliser divides the same sum.
  loss4, _ = step_bce_loss(logits, targets, mask, normalizer=4.0)
  np.testing.assert_allclose(loss4, sum(per_step) / 4, rtol=1e-5)
  # Gradient: (sigmoid(x) - y) / n at step ends, 0 elsewhere.
  grad = jax.grad(lambda x: step_bce_loss(x, targets, mask)[0])(logits)
  want = np.zeros((2, 4))
  want[0, 0], want[0, 2], want[1, 0] = sigmoid(2) - 1, sigmoid(-1) - 0.25, sigmoid(0.5)
  np.testing.assert_allclose(grad, want / 3, rtol=1e-5, atol=1e-7)
  # No step ends (an all-padding batch): 0, not NaN.
  empty, _ = step_bce_loss(logits, targets, jnp.zeros_like(mask))
  assert float(empty) == 0.0


def test_prm_loss_on_a_tiny_model(char_checkpoint, chars):
  rows = [{'prompt': '2+3?', 'steps': ['2+3=5', 'ok'], 'labels': [1, 0]},
          {'prompt': '1+1?', 'steps': ['1+1=3', 'no', 'so 3'], 'labels': [0, 0.5, 0]}]
  ds, _ = pipeline.build('steps', rows, chars, batch_size=2, max_len=40, num_epochs=1)
  batch = next(iter(ds))
  model = reward_model.load(char_checkpoint, seed=0, init_std=0.5)
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss_and_grad(state, batch):
    def loss(state):
      m = nnx.merge(graphdef, state)
      return prm.loss_fn(m, batch, prm.normalizer_fn(batch))
    return jax.value_and_grad(loss, has_aux=True)(state)

  device_batch = jax.device_put(batch)
  with jax.transfer_guard('disallow'):
    (loss, metrics), grads = loss_and_grad(state, device_batch)
  values = np.asarray(model(batch['tokens'], batch['positions'], batch['segment_ids']))
  chex.assert_shape(values, (2, 40))
  at = batch['step_mask'] == 1
  x, y = values[at].astype(np.float64), batch['step_targets'][at]
  assert len(x) == 5
  want = np.mean(np.logaddexp(0, x) - x * y)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['step_accuracy'], np.mean((x >= 0) == (y >= 0.5)))
  assert np.abs(np.asarray(grads['score'][...])).max() > 0


# --- metrics ----------------------------------------------------------------------------


def test_step_auc_hand_computed():
  # Pairs (correct, incorrect): (.8,.5) 1, (.8,.1) 1, (.5,.5) tie 1/2, (.5,.1) 1 -> 3.5 / 4.
  assert prm.step_auc(np.array([0.8, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.875
  assert prm.step_auc(np.array([0.1, 0.9]), np.array([1, 0], bool)) == 0.0
  assert prm.step_auc(np.array([0.1, 0.9]), np.array([1, 1], bool)) is None


def test_first_error_detection_and_step_metrics():
  scores = [np.array([0.9, 0.2, 0.1]),   # error at 1, predicted at 1: hit
            np.array([0.4, 0.3]),        # error at 1, predicted at 0: miss
            np.array([0.9, 0.8]),        # error at 1, none predicted: miss
            np.array([0.7, 0.6, 0.9]),   # all correct, none predicted: hit
            np.array([0.7, 0.4]),        # all correct, one predicted: miss
            np.array([0.6])]             # 2 labels, max_len left 1 score: all correct, hit
  labels = [[1, 0, 0], [1, 0], [1, 0.4], [1, 1, 0.5], [1, 1], [1, 0]]
  out = prm.step_metrics(scores, labels)
  assert out['first_error/with_error'] == pytest.approx(1 / 3)
  assert out['first_error/all_correct'] == pytest.approx(2 / 3)
  assert out['first_error/f1'] == pytest.approx(2 * (1 / 3) * (2 / 3) / 1)
  assert (out['solutions/with_error'], out['solutions/all_correct']) == (3, 3)
  assert (out['steps/scored'], out['steps/not_scored']) == (13, 1)
  # 13 scored steps; prediction >= 0.5 vs label >= 0.5 disagree at
  # (1,0) 0.4 vs 1, (2,1) 0.8 vs 0.4, (4,1) 0.4 vs 1.
  assert out['step_accuracy'] == pytest.approx(10 / 13)
  assert 0.5 < out['step_auc'] < 1.0


# --- the recipe end to end ----------------------------------------------------------------


def _solutions(n, seed):
  """Sums whose steps are right ('.'-ended) or wrong ('!'-ended), a cue a
  tiny model picks up in a few steps."""
  rng = np.random.RandomState(seed)
  rows = []
  for _ in range(n):
    a, b = rng.randint(1, 9, 2)
    labels = [int(v) for v in rng.rand(3) < 0.6]
    mark = lambda ok: '.' if ok else '!'
    texts = [f'{a}+{b}={a + b if labels[0] else a + b + 1}{mark(labels[0])}',
             f'so {a + b}{mark(labels[1])}', f'end{mark(labels[2])}']
    rows.append({'prompt': f'{a}+{b}?', 'steps': texts, 'labels': labels})
  return rows


@pytest.fixture(scope='module')
def step_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('steps')
  paths = []
  for name, n, seed in (('train.jsonl', 32, 0), ('test.jsonl', 8, 1)):
    (folder / name).write_text(''.join(json.dumps(r) + '\n' for r in _solutions(n, seed)))
    paths.append(str(folder / name))
  return paths


def test_prm_recipe_trains_exports_and_the_scorer_reloads_it(char_checkpoint, step_files,
                                                            tmp_path):
  train, test = step_files
  config = apply(prm_config.get_config('tiny').unlock(), {
      'model.path': str(char_checkpoint), 'data.train': (train,), 'data.eval': (test,),
      'data.max_len': 48, 'total_steps': 12, 'optim.lr': 3e-3, 'eval_every': 12,
      'checkpoint.every': 12, 'transfer_guard': 'disallow'})
  result = trainers.get('prm')(config.lock(), str(tmp_path))
  assert result['step'] == 12

  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert {'loss', 'step_accuracy', 'step_prob', 'step_label'} <= set(records[1])
  evals = [r for r in records if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 12]
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss']
  assert evals[-1]['eval_step_accuracy'] > 0.8  # the '.'/'!' cue is learnt

  saved = json.loads((tmp_path / prm.RESULTS_FILE).read_text())
  assert saved == {'step': 12, **result['prm_eval']}
  assert saved['steps/scored'] == 24 and saved['step_auc'] > 0.9

  hf_config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert hf_config['architectures'] == ['LlamaForSequenceClassification']
  assert hf_config[reward_model.STEP_SEPARATOR_KEY] == '\n'

  # The trained parameters and the export score every step alike.
  examples = prm.load_examples([test], 'error')
  prompts, solutions = [e['prompt'] for e in examples], [e['steps'] for e in examples]
  graphdef = nnx.graphdef(reward_model.load(char_checkpoint, dtype='float32'))
  trained = reward_model.StepScorer(nnx.merge(graphdef, jax.device_get(result['state']['params'])),
                                    Tokenizer.from_dir(char_checkpoint), batch_size=4,
                                    max_len=48)
  reloaded = reward_model.load_step_scorer(tmp_path / 'hf', batch_size=4, max_len=48)
  assert reloaded.separator == '\n'
  want, got = trained.score(prompts, solutions), reloaded.score(prompts, solutions)
  assert [len(s) for s in got] == [3] * 8
  np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-5)
  assert prm.evaluate_steps(reloaded, examples) == pytest.approx(result['prm_eval'])


def test_step_scorer_edges(char_checkpoint, tmp_path):
  prm_dir = reward_model.save(reward_model.load(char_checkpoint, init_std=0.5), tmp_path / 'prm',
                              tokenizer=Tokenizer.from_dir(char_checkpoint), step_separator='\n')
  scorer = reward_model.load_step_scorer(prm_dir, batch_size=2, max_len=31)
  out = scorer.score(['2+3?', '1+1?', 'x'], [['2+3=5', 'ok', 'done'], [], ['y']])
  assert [len(s) for s in out] == [2, 0, 1]  # 'done' ends at token 35, past max_len
  assert scorer.steps_cut == 1 and all(s.dtype == np.float32 for s in out)
  assert np.all((out[0] > 0) & (out[0] < 1))
  with pytest.raises(ValueError, match='2 prompts but 1 step lists'):
    scorer.score(['a', 'b'], [['x']])
  with pytest.raises(ValueError, match=r'steps\[0\] is a str'):
    scorer.score(['a'], ['x\ny'])
  with pytest.raises(RowError, match=r"steps\[1\] is ''"):
    scorer.score(['a'], [['x', '']])
