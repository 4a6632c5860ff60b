"""The online RL loop (GRPO, PPO): layouts, learning on a toy task, faults, resume."""

import functools
import json
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jpost import memory, rewards, sampling
from jpost.models import hf
from jpost.sampling import Completions
from jpost.trainers import online, rl_parts
import overrides
from norms import assert_norm_close
import xla_env

sys.path.insert(0, 'configs')
import grpo  # noqa: E402
import ppo  # noqa: E402


def test_training_rows_layout():
  prompts = {'tokens': np.array([[0, 0, 7, 8], [0, 5, 6, 7]]),
             'segment_ids': np.array([[0, 0, 1, 1], [0, 1, 1, 1]])}
  completions = Completions(
      tokens=np.array([[9, 2, 0], [4, 4, 4], [2, 0, 0], [9, 9, 2]]),
      mask=np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]),
      logprobs=np.full((4, 3), -9.0), sampling_logprobs=np.array(
          [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0], [-6.0, 0.0, 0.0], [-7.0, -8.0, -9.0]]),
      truncated=np.array([False, True, False, False]), lengths=np.array([2, 3, 1, 3]))
  rows = rl_parts.training_rows(prompts, completions, num_samples=2)
  np.testing.assert_array_equal(rows['tokens'][1], [0, 0, 7, 8, 4, 4, 4])
  np.testing.assert_array_equal(rows['segment_ids'][0], [0, 0, 1, 1, 1, 1, 0])
  # Left padding never shifts positions: the first real token is position 0.
  np.testing.assert_array_equal(rows['positions'][0], [0, 0, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(rows['positions'][2], [0, 0, 1, 2, 3, 0, 0])
  # The stop token (2) is in the mask; what follows it is not.
  np.testing.assert_array_equal(rows['completion_mask'][0], [1, 1, 0])
  np.testing.assert_array_equal(rows['sampler_logprobs'][0], [-1, -2, 0])
  np.testing.assert_array_equal(rows['sampler_logprobs'][3], [-7, -8, -9])
  # Shared-prompt layout: each prompt once, completions continue its positions.
  np.testing.assert_array_equal(rows['prompt_tokens'], prompts['tokens'])
  np.testing.assert_array_equal(rows['prompt_positions'], [[0, 0, 0, 1], [0, 0, 1, 2]])
  np.testing.assert_array_equal(rows['completion_tokens'], completions.tokens)
  np.testing.assert_array_equal(rows['completion_positions'][1], [2, 3, 4])
  np.testing.assert_array_equal(rows['completion_positions'][2], [3, 4, 5])
  picked = rl_parts.select_rows(rows, np.array([3, 0]), num_samples=2)
  np.testing.assert_array_equal(picked['prompt_tokens'], prompts['tokens'][[1, 0]])
  np.testing.assert_array_equal(picked['completion_tokens'], completions.tokens[[3, 0]])


def test_completion_logprobs_equal_a_full_forward(tiny_checkpoint):
  """Only the completion positions go through the LM head; the log-probs are
  those of the full forward at the same positions."""
  import jax.numpy as jnp
  from flax import nnx
  from jpost import ops
  from jpost.models import hf
  model = hf.load(tiny_checkpoint)
  rng = np.random.RandomState(0)
  prompts = {'tokens': rng.randint(3, 500, (2, 6)),
             'segment_ids': np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}
  completions = Completions(
      tokens=rng.randint(3, 500, (4, 4)), mask=np.array([[1, 1, 1, 0]] * 2 + [[1, 1, 1, 1]] * 2),
      logprobs=np.zeros((4, 4)), sampling_logprobs=np.zeros((4, 4)),
      truncated=np.zeros(4, bool), lengths=np.array([3, 3, 4, 4]))
  rows = rl_parts.training_rows(prompts, completions, num_samples=2)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  ours = nnx.jit(lambda m, b: rl_parts.completion_logprobs(m, b, 0.7))(model, batch)
  full = nnx.jit(lambda m, b: m(b['tokens'], b['positions'], b['segment_ids']))(model, batch) / 0.7
  reference = ops.token_logprobs(full, batch['tokens'][:, 1:])[:, -4:]
  mask = rows['completion_mask'] > 0
  np.testing.assert_allclose(np.asarray(ours)[mask], np.asarray(reference)[mask], atol=1e-5)


def test_shared_prompt_gradient_equals_full_rows(tiny_checkpoint):
  """Each prompt is computed once per group; the gradient (summed over the
  group's samples through the shared prompt) is that of full rows."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jpost import ops
  from jpost.models import hf
  graphdef, params = nnx.split(hf.load(tiny_checkpoint))
  rng = np.random.RandomState(1)
  prompts = {'tokens': rng.randint(3, 500, (2, 5)),
             'segment_ids': np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])}
  completions = Completions(
      tokens=rng.randint(3, 500, (6, 4)), mask=np.array([[1, 1, 0, 0], [1, 1, 1, 1]] * 3),
      logprobs=np.zeros((6, 4)), sampling_logprobs=np.zeros((6, 4)),
      truncated=np.zeros(6, bool), lengths=np.array([2, 4] * 3))
  rows = {k: jnp.asarray(v) for k, v in rl_parts.training_rows(prompts, completions, 3).items()}
  weights = rows['completion_mask'] * jnp.arange(1, 5)  # distinct per-token weights

  def shared(params):
    model = nnx.merge(graphdef, params)
    return jnp.sum(rl_parts.completion_logprobs(model, rows, 1.0) * weights)

  def full(params):
    logits = nnx.merge(graphdef, params)(rows['tokens'], rows['positions'], rows['segment_ids'])
    return jnp.sum(ops.token_logprobs(logits, rows['tokens'][:, 1:])[:, -4:] * weights)

  (value, grads), (ref_value, ref_grads) = (jax.jit(jax.value_and_grad(f))(params)
                                            for f in (shared, full))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  # Measured 4e-7 (summation order); sharing the prompt wrongly is off by O(1).
  assert_norm_close(grads, ref_grads, bound=1e-5, what='gradient ')


def test_pack_plan_places_every_completion_token_once():
  lengths = np.array([5, 1, 2, 3, 6, 6, 1, 0])  # 2 groups of 4, width 6
  plan = rl_parts.pack_plan(lengths, num_samples=4, width=6)
  source, segment, target = plan['pack_source'], plan['pack_segment'], plan['pack_target']
  # Group 0 (5, 1, 2, 3) first-fit longest first: [5, 1], [3, 2]; group 1
  # (6, 6, 1, 0) needs 3 rows, so every group gets 3: 6 rows, not 8.
  assert source.shape == segment.shape == (6, 6) and target.shape == (8, 6)
  np.testing.assert_array_equal(source[0], [0, 1, 2, 3, 4, 6])  # row 0's 5 tokens, row 1's
  np.testing.assert_array_equal(segment[0], [1, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(segment[1], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(segment[2], 0)  # group 0's third row is empty
  real = np.arange(6)[None] < lengths[:, None]
  # Each real token is in one slot, the slot points back at it, nothing else is placed.
  flat = np.flatnonzero(real.ravel())
  np.testing.assert_array_equal(np.sort(source[source >= 0]), flat)
  np.testing.assert_array_equal(source.ravel()[target[real]], flat)
  assert (target[~real] == -1).all() and ((segment > 0) == (source >= 0)).all()
  # Packed rows stay within their group (row r of the [R, N] layout is r // 4's).
  group_of = np.where(source >= 0, source // 6 // 4, -1)
  assert set(group_of[:3].ravel()) <= {0, -1} and set(group_of[3:].ravel()) <= {1, -1}
  # Over 4 devices the row count must divide: 2 groups x 4 rows is no saving.
  assert rl_parts.pack_plan(lengths, num_samples=4, width=6, row_multiple=4) is None
  assert rl_parts.pack_plan(np.array([6, 6, 5, 6]), num_samples=4, width=6) is None


def _packed(rows: dict, lengths, num_samples: int) -> dict:
  plan = rl_parts.pack_plan(lengths, num_samples, rows['completion_tokens'].shape[1])
  assert plan is not None
  return rows | plan


def _packed_rollout(rng):
  """(training rows, the same packed, completion mask [8, 6]) of 2 prompts
  x 4 completions of lengths 6, 2, 1, 3 and 4, 4, 2, 1: 2 packed rows a
  group instead of 4."""
  import jax.numpy as jnp
  prompts = {'tokens': rng.randint(3, 500, (2, 5)),
             'segment_ids': np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
  lengths = np.array([6, 2, 1, 3, 4, 4, 2, 1])
  mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int32)
  completions = Completions(
      tokens=rng.randint(3, 500, mask.shape), mask=mask, logprobs=np.zeros(mask.shape),
      sampling_logprobs=np.zeros(mask.shape), truncated=np.zeros(8, bool), lengths=lengths)
  rows = {k: jnp.asarray(v) for k, v in rl_parts.training_rows(prompts, completions, 4).items()}
  packed = {k: jnp.asarray(v) for k, v in _packed(rows, lengths, 4).items()}
  assert packed['pack_source'].shape[0] == 4
  return rows, packed, mask


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_packed_completions_equal_rows_of_their_own(tiny_checkpoint, dtype):
  """Completions packed into shared rows (each its own segment after the
  shared prompt) give the same log-probs, entropies and gradient as one row
  each; the slots after each completion's end come back 0. With the head
  on the completion tokens alone (`logits_chunk` 2: pieces of rows x 2 of
  them, ops.head_masked_logprobs), packed or not, the same again."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  rows, packed, mask = _packed_rollout(np.random.RandomState(3))
  weights = rows['completion_mask'] * jnp.arange(1, 7)  # distinct per-token weights

  def run(batch, chunk):
    graphdef, params = nnx.split(hf.load(tiny_checkpoint, dtype=dtype, logits_chunk=chunk))

    def loss(params):
      logprobs, entropy = rl_parts.completion_logprobs(nnx.merge(graphdef, params), batch, 0.7,
                                                       entropy='loss')
      return jnp.sum((logprobs + 0.1 * entropy) * weights), (logprobs, entropy)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (value, (logprobs, entropy)), grads = run(rows, 0)
  real = mask > 0
  # Measured: log-probs and entropies equal to 2e-8; gradients 3e-7 in
  # float32, 1e-3 to 4e-3 in bfloat16 (its gradients sum in another order).
  grad_bound = 1e-5 if dtype == 'float32' else 2e-2
  for batch, chunk in ((packed, 0), (rows, 2), (packed, 2)):
    (other_value, (other_lp, other_entropy)), other_grads = run(batch, chunk)
    for got, want in ((other_lp, logprobs), (other_entropy, entropy)):
      assert_norm_close(np.asarray(got)[real], np.asarray(want)[real], bound=1e-5)
      assert (np.asarray(got)[~real] == 0).all()
    np.testing.assert_allclose(other_value, value, rtol=1e-5)
    # A completion seeing its row-mate, or restarting from the wrong state, is off by O(1).
    assert_norm_close(other_grads, grads, bound=grad_bound, what='gradient ')


def test_critic_values_on_the_shared_layout_equal_full_rows(tiny_checkpoint):
  """The PPO critic's values (each prompt once for its samples, completions
  packed or not) and a value loss's gradient equal those of full rows, each
  with its own copy of its prompt; 0 after each completion's end when
  packed."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jpost.models import reward as reward_model
  graphdef, params = nnx.split(reward_model.load(tiny_checkpoint, seed=1))
  rng = np.random.RandomState(4)
  rows, packed, mask = _packed_rollout(rng)
  targets = jnp.asarray(rng.normal(size=mask.shape), jnp.float32) * rows['completion_mask']

  def full_rows(params):
    critic = nnx.merge(graphdef, params)
    values = critic(rows['tokens'], rows['positions'], rows['segment_ids'])[:, -7:-1]
    return jnp.sum(((values - targets) * rows['completion_mask']) ** 2), values

  def shared(batch):
    def loss(params):
      values = rl_parts.completion_values(nnx.merge(graphdef, params), batch)
      return jnp.sum(((values - targets) * rows['completion_mask']) ** 2), values
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (value, want), grads = jax.jit(jax.value_and_grad(full_rows, has_aux=True))(params)
  real = mask > 0
  for batch in (rows, packed):
    (got_value, got), got_grads = shared(batch)
    # Measured 2e-7; a value read one position off, or a prompt shared wrongly, is O(1).
    assert_norm_close(np.asarray(got)[real], np.asarray(want)[real], bound=1e-5)
    np.testing.assert_allclose(got_value, value, rtol=1e-5)
    assert_norm_close(got_grads, grads, bound=1e-5, what='gradient ')
  assert (np.asarray(got)[~real] == 0).all()


@pytest.mark.parametrize('algorithm', ['grpo', 'ppo'])
def test_packed_updates_equal_unpacked_ones(tiny_checkpoint, algorithm):
  """On 8 devices, the reference log-probs and the policy update (loss, KL,
  gradient norm, new weights) are the same with each group's completions
  packed into shared rows (rl.pack_completions) as with one row each."""
  import jax
  import jax.numpy as jnp
  from jpost import sharding
  from jpost.trainers import loop
  recipe = grpo if algorithm == 'grpo' else ppo
  config = _config(tiny_checkpoint, recipe, **{'rl.beta': 0.05})
  mesh = sharding.make_mesh({'data': -1})
  model = hf.load(tiny_checkpoint, mesh=mesh, **hf.compute_options(config))
  kl_coef = 0.05 if algorithm == 'grpo' else 0.0
  graphdef, state, update, _, critic_graphdef = online._update_fns(
      config, algorithm, tiny_checkpoint, mesh, model, kl_coef)
  # A reference apart from the policy, so the KL term and its gradient are not 0.
  ref = jax.tree.map(
      lambda x: x + 0.02 * jax.random.normal(jax.random.key(0), x.shape, x.dtype),
      state['policy']['params'])
  prepare = rl_parts.make_prepare(graphdef, critic_graphdef, algorithm=algorithm, rl=config.rl,
                                  num_samples=4, temperature=1.0, kl_coef=kl_coef, mesh=mesh)
  rng = np.random.RandomState(4)
  prompts = loop.place_batch(
      {'tokens': rng.randint(3, 500, (4, 6)), 'segment_ids': np.ones((4, 6), np.int32)}, mesh,
      replicate_uneven=('tokens', 'segment_ids'))
  lengths = np.array([8, 3, 4, 1, 2, 2, 5, 1, 7, 1, 1, 1, 6, 2, 3, 3])  # 2 rows a group
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  completions = Completions(
      tokens=rng.randint(3, 500, mask.shape), mask=mask,
      logprobs=np.zeros(mask.shape, np.float32),
      sampling_logprobs=np.where(mask, -rng.uniform(1, 7, mask.shape), 0).astype(np.float32),
      truncated=lengths == 8, lengths=lengths)
  plan = rl_parts.pack_plan(lengths, 4, 8, row_multiple=8)
  assert plan['pack_source'].shape[0] == 8  # 4 groups x 2 rows, not 16 rows
  scores = jnp.asarray(rng.uniform(0, 1, 16).astype(np.float32))
  critic = state['critic']['params'] if algorithm == 'ppo' else None
  results = []
  for plan_or_none in (loop.place_batch(plan, mesh), None):
    batch, _ = prepare(state['policy']['params'], ref, critic, prompts, completions, scores,
                       None, plan_or_none)
    new_state, out = update(jax.tree.map(jnp.copy, state['policy']), batch)
    results.append((jax.device_get(batch), jax.device_get(out),
                    jax.device_get(new_state['params'])))
  (packed, packed_out, packed_params), (apart, apart_out, apart_params) = results
  real = mask > 0
  # GRPO: the reference's log-probs are the loss's; PPO: in the per-token
  # rewards, so in its advantages and returns.
  for key in ('ref_logprobs', 'advantages', 'returns'):
    if key in apart:
      at = real if apart[key].ndim == 2 else slice(None)
      np.testing.assert_allclose(packed[key][at], apart[key][at], atol=1e-5, err_msg=key)
  if kl_coef:
    assert apart_out['kl'] > 1e-4, apart_out  # the reference is another model
  for key in ('loss', 'grad_norm', 'ratio_mean') + (('kl',) if kl_coef else ()):
    assert packed_out[key] == pytest.approx(apart_out[key], rel=1e-4, abs=1e-6), key
  assert_norm_close(packed_params, apart_params, bound=1e-5, what='updated weights ')


def test_reference_and_old_logprobs_use_the_policys_rows(tiny_checkpoint):
  """make_prepare computes the reference's log-probs (and the recomputed old
  ones) on the rows the policy trains on: each equals a full forward of its
  own weights at the completion positions, left-padded prompts and ragged
  completions (junk after the end) included."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jpost import ops, sharding
  graphdef, params = nnx.split(hf.load(tiny_checkpoint))
  ref_params = jax.tree.map(
      lambda x: x + 0.02 * jax.random.normal(jax.random.key(0), x.shape, x.dtype), params)
  rng = np.random.RandomState(2)
  prompts = {'tokens': rng.randint(3, 500, (2, 5)),
             'segment_ids': np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
  completions = Completions(
      tokens=rng.randint(3, 500, (4, 4)), mask=mask, logprobs=np.zeros((4, 4)),
      sampling_logprobs=np.zeros((4, 4)), truncated=np.zeros(4, bool), lengths=mask.sum(1))
  config = _config(tiny_checkpoint, **{'rl.old_logprobs': 'recompute', 'rl.beta': 0.1})
  prepare = rl_parts.make_prepare(graphdef, None, algorithm='grpo', rl=config.rl, num_samples=2,
                                  temperature=0.7, kl_coef=0.1,
                                  mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  batch, prepared = prepare(params, ref_params, None, prompts, completions,
                            jnp.array([1.0, 0.0, 0.5, 0.0]))
  rows = rl_parts.training_rows(prompts, completions, 2)

  def full_forward(weights):
    logits = nnx.merge(graphdef, weights)(rows['tokens'], rows['positions'],
                                          rows['segment_ids']) / 0.7
    return np.asarray(ops.token_logprobs(logits, rows['tokens'][:, 1:])[:, -4:])
  real = mask > 0
  for got, weights in ((batch['old_logprobs'], params), (batch['ref_logprobs'], ref_params)):
    np.testing.assert_allclose(np.asarray(got)[real], full_forward(weights)[real], atol=1e-5)
  # The two differ (the reference is another model), on the same positions.
  assert np.abs(np.asarray(batch['ref_logprobs'] - batch['old_logprobs'])[real]).min() > 1e-4
  np.testing.assert_array_equal(np.asarray(batch['completion_mask']) > 0, real)
  # The gap to the sampler's log-probs (all 0 here) is logged: mean |old| over real tokens.
  np.testing.assert_allclose(prepared['logprob_mismatch/sampler_vs_trainer'],
                             np.abs(full_forward(params)[real]).mean(), rtol=1e-5)

  # The update logs |trainer - old| and the ratios: 0 and 1 with the old
  # log-probs recomputed, 0.1 and e^0.1 with old ones 0.1 lower everywhere.
  loss = functools.partial(rl_parts.policy_loss_fn, rl=config.rl, temperature=0.7,
                           max_new_tokens=4, kl_coef=0.0)
  model = nnx.merge(graphdef, params)
  for shift in (0.0, 0.1):
    shifted = batch | {'old_logprobs': batch['old_logprobs'] - shift}
    _, out = jax.jit(loss)(model, shifted, jnp.sum(batch['completion_mask']))
    assert float(out['logprob_mismatch']) == pytest.approx(shift, abs=1e-5)
    assert float(out['ratio_mean']) == pytest.approx(np.exp(shift), rel=1e-5)

  # kl_in='reward': each score loses beta x the sequence's summed k1 = old - ref
  # before the group advantages (unscaled here: a group of 2 scaled by its
  # std is always +-1); the loss then carries no KL term.
  with config.rl.unlocked():
    config.rl.kl_in, config.rl.scale = 'reward', 'none'
  prepare = rl_parts.make_prepare(graphdef, None, algorithm='grpo', rl=config.rl, num_samples=2,
                                  temperature=0.7, kl_coef=0.0,
                                  mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  in_reward, _ = prepare(params, ref_params, None, prompts, completions,
                         jnp.array([1.0, 0.0, 0.5, 0.0]))
  k1 = np.where(real, full_forward(params) - full_forward(ref_params), 0.0).sum(axis=1)
  scores = np.array([1.0, 0.0, 0.5, 0.0]) - 0.1 * k1
  pairs = scores.reshape(2, 2)
  want = (pairs - pairs.mean(1, keepdims=True)).ravel()
  np.testing.assert_allclose(np.asarray(in_reward['advantages']), want, atol=1e-4)
  assert np.abs(want - [0.5, -0.5, 0.25, -0.25]).max() > 1e-2  # the KL moved them
  assert 'ref_logprobs' not in in_reward


# (Fewer prompts than devices are replicated: every in-suite GRPO run of the
# tiny config, and test_multiprocess.py compares such a run with one device.)
@pytest.mark.parametrize('num_prompts,packed', [(8, False), (8, True)])
def test_shared_prompts_on_a_mesh_match_one_device(tiny_checkpoint, num_prompts, packed):
  """On 8 devices, 8 shared prompts are split over the batch axis; log-probs
  and gradients equal one device's, with each group's completions packed
  into one row too."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jpost import sharding
  from jpost.models import hf
  from jpost.trainers import loop
  mesh = sharding.make_mesh({'data': -1})
  assert mesh.devices.size == 8, 'the suite runs on 8 host devices (tests/conftest.py)'
  samples, width, new = 16 // num_prompts, 6, 4  # 16 rows either way
  rng = np.random.RandomState(2)
  real = rng.randint(1, width + 1, num_prompts)
  prompts = {'tokens': rng.randint(3, 500, (num_prompts, width)),
             'segment_ids': (np.arange(width)[None] >= width - real[:, None]).astype(np.int32)}
  lengths = rng.randint(1, (new // samples if packed else new) + 1, num_prompts * samples)
  mask = (np.arange(new)[None] < lengths[:, None]).astype(np.int32)
  completions = Completions(
      tokens=rng.randint(3, 500, mask.shape) * mask, mask=mask,
      logprobs=np.zeros(mask.shape), sampling_logprobs=np.zeros(mask.shape),
      truncated=np.zeros(len(lengths), bool), lengths=lengths)
  rows = {k: np.asarray(rl_parts.training_rows(prompts, completions, samples)[k])
          for k in rl_parts.POLICY_KEYS}

  def loss(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    logprobs = rl_parts.completion_logprobs(model, batch, 1.0)
    return jnp.sum(logprobs * batch['completion_mask'] * jnp.arange(1, new + 1)), logprobs

  def run(model, batch):
    graphdef, params = nnx.split(model)
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss(graphdef, p, b), has_aux=True))
    (value, logprobs), grads = fn(params, batch)
    return value, logprobs, grads

  want = run(hf.load(tiny_checkpoint), {k: jnp.asarray(v) for k, v in rows.items()})
  if packed:
    plan = rl_parts.pack_plan(lengths, samples, new, row_multiple=8)
    assert plan['pack_source'].shape[0] == num_prompts  # one row per group, one per device
    rows |= plan
  placed = loop.place_batch(rows, mesh, replicate_uneven=rl_parts.PROMPT_KEYS)
  prompts = placed['prompt_tokens'].sharding
  assert prompts.is_fully_replicated == (num_prompts % 8 != 0), prompts
  assert placed['completion_tokens'].sharding.spec[0] is not None
  got = run(hf.load(tiny_checkpoint, mesh=mesh), placed)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  real = mask > 0  # packed rows return 0 after each end; one row each, junk
  np.testing.assert_allclose(np.asarray(got[1])[real], np.asarray(want[1])[real], atol=1e-5)
  # Elementwise, a 0.0118 gradient was once 2.2e-6 off on another CPU (summation
  # order). Measured by norm: 3e-7 to 4e-7; a shard's rows missing from the sum: O(1).
  assert_norm_close(jax.device_get(got[2]), jax.device_get(want[2]), bound=1e-5,
                    what='gradient ')


def test_trim_prompts_keeps_a_bucketed_width():
  segments = np.zeros((2, 10), np.int32)
  segments[0, -3:] = 1
  segments[1, -5:] = 1
  batch = {'tokens': np.arange(20).reshape(2, 10), 'positions': np.zeros((2, 10)),
           'segment_ids': segments, 'prompt': ['a', 'b']}
  trimmed = rl_parts.trim_prompts(batch, 4)
  np.testing.assert_array_equal(trimmed['tokens'], batch['tokens'][:, 2:])  # 5 -> 8 wide
  assert trimmed['prompt'] == ['a', 'b']
  assert rl_parts.trim_prompts(batch, 0) is batch
  assert rl_parts.trim_prompts(batch, 16)['tokens'].shape == (2, 10)  # never wider
  # A width compiled already, at most one bucket wider, is reused; a narrower one is not.
  assert rl_parts.trim_prompts(batch, 4, compiled=(10, 4))['tokens'].shape == (2, 10)
  assert rl_parts.trim_prompts(batch, 2, compiled=(10, 4))['tokens'].shape == (2, 6)


def test_reuse_compiled_takes_the_narrowest_size_within_the_slack():
  assert rl_parts.reuse_compiled(8, {16, 12, 4}, 4) == 12
  assert rl_parts.reuse_compiled(8, {8, 12}, 4) == 8
  assert rl_parts.reuse_compiled(8, {16, 4}, 4) == 8  # 16: more than one bucket up
  assert rl_parts.reuse_compiled(8, (), 4) == 8
  assert rl_parts.reuse_compiled(8, {9}, 0) == 8


def test_pack_plan_reuses_a_compiled_row_count_with_empty_rows():
  lengths = np.array([3, 3, 2, 2, 4, 1, 1, 1])  # two groups of 4 in rows of 6: 2 rows each
  assert len(rl_parts.pack_plan(lengths, 4, 6)['pack_source']) == 4
  plan = rl_parts.pack_plan(lengths, 4, 6, compiled=(3,))
  assert len(plan['pack_source']) == 6
  for group in range(2):  # the third row of each group is empty
    assert (plan['pack_source'][group * 3 + 2] == -1).all()
    assert (plan['pack_segment'][group * 3 + 2] == 0).all()
  want = rl_parts.pack_plan(lengths, 4, 6)  # and every token lands where it did, by row
  flat = lambda p: sorted(map(tuple, p['pack_source'][p['pack_source'][:, 0] >= 0].tolist()))
  assert flat(plan) == flat(want)
  assert len(rl_parts.pack_plan(lengths, 4, 6, compiled=(4, 1))['pack_source']) == 4
  three = np.array([4, 4, 4, 1, 1, 1, 1, 1])  # 3 rows for the first group
  assert len(rl_parts.pack_plan(three, 4, 6)['pack_source']) == 6
  assert rl_parts.pack_plan(three, 4, 6, compiled=(4,)) is None  # 4 a group: the unpacked shape


def test_trim_completions_keeps_a_bucketed_width():
  full = lambda: np.arange(2 * 10).reshape(2, 10)
  completions = Completions(tokens=full(), mask=full() % 10 < np.array([[3], [5]]),
                            logprobs=full(), sampling_logprobs=full(),
                            truncated=np.zeros(2, bool), lengths=np.array([3, 5]))
  trimmed = rl_parts.trim_completions(completions, 4)
  np.testing.assert_array_equal(trimmed.tokens, full()[:, :8])  # longest 5 -> 8 wide
  np.testing.assert_array_equal(trimmed.mask, completions.mask[:, :8])
  np.testing.assert_array_equal(trimmed.lengths, [3, 5])
  assert rl_parts.trim_completions(completions, 0) is completions
  assert rl_parts.trim_completions(completions, 16) is completions  # never wider
  assert rl_parts.trim_completions(completions, 2, compiled=(8,)).tokens.shape == (2, 8)
  assert rl_parts.trim_completions(completions, 2, compiled=(10,)).tokens.shape == (2, 6)
  assert rl_parts.trim_completions(completions, 4, compiled=(10,)) is completions


@pytest.mark.parametrize('filter_zero_variance', [False, True])
def test_grpo_zero_variance_groups_are_counted_and_optionally_dropped(filter_zero_variance):
  """Three groups of 2: (1, 0) has a signal; (1, 1) and (0, 0) do not. Their
  advantages are 0 either way; the filter also takes their tokens out of the
  mask, so they leave the token count the loss and KL are averaged over."""
  rl = grpo.get_config().rl
  with rl.unlocked():
    rl.filter_zero_variance = filter_zero_variance
  scores = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
  mask = jnp.ones((6, 3))
  advantages, kept, metrics = rl_parts.grpo_advantages(scores, mask, rl=rl, num_samples=2)
  # (r - group mean) / (population std 0.5 + 1e-6)
  np.testing.assert_allclose(advantages, [1, -1, 0, 0, 0, 0], atol=1e-5)
  assert float(metrics['groups/zero_variance_fraction']) == pytest.approx(2 / 3)
  want = [1, 1, 0, 0, 0, 0] if filter_zero_variance else [1] * 6
  np.testing.assert_array_equal(np.asarray(kept)[:, 0], want)
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept)[:, :1] * np.ones((1, 3)))


@pytest.mark.parametrize('filter_zero_variance', [False, True])
def test_a_step_with_every_group_filtered_out_changes_nothing(char_checkpoint, tmp_path,
                                                              filter_zero_variance):
  """`math` scores every answer of the random model 0, so each group is flat.
  Without the filter the entropy bonus still moves the policy; with it no
  token is left: the loss and the gradient are 0 (not NaN), and the run goes on."""
  config = _config(char_checkpoint, total_steps=2, **{
      'rl.filter_zero_variance': filter_zero_variance, 'rl.entropy_coef': 0.01,
      'rewards': {'math': {'weight': 1.0}}})
  online.run(config, tmp_path, 'grpo')
  records = _records(tmp_path)
  assert len(records) == 2
  for record in records:
    assert record['groups/zero_variance_fraction'] == 1.0
    if filter_zero_variance:
      assert record['loss'] == 0.0 and record['grad_norm'] == 0.0, record
    else:
      assert record['grad_norm'] > 0.0, record


def test_epochs_and_minibatches_keep_the_schedule_in_rollout_steps(char_checkpoint, digit_share,
                                                                   tmp_path, capsys):
  """2 epochs over 2 minibatches: 4 optimiser updates a step. The linear
  decay over 2 steps gives every update of step 1 the full rate and every
  update of step 2 half of it (counted in updates it had reached 0 by the
  middle of step 1). The update's predicted memory is for minibatches whose
  rows carry their own prompts."""
  config = _config(char_checkpoint, total_steps=2, prompts_per_step=4, **{
      'rl.epochs': 2, 'rl.minibatches': 2, 'optim.lr': 1e-3, 'optim.schedule': 'linear',
      'optim.end_lr_ratio': 0.0, 'rewards': {digit_share: {'weight': 1.0}}})
  online.run(config, tmp_path, 'grpo')
  records = _records(tmp_path)
  assert [r['lr'] for r in records] == pytest.approx([1e-3, 5e-4])
  assert all(np.isfinite(r['loss']) for r in records)
  rows = config.prompts_per_step * config.sampling.num_samples
  model_config = hf.load(char_checkpoint, **hf.compute_options(config)).config
  update = memory.rl_update_activations(model_config, rows / 2 / 8, 1, 80, 16)
  assert (f'policy update activations up to {sum(update.values()) / 2**20:.1f} MB per device'
          in capsys.readouterr().err)


def test_ppo_token_rewards_put_the_score_on_the_last_token():
  rl = ppo.get_config().rl
  weights = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], np.float32)
  old = np.array([[0, -1, -1, -1, 0], [0, 0, -2, 0, 0]], np.float32)
  ref = np.array([[0, -1.5, -1, -0.5, 0], [0, 0, -1, 0, 0]], np.float32)
  with rl.unlocked():
    rl.beta, rl.gamma, rl.lam, rl.whiten_advantages = 0.1, 1.0, 1.0, False
  values = np.zeros_like(weights)
  out = rl_parts.ppo_advantages(np.array([1.0, 0.0]), values, old, ref, weights, rl=rl)
  # Row 0: k1 = old - ref = (0.5, 0, -0.5), token rewards -0.1 * k1 + (0, 0, 1)
  # = (-0.05, 0, 1.05); with gamma = lam = 1 and zero values the advantage is
  # the reward-to-go.
  np.testing.assert_allclose(out['advantages'][0], [0, 1.0, 1.05, 1.05, 0], atol=1e-6)
  np.testing.assert_allclose(out['advantages'][1], [0, 0, 0.1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(out['returns'], out['advantages'], atol=1e-6)


def _config(checkpoint, recipe=grpo, **changes):
  c = recipe.get_config('tiny')
  with c.unlocked():
    c.model.path = str(checkpoint)
    c.data.max_prompt_len = 80
    c.sampling.max_new_tokens = 16
    c.sampling.temperature = 1.0
    c.optim.warmup_steps = 0
    c.transfer_guard = 'disallow'  # an implicit host<->device transfer in a step fails
    overrides.apply(c, changes)
  return c


def _records(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_grpo_learns_a_toy_verifiable_task(char_checkpoint, digit_share, tmp_path, one_device):
  config = _config(char_checkpoint, total_steps=30, prompts_per_step=4, **{
      'optim.lr': 3e-3, 'rl.beta': 0.0, 'rewards': {digit_share: {'weight': 1.0}},
      'checkpoint.every': 30})
  online.run(config, tmp_path, 'grpo')
  records = _records(tmp_path)
  curve = [r['reward/total/mean'] for r in records]
  assert len(curve) == 30
  start, end = np.mean(curve[:5]), np.mean(curve[-5:])
  assert end > start + 0.2, curve  # measured: 0.12 -> 0.79


def test_ppo_with_kl_in_the_reward_learns(char_checkpoint, digit_share, tmp_path, capsys,
                                          one_device):
  config = _config(char_checkpoint, ppo, total_steps=30, prompts_per_step=4, **{
      'optim.lr': 3e-3, 'ppo.critic_optim.lr': 3e-3, 'rl.beta': 0.01,
      'rewards': {digit_share: {'weight': 1.0}}, 'checkpoint.every': 30})
  online.run(config, tmp_path, 'ppo')
  records = _records(tmp_path)
  # The critic's state is reported with the policy's before the first step:
  # the trunk's parameters and a scalar head (`score.weight` [1, 64], no bias,
  # as transformers' sequence classifiers).
  critic = hf.load(char_checkpoint).config.num_params() + 64
  err = capsys.readouterr().err
  assert f'critic: trainable parameters {critic:,};' in err
  # The critic update's activations are predicted too: the policy's layout
  # through its trunk, no LM head; 4 prompts on this test's one device
  # (test_epochs_and_minibatches_... divides the policy's over 8).
  model_config = hf.load(char_checkpoint, **hf.compute_options(config)).config
  update = memory.rl_update_activations(model_config, 4 / 1, config.sampling.num_samples,
                                        config.data.max_prompt_len,
                                        config.sampling.max_new_tokens)
  critic_mb = (sum(update.values()) - update['lm_head']) / 2**20
  assert f'critic update activations up to {critic_mb:.1f} MB per device' in err
  assert 'LM head 0.0)' in err
  # Full fine-tuning holds a copy of the starting weights as the reference.
  assert records[0]['memory/reference_params'] == hf.load(char_checkpoint).config.num_params()
  curve = [r['reward/total/mean'] for r in records]
  assert np.mean(curve[-5:]) > np.mean(curve[:5]) + 0.2, curve
  assert all(np.isfinite(r['critic/value_loss']) for r in records)
  assert (tmp_path / 'hf' / 'model.safetensors').exists()


def test_ppo_critic_from_a_reward_model_checkpoint(char_checkpoint, tmp_path, capsys, one_device):
  """ppo.critic_path: the critic is the reward model's trunk and head, not
  the policy's trunk with a fresh head. The reward model here is narrower
  than the policy (its parameter count tells the trunks apart) and has a zero
  head, so the first rollout's values are exactly 0: with a constant reward
  of 1, gamma = lam = 1 and no KL, every completion token's return is 1 and
  the first value loss is 0.5 * (0 - 1)^2 = 0.5. A fresh head gives other
  values."""
  from flax import nnx
  from jpost.models import reward as scalar_models
  from jpost.models.config import ModelConfig
  from jpost.models.decoder import Decoder
  from jpost.tokenizer import Tokenizer

  tokenizer = Tokenizer.from_dir(char_checkpoint)
  policy_cfg = hf.load(char_checkpoint).config
  trunk = ModelConfig(vocab_size=policy_cfg.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, tie_embeddings=True,
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  reward_model = scalar_models.ScalarModel(Decoder(trunk, rngs=nnx.Rngs(1)), rngs=nnx.Rngs(1),
                                           init_std=0.0)
  reward_dir = scalar_models.save(reward_model, tmp_path / 'reward_model', tokenizer=tokenizer)

  rewards.register('constant_one')(lambda prompt, completion, row: 1.0)
  try:
    config = _config(char_checkpoint, ppo, total_steps=2, prompts_per_step=2, **{
        'ppo.critic_path': str(reward_dir), 'rl.beta': 0.0, 'rl.gamma': 1.0, 'rl.lam': 1.0,
        'rewards': {'constant_one': {'weight': 1.0}}, 'checkpoint.every': 2})
    online.run(config, tmp_path / 'run', 'ppo')
  finally:
    rewards.unregister('constant_one')
  assert f'critic: trainable parameters {trunk.num_params() + 32:,};' in capsys.readouterr().err
  records = _records(tmp_path / 'run')
  assert len(records) == 2 and records[0]['reward/total/mean'] == 1.0
  assert abs(records[0]['critic/value_loss'] - 0.5) < 1e-6, records[0]['critic/value_loss']
  assert records[1]['critic/value_loss'] < 0.5  # the critic learnt toward the returns
  assert (tmp_path / 'run' / 'hf' / 'model.safetensors').exists()


def test_ppo_fresh_critic_head_starts_at_the_configured_scale(char_checkpoint, tmp_path,
                                                              one_device):
  """configs/ppo.py's fresh value head is zero (`ppo.critic_init_std` 0), so
  with a constant reward of 1, gamma = lam = 1 and no KL the first value loss
  is 0.5 * (0 - 1)^2 = 0.5 exactly; the reward models' random head
  (`critic_init_std` None) starts elsewhere."""
  rewards.register('constant_one')(lambda prompt, completion, row: 1.0)
  try:
    first_losses = {}
    for name, init_std in (('zero', 0.0), ('random', None)):
      config = _config(char_checkpoint, ppo, total_steps=1, prompts_per_step=2, **{
          'rl.beta': 0.0, 'rl.gamma': 1.0, 'rl.lam': 1.0, 'ppo.critic_init_std': init_std,
          'rewards': {'constant_one': {'weight': 1.0}}, 'export_hf': False})
      online.run(config, tmp_path / name, 'ppo')
      first_losses[name] = _records(tmp_path / name)[0]['critic/value_loss']
  finally:
    rewards.unregister('constant_one')
  assert abs(first_losses['zero'] - 0.5) < 1e-6, first_losses
  assert abs(first_losses['random'] - 0.5) > 0.1, first_losses  # measured: 1.107


def _failing_judge():
  """Replies alternate: a reply that is not JSON, then HTTP 500."""
  count = [0]

  def reply(body):
    count[0] += 1
    return (200, 'Great answer! 7/7') if count[0] % 2 else (500, '{"error": "overloaded"}')
  return reply


def test_faulty_rewards_are_counted_and_the_run_goes_on(char_checkpoint, tmp_path, chat_server,
                                                        one_device):
  endpoint = chat_server(_failing_judge())

  @rewards.register('raises')
  def raises(prompt, completion, row):
    raise RuntimeError('user bug')

  @rewards.register('hangs')
  def hangs(prompt, completion, row):
    import time
    time.sleep(30)
    return 1.0

  @rewards.register('nan')
  def nan(prompt, completion, row):
    return float('nan')

  held_out = tmp_path / 'held_out.jsonl'  # two prompts, evaluated before and after
  held_out.write_text(''.join(json.dumps({'prompt': f'What is {a} + 2?', 'answer': str(a + 2)})
                              + '\n' for a in (3, 4)))
  try:
    config = _config(char_checkpoint, total_steps=2, eval_every=2, **{
        'data.eval': (str(held_out),), 'rewards': {
            'math': {'weight': 1.0}, 'raises': {}, 'hangs': {'timeout': 0.3},
            'nan': {}, 'rubric': {'rubric': 'amazon_summary', 'judge': {
                'endpoint': endpoint, 'model': 'judge', 'retries': 1, 'retry_delay': 0.0}}}})
    online.run(config, tmp_path, 'grpo')
  finally:
    for name in ('raises', 'hangs', 'nan'):
      rewards.unregister(name)
  records = _records(tmp_path)
  assert [r['step'] for r in records if 'loss' in r] == [1, 2]
  rows = 2 * 4  # prompts_per_step x num_samples
  last = [r for r in records if 'loss' in r][-1]
  for name in ('raises', 'hangs', 'nan', 'rubric'):
    assert last[f'failures_total/{name}'] == 2 * rows, name
  assert last['failures_total/math'] == 0
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  assert (tmp_path / 'hf').exists()
  # The held-out evaluations count theirs too: 4 failing sources x 2 prompts.
  evals = [r for r in records if 'eval/reward' in r]
  assert [r['eval/reward_failures'] for r in evals] == [4 * 2] * 2, evals


def test_truncation_rate_and_length_are_the_rollouts(char_checkpoint, digit_share, tmp_path,
                                                     one_device):
  """The reported truncation rate and mean length are those of the rows the
  rewards scored. Two rewards recount them from each completion's text: the
  character tokenizer decodes every token to its own string (specials whole),
  and the stop token is cut off, so a row ran out of tokens exactly when its
  text holds max_new_tokens tokens."""
  new_tokens = 16
  token = re.compile(r'<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<unk>|[\s\S]')
  count = lambda text: len(token.findall(text))

  @rewards.register('ran_out')
  def ran_out(prompt, completion, row):
    return float(count(completion) == new_tokens)

  @rewards.register('tokens_with_stop')
  def tokens_with_stop(prompt, completion, row):
    return float(count(completion) + (count(completion) < new_tokens))

  try:
    config = _config(char_checkpoint, total_steps=3, **{
        'sampling.max_new_tokens': new_tokens, 'optim.lr': 3e-3, 'rewards': {
            digit_share: {'weight': 1.0}, 'ran_out': {'weight': 0.0},
            'tokens_with_stop': {'weight': 0.0}}})
    online.run(config, tmp_path, 'grpo')
  finally:
    rewards.unregister('ran_out')
    rewards.unregister('tokens_with_stop')
  rates = []
  for record in _records(tmp_path):
    assert record['completion/truncated'] == pytest.approx(record['reward/ran_out/mean'])
    assert record['completion/length'] == pytest.approx(record['reward/tokens_with_stop/mean'])
    rates.append(record['completion/truncated'])
  assert 0 < max(rates) and min(rates) < 1, rates  # both kinds of row were counted


def test_resume_continues_exactly(char_checkpoint, digit_share, tmp_path):
  """Rewards, losses and the shapes each step ran at (prompt and completion
  widths cut in buckets, widths and packed rows reused one bucket up when
  compiled already: the checkpoint keeps which were) equal the
  uninterrupted run's."""
  rewards_cfg = {'rewards': {digit_share: {'weight': 1.0}}, 'optim.lr': 1e-3,
                 'checkpoint.every': 2, 'data.prompt_bucket': 8, 'data.completion_bucket': 4}
  online.run(_config(char_checkpoint, total_steps=6, **rewards_cfg), tmp_path / 'a', 'grpo')
  online.run(_config(char_checkpoint, total_steps=2, **rewards_cfg), tmp_path / 'b', 'grpo')
  online.run(_config(char_checkpoint, total_steps=6, **rewards_cfg), tmp_path / 'b', 'grpo')
  a, b = _records(tmp_path / 'a'), _records(tmp_path / 'b')
  assert [r['step'] for r in b] == [1, 2, 3, 4, 5, 6]
  shapes = ('shape/prompt_width', 'shape/completion_width', 'shape/update_rows')
  for ra, rb in zip(a, b):
    assert ra['reward/total/mean'] == rb['reward/total/mean']
    assert ra['loss'] == pytest.approx(rb['loss'], rel=1e-5, abs=1e-7)
    assert [ra[k] for k in shapes] == [rb[k] for k in shapes]


def test_resume_from_a_checkpoint_without_compiled_shapes(char_checkpoint, digit_share,
                                                          tmp_path, one_device):
  """A checkpoint written before the compiled shapes were kept holds only the
  prompt iterator's position: the run resumes from it with the same prompts
  (rewards equal the uninterrupted run's); its shape record starts anew."""
  rewards_cfg = {'rewards': {digit_share: {'weight': 1.0}}, 'checkpoint.every': 2,
                 'checkpoint.async_save': False}
  online.run(_config(char_checkpoint, total_steps=3, **rewards_cfg), tmp_path / 'a', 'grpo')
  online.run(_config(char_checkpoint, total_steps=2, **rewards_cfg), tmp_path / 'b', 'grpo')
  saved = tmp_path / 'b' / 'checkpoints' / '2' / 'data' / 'metadata'  # Orbax's JsonSave
  data = json.loads(saved.read_text())
  assert all('compiled' in process for process in data['processes']), data
  data['processes'] = [process['prompts'] for process in data['processes']]  # the old format
  saved.write_text(json.dumps(data))
  online.run(_config(char_checkpoint, total_steps=3, **rewards_cfg), tmp_path / 'b', 'grpo')
  a, b = _records(tmp_path / 'a'), _records(tmp_path / 'b')
  assert [r['step'] for r in b] == [1, 2, 3]
  assert a[2]['reward/total/mean'] == b[2]['reward/total/mean']
  # One width bucket holds every prompt here, so step 3 compiles the same shapes anew.
  shapes = ('shape/prompt_width', 'shape/completion_width', 'shape/update_rows')
  assert [a[2][k] for k in shapes] == [b[2][k] for k in shapes]


def test_filtered_sampling_recomputes_old_logprobs_and_logs_the_gap(char_checkpoint, digit_share,
                                                                    tmp_path, capsys):
  """With top-k the sampler draws from a renormalised distribution the trainer
  does not compute: 'recompute' starts every ratio at 1, and the sampler's gap
  (the log of the kept mass, averaged) is reported each step. (And the
  rollout's memory is printed before it runs.)"""
  config = _config(char_checkpoint, total_steps=2, **{
      'sampling.top_k': 3, 'rl.old_logprobs': 'recompute',
      'rewards': {digit_share: {'weight': 1.0}}})
  online.run(config, tmp_path, 'grpo')
  prompts, rows = config.prompts_per_step, config.prompts_per_step * config.sampling.num_samples
  cache = sampling.rollout_cache_bytes(hf.load(char_checkpoint).config, prompts, 80,
                                       config.sampling.num_samples, 16)  # test_sampling.py
  reference = _records(tmp_path)[0]['memory/reference_params'] * 4  # float32 weights
  err = capsys.readouterr().err
  assert (f'rollout KV cache up to {cache / 2**20:.1f} MB ({prompts} prompts x 80 slots, '
          f'shared by {rows} rows x 16 slots); reference copy {reference / 2**20:.1f} MB') in err
  # The update's activations, predicted for the longest prompts and
  # completions, per device: the mesh puts the batch over all 8 devices.
  model_config = hf.load(char_checkpoint, **hf.compute_options(config)).config
  update = memory.rl_update_activations(model_config, config.prompts_per_step / 8,
                                        config.sampling.num_samples, 80, 16)
  assert (f'policy update activations up to {sum(update.values()) / 2**20:.1f} MB per device, '
          f"predicted (saved {update['saved_activations'] / 2**20:.1f}, ") in err
  records = _records(tmp_path)
  assert len(records) == 2
  for record in records:
    assert record['logprob_mismatch'] < 1e-5, record  # old = the trainer's own, ratio 1
    # The char model spreads its mass thin: 3 tokens keep e^-2.7 of it (measured).
    assert record['logprob_mismatch/sampler_vs_trainer'] > 0.1, record
    assert 0.0 <= record['completion/truncated'] <= 1.0


@pytest.mark.parametrize('change, message', [
    ({'rl.minibatches': 3}, 'must divide the rollout rows'),
    ({'rl.aggregation': 'mean'}, 'aggregation'),
    ({'rl.kl_in': 'both'}, 'kl_in'),
    ({'rl.scale': 'mad'}, r"config.rl.scale='mad'; use one of"),
    ({'rl.clip_low': 1.0}, r'config.rl.clip_low=1.0, clip_high=0.28: the ratio is clipped'),
    ({'rl.kl_in': 'reward', 'rl.kl_estimator': 'k3'},
     r"kl_in='reward' puts k1 .*kl_estimator='k3' would be ignored"),
    ({'sampling.temperature': 0.0}, 'temperature must be > 0'),
    ({'sampling.num_samples': 1}, 'num_samples >= 2'),
    ({'rewards': {'nope': {}}}, 'nope'),
    ({'sampling.top_p': 0.9}, r"top_p=0.9 samples a filtered .* --config.rl.old_logprobs=recompute"),
    ({'sampling.top_k': 5, 'sampling.min_p': 0.1}, r'top_k=5 and min_p=0.1 samples'),
])
def test_bad_config_is_a_clear_error(char_checkpoint, tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    online.run(_config(char_checkpoint, **change), tmp_path, 'grpo')


def test_a_bad_critic_optimiser_is_named_as_such(char_checkpoint, tmp_path):
  config = _config(char_checkpoint, ppo, **{'ppo.critic_optim.lr': -1.0})
  with pytest.raises(ValueError, match=r'config\.ppo\.critic_optim\.lr=-1\.0: the learning '
                                       r'rate must be positive'):
    online.run(config, tmp_path, 'ppo')
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_shipped_grpo_config_runs_on_smollm2(shallow_smollm2, tmp_path):
  """configs/grpo.py as `make demo` runs it, cut to one short step, on
  SmolLM2's first 6 layers (every layer is compiled on its own, so the whole
  model would cost five times the compilation; `make demo` runs it). The
  config's own model is the embedded SmolLM2, which the fixture resolved."""
  import subprocess
  from jpost.models import pretrained
  assert grpo.get_config().model.path in pretrained.EMBEDDED
  proc = subprocess.run(
      [sys.executable, '-m', 'jpost.main', '--config=configs/grpo.py', f'--workdir={tmp_path}',
       f'--config.model.path={shallow_smollm2}',
       '--config.total_steps=1', '--config.eval_every=0', '--config.prompts_per_step=1',
       '--config.sampling.max_new_tokens=8', '--config.export_hf=False'],
      capture_output=True, text=True, timeout=900,
      env=xla_env.env(1))
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = _records(tmp_path)[0]
  assert record['step'] == 1 and np.isfinite(record['loss'])
  assert record['completion/length'] <= 8 and 'reward/math/mean' in record
