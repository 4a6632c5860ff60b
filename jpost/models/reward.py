"""A scalar head on the decoder: reward models and PPO critics.

`ScalarModel` maps every token to one number. A reward model reads it at the
last non-padding token of each sequence (as transformers'
`...ForSequenceClassification` does); a PPO critic reads it at every token; a
process reward model (PRM) reads it at the last token of every solution step,
where its sigmoid is the probability that the step is correct.

On disk a reward model is a transformers sequence classifier: the decoder's
`model.*` tensors plus `score.weight` [1, D], `num_labels` 1. It can start
from a causal LM checkpoint (the LM head is dropped: a reward model never
predicts tokens) or from such a classifier.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost.data import steps as steps_lib
from jpost.errors import ConfigError
from jpost.models import hf
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder

SCORE_TENSOR = 'score.weight'
# config.json key of a PRM export: the separator its steps were joined with,
# so a scorer encodes steps as training did. transformers keeps unknown keys.
STEP_SEPARATOR_KEY = 'jpost_step_separator'


class ScalarModel(nnx.Module):
  """Decoder trunk + linear head: `__call__` gives float32 values [B, T]."""

  def __init__(self, decoder: Decoder, *, rngs: nnx.Rngs, init_std: float | None = None):
    self.decoder = decoder
    self.config = decoder.config
    d = self.config.hidden_size
    # 1/sqrt(D+1) keeps the initial rewards O(1) whatever the width.
    std = 1.0 / np.sqrt(d + 1) if init_std is None else init_std
    self.score = nnx.Param(
        std * jax.random.normal(rngs.params(), (d,), jnp.dtype(self.config.param_dtype)),
        logical_axes=('embed',))

  def __call__(self, tokens, positions, segment_ids):
    hidden, _ = self.decoder.hidden_states(tokens, positions, segment_ids)
    return jnp.einsum('btd,d->bt', hidden.astype(jnp.float32),
                      self.score[...].astype(jnp.float32))


def last_token_values(values_bt, segment_ids):
  """values [B, T] read at each row's last non-padding token -> [B]."""
  t = jnp.arange(values_bt.shape[1])
  last = jnp.argmax(jnp.where(segment_ids > 0, t, -1), axis=1)
  return jnp.take_along_axis(values_bt, last[:, None], axis=1)[:, 0]


def _trunk_config(path: pathlib.Path, overrides) -> ModelConfig:
  # Tied: the trunk never needs an LM head (untied checkpoints drop theirs).
  cfg = ModelConfig.from_file(path / 'config.json', **overrides)
  return dataclasses.replace(cfg, tie_embeddings=True)


def _is_classifier(path: pathlib.Path) -> bool:
  architectures = json.loads((path / 'config.json').read_text()).get('architectures') or []
  return any(name.endswith('ForSequenceClassification') for name in architectures)


