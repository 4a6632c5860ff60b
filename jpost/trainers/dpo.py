"""The `dpo` recipe: DPO, IPO, conservative DPO and SimPO on preference pairs.

The losses need, per pair, the summed log-probs of each response's target
tokens under the policy and under the frozen reference (the starting
checkpoint). `config.dpo.reference` picks how the reference's are made:

- 'cache': one pass over train + eval data before training, stored in
  `workdir/reference_logps.npz` keyed by the pair's tokens (a resumed run
  reuses it); a pair missing from the cache is an error, never a zero.
- 'on_the_fly': the reference runs on every batch (no pass up front; costs a
  forward per step).
SimPO needs no reference at all.

After training, the KL of the trained policy from the reference is measured
where it is defined, on the policy's own samples: answers to the held-out
prompts at temperature 1, KL ~ mean of sum_t log pi(y_t) - log ref(y_t) (the
k1 estimator, unbiased for KL(pi || ref)); written to `workdir/kl.json`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpost import memory, ops, sampling, sharding
from jpost.data import pipeline, rows as row_lib
from jpost.errors import ConfigError
from jpost.losses import dpo as dpo_losses
from jpost.losses.dpo import dpo_loss
from jpost.models import hf, lora, pretrained
from jpost.models.reward import as_messages
from jpost.tokenizer import Tokenizer
from jpost.trainers import loop, offline, register, rl_parts
from jpost.trainers.reward import epochs_to_steps, normalizer_fn, pair_weights, preference_data

REFERENCE_MODES = ('cache', 'on_the_fly')
CACHE_FILE = 'reference_logps.npz'
EVAL_METRICS = ('rewards/accuracy', 'rewards/margin', 'rewards/chosen', 'rewards/rejected',
                'logps/chosen', 'logps/rejected')


def response_logps(model, batch):
  """Summed target log-probs and target counts of both sides: 4 arrays [B]."""
  both = {k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']])
          for k in ('tokens', 'positions', 'segment_ids', 'loss_mask')}
  hidden, _ = model.hidden_states(both['tokens'], both['positions'], both['segment_ids'])
  targets, weights = ops.next_token_targets(both['tokens'], both['loss_mask'],
                                            both['segment_ids'])
  # The head runs on the response tokens alone (28% of GSM8K pairs' slots).
  logprobs = model.target_logprobs(hidden[:, :-1], targets, mask=weights > 0)
  sums = jnp.sum(logprobs * weights, axis=-1)
  counts = jnp.sum(weights, axis=-1)
  n = batch['chosen_tokens'].shape[0]
  return sums[:n], sums[n:], counts[:n], counts[n:]


def activations(model_config, rows, seq_len) -> dict:
  """A step's activations: both sides of `rows` pairs in one forward (response_logps)."""
  return memory.step_activations(model_config, 2 * rows, seq_len)


def loss_fn(model, batch, normalizer, *, loss_cfg):
  chosen, rejected, chosen_len, rejected_len = response_logps(model, batch)
  simpo = loss_cfg.loss_type == 'simpo'
  ref_chosen, ref_rejected = batch.get('ref_chosen_logps'), batch.get('ref_rejected_logps')
  if not simpo and ref_chosen is None:  # LoRA, on the fly: the policy with adapters off
    ref_chosen, ref_rejected, _, _ = jax.lax.stop_gradient(
        response_logps(lora.without_adapters(model), batch))
  return dpo_loss(
      chosen, rejected, None if simpo else ref_chosen,
      None if simpo else ref_rejected, loss_type=loss_cfg.loss_type,
      beta=loss_cfg.beta, label_smoothing=loss_cfg.label_smoothing,
      chosen_lengths=chosen_len, rejected_lengths=rejected_len,
      simpo_gamma=loss_cfg.simpo_gamma, normalizer=normalizer, weights=pair_weights(batch))


