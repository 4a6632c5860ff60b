"""LoRA/QLoRA: parity with transformers + peft, PEFT files both ways, merged
export, quantisation error, the trainable split and the adapters-off reference."""

import json
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from jpost.errors import ConfigError
from jpost.models import hf, lora, quant

VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {'llama': transformers.LlamaConfig, 'qwen2': transformers.Qwen2Config}


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def adapted(request, tmp_path_factory):
  """(transformers+peft model with random A and B, base dir, adapter dir)."""
  config = FAMILIES[request.param](**_COMMON)
  config._attn_implementation = 'eager'
  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_config(config).eval()
  root = tmp_path_factory.mktemp(f'lora_{request.param}')
  base.save_pretrained(root / 'base')
  # Random B (not PEFT's zeros) so the adapters change the logits; rsLoRA on
  # for one family so both scalings are checked; attention + MLP targets.
  spec = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'o_proj',
                                                             'gate_proj', 'down_proj'],
                         init_lora_weights=False, use_rslora=request.param == 'qwen2',
                         task_type='CAUSAL_LM')
  model = peft.get_peft_model(base, spec).eval()
  model.save_pretrained(root / 'adapter')
  return model, root / 'base', root / 'adapter'


def _tokens(n=20, seed=1):
  tokens = np.random.RandomState(seed).randint(0, VOCAB, n)[None]
  return tokens, np.arange(n)[None], np.ones_like(tokens)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits[0].numpy()


def _load(base, adapter, **kw):
  cfg = lora.read_peft_config(adapter, base_dtype='float32', **kw)
  return hf.load(base, lora=cfg, lora_adapter=adapter)


def test_a_peft_adapter_gives_peft_logits(adapted):
  model, base, adapter = adapted
  tokens = _tokens()
  want = _torch_logits(model, tokens[0])
  with torch.no_grad(), model.disable_adapter():
    base_logits = _torch_logits(model, tokens[0])
  assert np.abs(want - base_logits).max() > 1e-2  # the adapters matter
  got = np.asarray(nnx.jit(lambda m, *a: m(*a))(_load(base, adapter), *tokens))[0]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_exported_adapter_loads_in_peft_and_merged_export_matches(adapted, tmp_path):
  model, base, adapter = adapted
  tokens = _tokens(seed=2)
  ours = _load(base, adapter)
  # Change the adapters so the export is not a copy of the files read.
  ours.layers.q_lora_b.set_value(ours.layers.q_lora_b[...] + 0.05)
  got = np.asarray(ours(*tokens))[0]
  lora.save_peft(ours, tmp_path / 'adapter')
  fresh = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / 'adapter').eval()
  np.testing.assert_allclose(_torch_logits(reloaded, tokens[0]), got, atol=1e-4, rtol=0)

  hf.save(ours, tmp_path / 'merged')
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  np.testing.assert_allclose(_torch_logits(merged, tokens[0]), got, atol=1e-4, rtol=0)
  assert not any('lora' in k for k in json.loads((tmp_path / 'merged' / 'config.json')
                                                 .read_text()))