def load(path: str | pathlib.Path, *, mesh=None, seed: int = 0, init_std: float | None = None,
         lora_adapter=None, require_head: bool = False, **overrides) -> ScalarModel:
  """A ScalarModel from a sequence-classifier or causal-LM checkpoint dir.

  A classifier's `score.weight` is loaded (it must have one label); a causal
  LM gets a fresh head drawn from `seed`, the start of a reward model or
  critic to train, unless `require_head` (a scorer: a fresh head's scores
  are noise). `overrides` set ModelConfig fields.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'reward model directory {path} does not exist; pass a folder '
                            'holding config.json and *.safetensors.')
  cfg = _trunk_config(path, overrides)
  tensors = hf.read_tensors(path)
  score = tensors.pop(SCORE_TENSOR, None)
  tensors.pop('lm_head.weight', None)
  params = hf.with_adapters(hf.hf_to_params(tensors, cfg, source=str(path)), cfg, seed=seed,
                           lora_adapter=lora_adapter)
  shardings = None
  if mesh is not None:
    from jpost import sharding
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract, mesh)
  adapter_score = params.pop(('score',), None)  # a SEQ_CLS PEFT adapter's head
  model = ScalarModel(hf.build_decoder(cfg, params, shardings), rngs=nnx.Rngs(seed),
                      init_std=init_std)
  if adapter_score is not None:
    score = lambda: adapter_score[None]
  if score is None and _is_classifier(path):  # not a causal LM: its head is lost
    raise ConfigError(
        f'{path}: config.json names a sequence classifier, but its weights hold no '
        f'{SCORE_TENSOR}, so its reward head would be drawn afresh. Give the folder its '
        'trained weights, or a causal LM checkpoint to start a new reward model from.')
  if score is None and require_head:
    raise ConfigError(
        f'{path} holds no reward head ({SCORE_TENSOR}): a causal LM, not a trained reward '
        'model, so its scores would come from a randomly drawn head. Train one '
        "(configs/reward.py, or configs/prm.py for step scores) and give its 'hf' folder.")
  if score is not None:
    weight = score()
    if weight.shape != (1, cfg.hidden_size):
      raise ValueError(
          f'{path}: {SCORE_TENSOR} has shape {tuple(weight.shape)}; a reward model has one '
          f'label, shape (1, {cfg.hidden_size}). Multi-label classifiers are not reward models.')
    model.score.set_value(jnp.asarray(weight[0], jnp.dtype(cfg.param_dtype)))
  if mesh is not None:
    from jax.sharding import NamedSharding, PartitionSpec
    model.score.set_value(jax.device_put(model.score[...], NamedSharding(mesh, PartitionSpec())))
  return model


def export_pad_id(tokenizer) -> int:
  """The pad id written to config.json. transformers finds a row's last real
  token as the last one != pad_token_id; with pad == end-of-turn (SmolLM2) it
  would skip the end of every answer, so another special token is used."""
  if not tokenizer.pad_is_eos and tokenizer.pad_id not in tokenizer.stop_ids:
    return tokenizer.pad_id
  for candidate in (tokenizer.bos_id, tokenizer.token_to_id('<|endoftext|>')):
    if candidate is not None and candidate not in tokenizer.stop_ids:
      return candidate
  raise ValueError('the tokenizer has no pad token distinct from its stop tokens; add one '
                   "(tokenizer_config.json 'pad_token') so transformers can batch the scores.")


def save(model: ScalarModel, path: str | pathlib.Path, *, tokenizer=None,
         step_separator: str | None = None) -> pathlib.Path:
  """Writes a transformers sequence classifier (num_labels 1) to `path`; a PRM
  also records its `step_separator` (read back by `load_step_scorer`)."""
  tensors = hf.params_to_hf(model.decoder)
  tensors[SCORE_TENSOR] = np.asarray(model.score[...], np.float32)[None, :].astype(
      np.dtype(jnp.dtype(model.config.param_dtype)))
  config = model.config.to_hf()
  config['architectures'] = [config['architectures'][0].replace(
      'ForCausalLM', 'ForSequenceClassification')]
  config['id2label'] = {'0': 'LABEL_0'}
  config['label2id'] = {'LABEL_0': 0}
  config['torch_dtype'] = model.config.param_dtype
  if tokenizer is not None:
    config['pad_token_id'] = export_pad_id(tokenizer)
  if step_separator is not None:
    config[STEP_SEPARATOR_KEY] = step_separator
  path = hf.write_checkpoint(tensors, config, path)
  if tokenizer is not None:
    tokenizer.save(path)
  return path


def _right_pad(rows: list[list[int]], width: int) -> dict[str, np.ndarray]:
  tokens = np.zeros((len(rows), width), np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    segments[i, :len(row)] = 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()
  return {'tokens': tokens, 'positions': positions, 'segment_ids': segments}


def as_messages(prompt) -> list[dict]:
  """A prompt given as text or as chat messages -> chat messages."""
  if isinstance(prompt, str):
    return [{'role': 'user', 'content': prompt}]
  return list(prompt)


class Scorer:
  """scorer(prompts, completions) -> rewards [N]: the RL and eval entry point.

  Each prompt (text or messages) plus its completion as the assistant turn is
  encoded with the chat template, exactly as reward training encodes pairs,
  and scored at its last token. Lengths are bucketed to multiples of 64 so a
  run compiles a handful of shapes; longer rows keep their last `max_len`
  tokens (the start of the prompt goes), counted in `rows_cut` and said on
  stderr the first time.
  """

  def __init__(self, model: ScalarModel, tokenizer, *, batch_size: int = 16,
               max_len: int = 1024):
    self.tokenizer, self.batch_size, self.max_len = tokenizer, batch_size, max_len
    self.rows_cut = 0
    graphdef, self._state = nnx.split(model)

    @jax.jit
    def scores(state, batch):
      m = nnx.merge(graphdef, state)
      return last_token_values(m(batch['tokens'], batch['positions'], batch['segment_ids']),
                               batch['segment_ids'])
    self._scores = scores

  def encode(self, prompt, completion: str) -> list[int]:
    messages = as_messages(prompt) + [{'role': 'assistant', 'content': completion}]
    ids = self.tokenizer.encode_chat(messages).ids
    if len(ids) > self.max_len:
      if not self.rows_cut:
        print(f'reward model: a prompt and completion of {len(ids)} tokens keep their last '
              f'{self.max_len} (the max_len option; later cuts are counted in rows_cut)',
              file=sys.stderr, flush=True)
      self.rows_cut += 1
    return ids[-self.max_len:]

  def __call__(self, prompts, completions) -> np.ndarray:
    if len(prompts) != len(completions):
      raise ValueError(f'{len(prompts)} prompts but {len(completions)} completions.')
    rows = [self.encode(p, c) for p, c in zip(prompts, completions)]
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      width = min(-(-max(map(len, chunk)) // 64) * 64, self.max_len)
      chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one batch shape
      values = self._scores(self._state, _right_pad(chunk, width))
      out.append(np.asarray(values)[:len(rows) - start])
    return np.concatenate(out).astype(np.float32)


def load_scorer(path: str | pathlib.Path, **kwargs) -> Scorer:
  """A Scorer for a reward model directory (jpost export or transformers')."""
  from jpost.models import pretrained
  from jpost.tokenizer import Tokenizer
  path = pretrained.resolve(str(path))
  return Scorer(load(path, dtype='float32', require_head=True), Tokenizer.from_dir(path),
                **kwargs)


class StepScorer:
  """scorer.score(prompts, steps) -> per-step probabilities: the PRM entry point.

  Each prompt (text or messages) and its list of steps are encoded exactly as
  PRM training encodes them (`jpost.data.steps.encode_steps`: the steps joined
  by `separator` as the assistant turn), and the model is read at the last
  token of every step; the sigmoid of that value is the probability that the
  step is correct. Lengths are bucketed to multiples of 64 and batches padded
  to `batch_size` rows, so a run compiles a handful of shapes. Tokens past
  `max_len` are cut, as in training: the steps ending there are not scored
  (the solution's array is shorter than its steps; raise max_len), counted
  in `steps_cut`.
  """

  def __init__(self, model: ScalarModel, tokenizer, *, batch_size: int = 16,
               max_len: int = 1024, separator: str = steps_lib.DEFAULT_SEPARATOR):
    self.tokenizer, self.batch_size, self.max_len = tokenizer, batch_size, max_len
    self.separator = separator
    self.steps_cut = 0
    graphdef, self._state = nnx.split(model)

    @jax.jit
    def probs(state, batch):
      m = nnx.merge(graphdef, state)
      return jax.nn.sigmoid(m(batch['tokens'], batch['positions'], batch['segment_ids']))
    self._probs = probs

  def encode(self, prompt, steps: list[str]) -> steps_lib.StepEncoding:
    return steps_lib.encode_steps(prompt, list(steps), self.tokenizer, separator=self.separator,
                                  max_len=self.max_len)

  def score(self, prompts, steps) -> list[np.ndarray]:
    """One float32 array of probabilities per prompt, one per step in order
    (fewer when max_len cut steps off); a solution with no steps gets an
    empty array."""
    if len(prompts) != len(steps):
      raise ValueError(f'{len(prompts)} prompts but {len(steps)} step lists.')
    for i, solution in enumerate(steps):
      if not isinstance(solution, (list, tuple)):
        raise ValueError(f'steps[{i}] is a {type(solution).__name__}; give each solution as a '
                         'list of step strings (e.g. text.split(separator)).')
    out = [np.zeros(0, np.float32) for _ in steps]
    todo = [(i, self.encode(p, s)) for i, (p, s) in enumerate(zip(prompts, steps)) if s]
    for start in range(0, len(todo), self.batch_size):
      chunk = todo[start:start + self.batch_size]
      rows = [e.tokens.tolist() for _, e in chunk]
      width = min(-(-max(map(len, rows)) // 64) * 64, self.max_len)
      rows = rows + [rows[-1]] * (self.batch_size - len(rows))  # one batch shape
      probs = np.asarray(self._probs(self._state, _right_pad(rows, width)))
      for row, (i, encoding) in enumerate(chunk):
        out[i] = probs[row, encoding.step_ends].astype(np.float32)
        self.steps_cut += encoding.steps_cut
    return out

  __call__ = score


def load_step_scorer(path: str | pathlib.Path, *, separator: str | None = None,
                     **kwargs) -> StepScorer:
  """A StepScorer for a PRM directory (a jpost export or a transformers
  sequence classifier). The step separator is the export's own unless given."""
  import json

  from jpost.models import pretrained
  from jpost.tokenizer import Tokenizer
  path = pretrained.resolve(str(path))
  if separator is None:
    config = json.loads((path / 'config.json').read_text())
    separator = config.get(STEP_SEPARATOR_KEY, steps_lib.DEFAULT_SEPARATOR)
  return StepScorer(load(path, dtype='float32', require_head=True), Tokenizer.from_dir(path),
                    separator=separator, **kwargs)