def pair_key(chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> str:
  digest = hashlib.sha1(np.ascontiguousarray(chosen_tokens, np.int32).tobytes())
  digest.update(b'|')
  digest.update(np.ascontiguousarray(rejected_tokens, np.int32).tobytes())
  return digest.hexdigest()


class Reference:
  """The frozen starting model: summed response log-probs per pair."""

  def __init__(self, setup: offline.Setup):
    cfg = setup.config
    # With LoRA the policy before its first step (B = 0) is the base: no copy.
    model = setup.model if setup.model.config.lora else hf.load(
        setup.model_dir, mesh=setup.mesh, dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype)
    graphdef, self.params = nnx.split(model)
    self.mesh = setup.mesh

    @jax.jit
    def logps(params, batch):
      with sharding.activation_rules(setup.mesh):
        chosen, rejected, _, _ = response_logps(nnx.merge(graphdef, params), batch)
      return chosen, rejected
    self._logps = logps

  def __call__(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    fields = {k: v for k, v in batch.items() if k.startswith(('chosen_', 'rejected_'))}
    n = len(fields['chosen_tokens'])
    shards = loop.batch_devices(self.mesh)
    # The last batch of a pass may not split over the mesh: pad every
    # process's rows so that all of them together do.
    pad = -n % (shards // math.gcd(shards, jax.process_count()))
    if pad:
      fields = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in fields.items()}
    chosen, rejected = self._logps(self.params, loop.place_batch(fields, self.mesh))
    return loop.local_rows(chosen)[:n], loop.local_rows(rejected)[:n]


def build_cache(setup: offline.Setup, reference: Reference, sources) -> dict[str, np.ndarray]:
  """One pass over every pair of `sources` -> {key: (chosen, rejected)} arrays."""
  cfg = setup.config
  data = cfg.data
  dataset, _ = pipeline.build(
      'preference', pipeline.resolve_sources(sources), setup.tokenizer,
      batch_size=cfg.dpo.cache_batch_size, max_len=data.max_len, truncation=data.truncation,
      seed=0, num_epochs=1, policy=data.policy, drop_remainder=False)
  keys, chosen, rejected = [], [], []
  for batch in dataset:
    c, r = reference(batch)
    keys += [pair_key(a, b) for a, b in zip(batch['chosen_tokens'], batch['rejected_tokens'])]
    chosen.append(c)
    rejected.append(r)
  return {'keys': np.asarray(keys), 'chosen': np.concatenate(chosen),
          'rejected': np.concatenate(rejected)}


def cached_reference(setup: offline.Setup, reference: Reference):
  path = setup.workdir / CACHE_FILE
  if path.exists():
    with np.load(path) as f:
      cache = {k: f[k] for k in f.files}
    print(f'reference log-probs: {len(cache["keys"])} pairs from {path}', file=sys.stderr)
  else:
    data = setup.config.data
    cache = build_cache(setup, reference, list(data.train) + list(data.eval))
    if jax.process_index() == 0:  # every process holds the whole cache; the workdir is shared
      path.parent.mkdir(parents=True, exist_ok=True)
      partial = path.with_name(path.name + '.partial')
      with open(partial, 'wb') as f:  # a file object: savez adds no suffix
        np.savez(f, **cache)
      os.replace(partial, path)  # a rerun never finds half a file
    print(f'reference log-probs: computed {len(cache["keys"])} pairs -> {path}', file=sys.stderr)
  index = {k: i for i, k in enumerate(cache['keys'].tolist())}
  return lookup_hook(index, cache, path)


def lookup_hook(index: dict, cache: dict, path: pathlib.Path):
  def hook(batch):
    rows = []
    for i, (c, r) in enumerate(zip(batch['chosen_tokens'], batch['rejected_tokens'])):
      if not batch['chosen_segment_ids'][i].any():  # an empty pair: no weight (pair_weights)
        rows.append(-1)
        continue
      row = index.get(pair_key(c, r))
      if row is None:
        raise ConfigError(
            f'batch row {i} has no reference log-probs in {path}: the cache was computed '
            'for other data or another data.max_len. Delete the file to recompute it, or '
            "set config.dpo.reference='on_the_fly'.")
      rows.append(row)
    rows = np.asarray(rows)
    take = lambda a: np.where(rows >= 0, a[np.maximum(rows, 0)], 0).astype(a.dtype)
    return batch | {'ref_chosen_logps': take(cache['chosen']),
                    'ref_rejected_logps': take(cache['rejected'])}
  return hook


def make_batch_hook(setup: offline.Setup):
  dpo = setup.config.dpo
  if dpo.loss_type == 'simpo':
    return lambda batch: batch
  if setup.model.config.lora and dpo.reference == 'on_the_fly':
    return lambda batch: batch  # loss_fn runs the policy with its adapters off
  reference = Reference(setup)
  if dpo.reference == 'cache':
    return cached_reference(setup, reference)

  def on_the_fly(batch):
    chosen, rejected = reference(batch)
    return batch | {'ref_chosen_logps': chosen, 'ref_rejected_logps': rejected}
  return on_the_fly


def sampled_kl(policy, reference, tokenizer, prompts, *, max_new_tokens: int,
               seed: int) -> dict[str, float]:
  """k1 estimate of KL(policy || reference) on the policy's samples (temperature 1)."""
  ids = [tokenizer.encode_chat(as_messages(p), add_generation_prompt=True).ids for p in prompts]
  tokens, mask = sampling.left_pad(ids, tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0,
                                     stop_ids=tuple(tokenizer.stop_ids))
  out = jax.device_get(sampling.generate(policy, tokens, mask, settings, jax.random.key(seed)))
  rows = rl_parts.training_rows({'tokens': tokens, 'segment_ids': mask}, out, 1)
  graphdef, params = nnx.split(reference)
  ref_lp = np.asarray(rl_parts.make_logprobs_fn(graphdef, 1.0)(params, rows))
  per_token = (np.asarray(out.logprobs) - ref_lp) * rows['completion_mask']
  per_sequence = per_token.sum(axis=1)
  return {'kl_per_sequence': float(per_sequence.mean()),
          'kl_per_token': float(per_token.sum() / rows['completion_mask'].sum()),
          'kl_sequence_stderr': float(per_sequence.std() / np.sqrt(len(per_sequence))),
          'samples': len(per_sequence)}


def report_kl(config, workdir: pathlib.Path, state) -> dict[str, float]:
  """The trained policy's KL from the starting model on held-out prompts."""
  model_dir = pretrained.resolve(config.model.path)
  kw = dict(dtype='float32', param_dtype='float32') | lora.load_options(config)
  reference = hf.load(model_dir, **kw)  # with LoRA: fresh adapters, B = 0, the base
  graphdef, _ = nnx.split(reference)
  params = loop.fetch(state['params'])  # a collective when the run spans processes
  if jax.process_index() != 0:
    return {}
  policy = nnx.merge(graphdef, params)
  examples = []
  for source in pipeline.resolve_sources(list(config.data.eval)):
    examples += pipeline.load_examples(source, 'preference', row_lib.RowFilter(policy='skip'))
  prompts = [e['prompt'] for e in examples[:config.dpo.kl_prompts]]
  report = sampled_kl(policy, reference, Tokenizer.from_dir(model_dir), prompts,
                      max_new_tokens=config.dpo.kl_max_new_tokens, seed=config.seed)
  (workdir / 'kl.json').write_text(json.dumps(report, indent=2) + '\n')
  print(f'KL(policy || reference) on {report["samples"]} sampled held-out answers: '
        f'{report["kl_per_sequence"]:.3f} nats per answer, {report["kl_per_token"]:.4f} per '
        'token', file=sys.stderr)
  return report


@register('dpo')
def run(config, workdir):
  if config.dpo.reference not in REFERENCE_MODES:
    raise ConfigError(f'config.dpo.reference={config.dpo.reference!r}; use one of '
                     f'{REFERENCE_MODES}.')
  if (config.dpo.reference == 'on_the_fly' and config.lora.adapter
      and config.dpo.loss_type != 'simpo'):
    # On the fly the reference is the policy with its adapters off: the base.
    # The starting policy here is base + the loaded adapter, which 'cache'
    # scores once before its first step.
    raise ConfigError(
        f"config.dpo.reference='on_the_fly' with config.lora.adapter={config.lora.adapter!r}: "
        'the reference would be the base without that adapter, not the policy DPO starts '
        "from; use --config.dpo.reference=cache.")
  try:  # before the reference pass and the first step, not when the loss is traced
    dpo_losses.check_options(config.dpo.loss_type, config.dpo.beta, config.dpo.label_smoothing)
  except ValueError as e:
    raise ConfigError(f'config.dpo: {e}') from None
  data = config.data
  with config.unlocked():
    config.total_steps = epochs_to_steps(config, list(data.train))
  task = offline.Task(
      loss_fn=functools.partial(loss_fn, loss_cfg=config.dpo),
      normalizer_fn=normalizer_fn,
      train_data=preference_data(data, sources=list(data.train), epochs=None,
                                 seed=config.seed, batch_size=config.batch_size),
      eval_data=preference_data(data, sources=list(data.eval), epochs=1, seed=0,
                                batch_size=config.eval_batch_size, pad_last=True)
      if data.eval else None,
      batch_hook=make_batch_hook,
      eval_metrics=EVAL_METRICS, activations=activations)
  result = offline.run(config, workdir, task)
  if data.eval and config.dpo.kl_prompts and result['step'] >= config.total_steps:
    result['kl'] = report_kl(config, pathlib.Path(workdir), result['state'])
  return result