def test_a_peft_adapter_missing_or_adding_a_tensor_is_an_error(adapted, tmp_path):
  """Every tensor the adapter's config promises must be in its file, and every
  tensor in the file used: a renamed or dropped tensor never loads as zeros."""
  from safetensors.numpy import load_file, save_file
  _, base, adapter = adapted
  tensors = load_file(adapter / 'adapter_model.safetensors')
  name = next(k for k in sorted(tensors) if 'layers.1.self_attn.v_proj.lora_A' in k)
  for case, changed, message in (
      ('missing', {k: v for k, v in tensors.items() if k != name}, f'missing {name}'),
      ('extra', tensors | {'base_model.model.lm_head.lora_A.weight': tensors[name]},
       r'tensors jpost would not use \(1\)')):
    folder = tmp_path / case
    shutil.copytree(adapter, folder)
    save_file(changed, folder / 'adapter_model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ConfigError, match=message):
      _load(base, folder)


def test_fresh_adapters_leave_the_base_unchanged(tiny_checkpoint):
  """B = 0 at initialisation: step 0 is the base model, and only the
  adapters are trainable."""
  tokens = _tokens(n=12)
  base = hf.load(tiny_checkpoint)
  model = hf.load(tiny_checkpoint, lora=lora.LoraConfig(rank=8, alpha=16, base_dtype='float32'))
  np.testing.assert_array_equal(np.asarray(model(*tokens)), np.asarray(base(*tokens)))
  trainable, frozen = lora.trainable(nnx.state(model))
  names = {'.'.join(map(str, path)) for path, _ in nnx.to_flat_state(trainable)}
  assert names == {f'layers.{k}_lora_{w}' for k in lora.KERNELS for w in 'ab'}
  count = sum(x.size for x in jax.tree.leaves(trainable))
  cfg = model.config
  per_layer = sum(8 * (d + f) for d, f in [
      (64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
  assert count == cfg.num_layers * per_layer
  assert sum(x.size for x in jax.tree.leaves(frozen)) == cfg.num_params()


def test_adapters_off_is_the_base(tiny_checkpoint):
  tokens = _tokens(n=12)
  base = hf.load(tiny_checkpoint)
  model = hf.load(tiny_checkpoint, lora=lora.LoraConfig(rank=4, alpha=8, base_dtype='float32'))
  model.layers.up_lora_b.set_value(jnp.ones_like(model.layers.up_lora_b[...]))
  assert np.abs(np.asarray(model(*tokens)) - np.asarray(base(*tokens))).max() > 1e-3
  graphdef, state = nnx.split(model)
  off = nnx.merge(graphdef, lora.adapters_off(state))
  np.testing.assert_array_equal(np.asarray(off(*tokens)), np.asarray(base(*tokens)))


@pytest.mark.parametrize('kind, bound', [('int8', 0.01), ('nf4', 0.1)])  # 0.006, 0.092
def test_quantisation_error_is_bounded(kind, bound):
  w = np.random.RandomState(0).standard_normal((2, 128, 96)).astype(np.float32) * 0.02
  codes, scales = quant.quantize(w, kind, 64)
  assert codes.shape == quant.stored_shape(kind, w.shape) and scales.shape == (2, 2, 96)
  back = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(scales), kind, jnp.float32))
  error = np.linalg.norm(back - w) / np.linalg.norm(w)
  assert error < bound, error
  # Every block's largest weight is exact (the scale is its absmax).
  blocks = w.reshape(2, 2, 64, 96)
  top = np.argmax(np.abs(blocks), axis=2)
  np.testing.assert_allclose(np.take_along_axis(back.reshape(blocks.shape), top[:, :, None], 2),
                             np.take_along_axis(blocks, top[:, :, None], 2), rtol=1e-6)


def test_nf4_levels_are_the_published_ones():
  assert quant.NF4_LEVELS.shape == (16,) and quant.NF4_LEVELS[7] == 0
  assert np.all(np.diff(quant.NF4_LEVELS) > 0)
  codes, scales = quant.quantize(quant.NF4_LEVELS.reshape(16, 1), 'nf4', 16)
  back = quant.dequantize(jnp.asarray(codes), jnp.asarray(scales), 'nf4', jnp.float32)
  np.testing.assert_array_equal(np.asarray(back)[:, 0], quant.NF4_LEVELS)


@pytest.mark.parametrize('kind', ['int8', 'nf4'])
def test_a_quantised_base_is_close_to_the_full_one(tiny_checkpoint, kind):
  tokens = _tokens(n=12)
  full = hf.load(tiny_checkpoint, lora=lora.LoraConfig(rank=4, alpha=8, base_dtype='float32'))
  q = hf.load(tiny_checkpoint, lora=lora.LoraConfig(rank=4, alpha=8, quantize=kind))
  assert q.layers.q[...].dtype == (jnp.int8 if kind == 'int8' else jnp.uint8)
  a, b = np.asarray(full(*tokens)), np.asarray(q(*tokens))
  error = np.linalg.norm(a - b) / np.linalg.norm(a)
  # Measured: int8 0.004, NF4 0.13 (weights alone: 0.006 and 0.09, the test
  # above); a random model's errors add up over its 14 quantised kernels.
  assert error < (0.01 if kind == 'int8' else 0.2), error
  # Sampling merges (and dequantises) once; the same logits as the layer path.
  _, layers = q, q.decode_layers()
  assert 'q_scale' not in layers[0] and layers[0]['qkv'].dtype == jnp.float32


@pytest.mark.parametrize('patterns, want', [
    (('all',), lora.KERNELS), (('all-linear',), lora.KERNELS),
    (('q_proj', 'v_proj'), ('q', 'v')), (('*_proj',), lora.KERNELS),
    (('gate', 'up', 'down'), ('gate', 'up', 'down'))])
def test_targets_by_name_pattern(patterns, want):
  assert lora.resolve_targets(patterns) == want


@pytest.mark.parametrize('change, message', [
    ({'rank': -1}, 'positive'), ({'targets': ('attn',)}, 'matches no kernel'),
    ({'dropout': 1.0}, 'dropout'), ({'quantize': 'fp8'}, 'quantize'),
    ({'rank': 0, 'quantize': 'nf4'}, 'needs adapters'),
    # Settings of adapters with LoRA off would be full fine-tuning, silently.
    ({'rank': 0, 'alpha': 32.0}, r'lora.alpha=32.0 but lora.rank=0, which is full fine-tuning'),
    ({'rank': 0, 'targets': ('q_proj',)}, r"lora.targets=\('q_proj',\) but lora.rank=0"),
    # An adapter brings its own rank, alpha and targets.
    ({'adapter': 'runs/x/peft'}, r'lora.rank=8: the adapter runs/x/peft sets its own rank')])
def test_bad_lora_config_is_a_clear_error(change, message):
  import ml_collections
  c = ml_collections.ConfigDict(lora.default_config().to_dict() | {'rank': 8} | change)
  with pytest.raises(ConfigError, match=message):
    lora.from_config(c)


def test_a_block_size_that_does_not_divide_is_a_clear_error(tiny_checkpoint):
  with pytest.raises(ConfigError, match='block_size'):
    hf.load(tiny_checkpoint, lora=lora.LoraConfig(rank=4, alpha=8, quantize='nf4',
                                                   block_size=48))


def test_adapters_shard_like_their_kernels(tiny_checkpoint):
  from jpost import sharding
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  model = hf.load(tiny_checkpoint, mesh=mesh, lora=lora.LoraConfig(rank=4, alpha=8))
  spec = lambda name: tuple(getattr(model.layers, name)[...].sharding.spec)
  assert spec('q') == (None, 'fsdp', 'tensor')
  assert spec('q_lora_a') == (None, 'fsdp', None) and spec('q_lora_b') == (None, None, 'tensor')
  ref = hf.load(tiny_checkpoint, lora=lora.LoraConfig(rank=4, alpha=8))
  tokens = _tokens(n=8)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *tokens)),
                             np.asarray(ref(*tokens)), atol=2e-5, rtol=0)


