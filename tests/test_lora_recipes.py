"""Recipes with LoRA: SFT learns, resumes and exports (merged + PEFT adapter),
GRPO learns the toy task holding no reference copy, the reward model trains
its head and exports for peft, PPO's critic gets adapters or trains in full.
(DPO with LoRA: test_preference_recipes.py.)"""

import json
import math
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers

from jpost import trainers
from jpost.models import lora
from jpost.trainers import online
import overrides

sys.path.insert(0, 'configs')
from test_preference_recipes import _pairs_file  # noqa: E402

import grpo as grpo_config  # noqa: E402
import ppo as ppo_config  # noqa: E402
import reward as reward_config  # noqa: E402
import sft as sft_config  # noqa: E402


def _config(recipe, checkpoint, **changes):
  c = recipe.get_config('tiny')
  with c.unlocked():
    c.model.path = str(checkpoint)
    c.lora.rank, c.lora.alpha = 8, 16.0
    c.transfer_guard = 'disallow'
    overrides.apply(c, changes)
  return c


def _records(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_sft_with_lora_learns_resumes_and_exports_merged_and_peft(tiny_checkpoint, tmp_path,
                                                                  capsys):
  def run(steps):
    # A float32 base, so that peft's base (the float32 files) is the one
    # trained against (bfloat16 differs by its rounding).
    config = _config(sft_config, tiny_checkpoint, total_steps=steps, eval_every=4, batch_size=8,
                     **{'optim.lr': 1e-2, 'data.max_len': 96, 'lora.base_dtype': 'float32'})
    trainers.get('sft')(config, str(tmp_path))
  run(4)
  # A checkpoint holds the adapters and their moments, not the frozen base.
  saved = ocp.StandardCheckpointer().metadata(tmp_path / 'checkpoints' / '4' / 'state')
  arrays = {jax.tree_util.keystr(path): leaf for path, leaf
            in jax.tree_util.tree_leaves_with_path(saved.item_metadata)}
  weights = [path for path in arrays if "['value']" in path]
  assert weights and all('_lora_' in path for path in weights), sorted(arrays)
  values = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays.values())
  base = (tiny_checkpoint / 'model.safetensors').stat().st_size
  assert values < 0.02 * base, (values, base)  # 0.2 MB of 12.9 MB
  # On disk Orbax adds 1.1-1.3 MB for these 46 small arrays on 8 devices.
  on_disk = sum(f.stat().st_size for f in (tmp_path / 'checkpoints' / '4').rglob('*')
                if f.is_file())
  assert on_disk < 0.25 * base, (on_disk, base)
  run(8)
  assert 'resumed from step 4' in capsys.readouterr().err
  evals = [r['eval_loss'] for r in _records(tmp_path) if 'eval_loss' in r]
  assert len(evals) == 3 and evals[-1] < evals[0] - 0.05, evals
  # The merged export is a plain checkpoint; the adapter loads in peft on the
  # base and gives the same logits.
  tokens = torch.tensor(np.random.RandomState(0).randint(0, 1000, (1, 16)))
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
  adapted = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  with torch.no_grad():
    a, b = merged(tokens).logits.numpy(), adapted(tokens).logits.numpy()
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
  # The adapter names its base as a folder peft can load it from.
  settings = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert settings['base_model_name_or_path'] == str(tiny_checkpoint.resolve())
  with torch.no_grad(), adapted.disable_adapter():
    assert np.abs(adapted(tokens).logits.numpy() - b).max() > 1e-3


def _online_config(recipe, checkpoint, reward, **changes):
  return _config(recipe, checkpoint, **{
      'data.max_prompt_len': 80, 'sampling.max_new_tokens': 16, 'sampling.temperature': 1.0,
      'optim.warmup_steps': 0, 'rewards': {reward: {'weight': 1.0}}} | changes)


@pytest.fixture(scope='module')
def char_checkpoint_real_logits(char_checkpoint, tmp_path_factory):
  """The char model with its (tied) embeddings x 10. Initialised at std 0.02,
  they bound a random model's logits to about +-1.3 whatever its hidden
  state; full fine-tuning grows them, LoRA freezes them and could not make
  any token likely. Real models' logits span tens of units."""
  import shutil

  from safetensors.numpy import load_file, save_file
  path = tmp_path_factory.mktemp('char_real_logits')
  shutil.copytree(char_checkpoint, path, dirs_exist_ok=True)
  tensors = load_file(char_checkpoint / 'model.safetensors')
  tensors['model.embed_tokens.weight'] = tensors['model.embed_tokens.weight'] * 10
  save_file(tensors, path / 'model.safetensors', metadata={'format': 'pt'})
  return path