def test_lora_steps_on_an_fsdp_tensor_mesh_equal_one_device(tiny_checkpoint):
  """Adapters replicated along their rank, the NF4 base's codes and scales
  sharded by their kernel's rules: three AdamW steps give one device's
  losses and adapters."""
  from jpost import sharding
  from test_train import _batch, _one_step, _optim
  spec = lora.LoraConfig(rank=4, alpha=8, quantize='nf4')
  runs = {}
  for name, mesh in (('one', sharding.make_mesh(devices=jax.devices()[:1])),
                     ('many', sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2}))):
    runs[name] = _one_step(tiny_checkpoint, _batch(8, seed=1), accum_steps=1, mesh=mesh,
                           optim_config=_optim('adamw', 1e-2), steps=3, lora=spec)
  (one, loss_one), (many, loss_many) = runs['one'], runs['many']
  np.testing.assert_allclose(loss_many, loss_one, rtol=1e-5)
  assert loss_one[-1] < loss_one[0]
  adapters = lambda p: {k: np.asarray(v) for k, v in nnx.to_pure_dict(p)['layers'].items()
                        if '_lora_' in k}
  a, b = adapters(many), adapters(one)
  for name in a:  # (the base is frozen: equal by construction)
    assert np.linalg.norm(a[name] - b[name]) <= 1e-3 * np.linalg.norm(b[name]), name


def test_adapter_dropout_drops_inputs_at_its_rate_and_keeps_the_mean():
  import types
  cfg = types.SimpleNamespace(lora=lora.LoraConfig(rank=64, alpha=64, dropout=0.25))
  eye = jnp.eye(64)
  p = {'q_lora_a': eye, 'q_lora_b': eye, 'dropout_key': jax.random.key(0)}
  x = jnp.ones((8, 512, 64))
  delta = np.asarray(lora.adapter_input(x, p, 'q', cfg, jnp.matmul))  # = dropout(x): A = I, scale 1
  np.testing.assert_allclose(np.unique(delta), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(np.mean(delta == 0) - 0.25) < 0.01 and abs(delta.mean() - 1) < 0.02
  again = lora.adapter_input(x, p, 'q', cfg, jnp.matmul)
  np.testing.assert_array_equal(np.asarray(again), delta)  # one key, one mask
  no_key = lora.adapter_input(x, {k: v for k, v in p.items() if k != 'dropout_key'}, 'q', cfg,
                              jnp.matmul)
  np.testing.assert_array_equal(np.asarray(no_key), np.asarray(x))


def test_dropout_acts_only_inside_a_train_update_context(tiny_checkpoint):
  tokens = _tokens(n=12)
  model = hf.load(tiny_checkpoint, lora=lora.LoraConfig(rank=4, alpha=8, dropout=0.5,
                                                        base_dtype='float32'))
  model.layers.v_lora_b.set_value(jnp.ones_like(model.layers.v_lora_b[...]))
  forward = nnx.jit(lambda m, *a: m(*a))
  plain = np.asarray(forward(model, *tokens))
  with lora.dropout(jax.random.key(1)):
    dropped = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *tokens))
  assert np.abs(dropped - plain).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(forward(model, *tokens)), plain)


def _stacks_converted_to_float32(hlo: str, cfg) -> int:
  """How many float32 conversions of a whole [L, ...] base-kernel stack the
  compiled program makes."""
  from jpost.models.decoder import layer_param_shapes
  stacks = {','.join(map(str, (cfg.num_layers, *shape)))
            for name, (shape, _) in layer_param_shapes(cfg).items() if name in lora.KERNELS}
  found = re.findall(r'%[\w.\-]*convert[\w.\-]* = f32\[([\d,]+)\]', hlo)
  return sum(shape in stacks for shape in found)


def test_a_bfloat16_base_is_sliced_without_float32_copies(monkeypatch):
  """XLA:CPU slices a 16-bit float stack inside the scan over layers by
  converting the whole stack to float32 before the loop, on every call: a
  float32 copy of the bfloat16 base each step. The frozen base goes through
  the scan as its bits (decoder._loop_operands), so the compiled gradient
  converts no base stack, and a bitcast is exact: the loss and the adapters'
  gradients equal, to the bit, those without it (which does convert, showing
  the check finds such copies). Where loops do not go through float32 (a
  GPU) nothing changes."""
  from jpost.models import remat
  from jpost.models.config import ModelConfig
  from jpost.models.decoder import Decoder
  cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=3,
                    num_heads=4, num_kv_heads=2, dtype='bfloat16', remat='full',
                    lora=lora.LoraConfig(rank=4, alpha=8))
  graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  trainable, frozen = lora.trainable(state)
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B != 0: the adapters act
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 24)))
  positions = jnp.tile(jnp.arange(24), (2, 1))
  segments = jnp.ones((2, 24), jnp.int32)

  def loss(trainable, frozen):  # the base an argument, as in a train step (not a constant)
    logits = nnx.merge(graphdef, trainable, frozen)(tokens, positions, segments)
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  results = {}
  for bits in (True, False):
    if not bits:
      monkeypatch.setattr(lora, 'frozen_in_training', lambda cfg, name: False)
    grad = jax.jit(jax.value_and_grad(loss))
    hlo = grad.lower(trainable, frozen).compile().as_text()
    results[bits] = (_stacks_converted_to_float32(hlo, cfg), grad(trainable, frozen))
  if not remat.loops_go_through_float32(jnp.bfloat16):
    assert results[True][0] == results[False][0] == 0
  else:
    assert results[True][0] == 0 and results[False][0] >= len(lora.KERNELS)
  chex.assert_trees_all_equal(results[True][1], results[False][1])


@pytest.mark.parametrize('dtype, bound', [('float32', 1e-6), ('bfloat16', 1e-2)])
def test_base_and_adapter_as_one_matmul_equal_two(dtype, bound):
  """decoder._adapted_dense (one device: x @ w + low @ b as one matmul of
  [x, low] by [w; b], rounded once) equals the two `dense` matmuls summed in
  float32: output and the gradients of x, low, w and b."""
  from jpost.models import decoder
  from norms import assert_norm_close
  rng = np.random.default_rng(9)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(rng.normal(size=(2, 24, 40)), dt)
  low = jnp.asarray(rng.normal(size=(2, 24, 4)), dt)
  w = jnp.asarray(rng.normal(size=(40, 56)) / 6, jnp.float32)
  b = jnp.asarray(rng.normal(size=(4, 56)) / 2, jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, 24, 56)), jnp.float32)

  def two(x, low, w, b):  # in float32 throughout: the reference
    f32 = lambda a: a.astype(jnp.float32)
    return jnp.sum((decoder.dense(f32(x), w) + decoder.dense(f32(low), b)) * cot)

  def one(x, low, w, b):
    out = decoder._adapted_dense(x, low, w, b)
    assert out.dtype == dt
    return jnp.sum(out.astype(jnp.float32) * cot)

  value, grads = jax.value_and_grad(one, argnums=(0, 1, 2, 3))(x, low, w, b)
  want, want_grads = jax.value_and_grad(two, argnums=(0, 1, 2, 3))(x, low, w, b)
  assert_norm_close(value, want, bound=bound)
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, (x, low, w, b))
  for g, r in zip(grads, want_grads):
    assert_norm_close(g, r, bound=bound)