def test_grpo_with_lora_learns_with_the_base_as_reference(char_checkpoint_real_logits,
                                                          digit_share, tmp_path, one_device):
  config = _online_config(grpo_config, char_checkpoint_real_logits, digit_share,
                          total_steps=20, prompts_per_step=4,
                          **{'optim.lr': 3e-2, 'rl.beta': 0.01, 'lora.rank': 16,
                             'lora.alpha': 32.0, 'checkpoint.every': 20})
  online.run(config, tmp_path, 'grpo')
  records = _records(tmp_path)
  curve = [r['reward/total/mean'] for r in records]
  # Measured (30 steps): 0.26 -> 1.00 over the first and last 5 steps.
  assert np.mean(curve[-5:]) > np.mean(curve[:5]) + 0.3, curve
  assert all(r['memory/reference_params'] == 0 for r in records)
  assert records[-1]['kl'] > 0  # the adapters-off reference is not the policy
  # Each rollout samples from the adapters as updated (folded into the
  # kernels afresh): the sampler's log-probs equal the trainer's at every step
  # (measured: at most 4.6e-7, while the logged KL to the base reached 44).
  assert max(r['logprob_mismatch/sampler_vs_trainer'] for r in records) < 1e-4


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
  folder = tmp_path_factory.mktemp('lora_pairs')
  return {'data.train': (str(_pairs_file(folder / 'train.jsonl', n=16)),),
          'data.eval': (str(_pairs_file(folder / 'test.jsonl', n=8)),)}


def test_reward_model_with_lora_and_dropout_trains_its_head_and_exports_for_peft(
    tiny_checkpoint, pairs, tmp_path):
  from flax import nnx

  from jpost.models import reward as reward_model
  config = _config(reward_config, tiny_checkpoint, total_steps=2, batch_size=8,
                   eval_batch_size=8, **pairs, **{'lora.dropout': 0.1,
                                                  'lora.base_dtype': 'float32'})
  result = trainers.get('reward')(config, str(tmp_path))
  trainable, _ = lora.trainable(result['state']['params'])
  names = {'.'.join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
  assert 'score' in names and all('lora' in n or n == 'score' for n in names)
  start = reward_model.load(tiny_checkpoint, seed=config.seed)
  trained = reward_model.load(tmp_path / 'hf')
  assert np.abs(np.asarray(trained.score[...]) - np.asarray(start.score[...])).max() > 0
  # The adapter (SEQ_CLS, its head in modules_to_save) loads in peft on the
  # base and scores as the merged export does; and back into jpost.
  tokens = np.random.RandomState(0).randint(3, 1000, (1, 12))
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / 'hf')
  base = transformers.AutoModelForSequenceClassification.from_pretrained(
      tiny_checkpoint, num_labels=1, pad_token_id=0)
  adapted = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  with torch.no_grad():
    want = merged.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(adapted(torch.tensor(tokens)).logits.numpy(), want, atol=1e-4)
  back = reward_model.load(tiny_checkpoint, lora=lora.read_peft_config(
      tmp_path / 'adapter', base_dtype='float32'), lora_adapter=tmp_path / 'adapter')
  values = back(tokens, np.arange(12)[None], np.ones_like(tokens))
  np.testing.assert_allclose(np.asarray(values)[0, -1], want[0, 0], atol=1e-4)


def test_ppo_critic_gets_its_own_adapters_or_trains_in_full(char_checkpoint, digit_share):
  """The critic's update and values run the code a full critic runs
  (test_online.py's PPO test); what LoRA changes is which parts train."""
  from flax import nnx
  for critic_lora, want_lora in ((True, True), (False, False)):
    config = _online_config(ppo_config, char_checkpoint, digit_share,
                            **{'ppo.critic_lora': critic_lora})
    trainable, _ = lora.trainable(nnx.state(online._critic(config, char_checkpoint, None)))
    names = {'.'.join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert ('decoder.layers.q_lora_a' in names) == want_lora and 'score' in names
    assert want_lora == (len(names) == 2 * len(lora.KERNELS) + 1)
