"""HF checkpoints <-> jpost Decoder, through one explicit name table.

Loading is strict (PITFALLS: key mismatches that load silently): every tensor
the model expects must be in the files, every tensor in the files must be
used, and every shape must match. Export writes `config.json` and safetensors
(sharded with an index past `max_shard_bytes`) that transformers loads.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jpost.errors import MissingPathError
from jpost.models import lora as lora_lib
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder, layer_param_shapes

# jpost layer parameter -> (HF tensor name in layer {i}, stored transposed?).
# HF linear weights are [out, in]; jpost kernels are [in, out].
_LAYER_NAMES = {
    'attn_norm': ('model.layers.{i}.input_layernorm.weight', False),
    'q': ('model.layers.{i}.self_attn.q_proj.weight', True),
    'k': ('model.layers.{i}.self_attn.k_proj.weight', True),
    'v': ('model.layers.{i}.self_attn.v_proj.weight', True),
    'o': ('model.layers.{i}.self_attn.o_proj.weight', True),
    'q_bias': ('model.layers.{i}.self_attn.q_proj.bias', False),
    'k_bias': ('model.layers.{i}.self_attn.k_proj.bias', False),
    'v_bias': ('model.layers.{i}.self_attn.v_proj.bias', False),
    'o_bias': ('model.layers.{i}.self_attn.o_proj.bias', False),
    'q_norm': ('model.layers.{i}.self_attn.q_norm.weight', False),
    'k_norm': ('model.layers.{i}.self_attn.k_norm.weight', False),
    'mlp_norm': ('model.layers.{i}.post_attention_layernorm.weight', False),
    'gate': ('model.layers.{i}.mlp.gate_proj.weight', True),
    'up': ('model.layers.{i}.mlp.up_proj.weight', True),
    'down': ('model.layers.{i}.mlp.down_proj.weight', True),
}
_TOP_NAMES = {
    'embed': ('model.embed_tokens.weight', False),
    'final_norm': ('model.norm.weight', False),
    'lm_head': ('lm_head.weight', True),
}
_INDEX = 'model.safetensors.index.json'


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape, for every tensor a checkpoint of `cfg` holds."""
  d, v = cfg.hidden_size, cfg.vocab_size
  out = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = (v, d)
  for name, (shape, _) in layer_param_shapes(cfg).items():
    template, transposed = _LAYER_NAMES[name]
    for i in range(cfg.num_layers):
      out[template.format(i=i)] = shape[::-1] if transposed else shape
  return out


def checkpoint_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint dir (single file or sharded index)."""
  if not path.is_dir():
    raise MissingPathError(
        f'checkpoint directory {path} does not exist; pass a folder holding '
        'config.json and *.safetensors (e.g. from save_pretrained).')
  index = path / _INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())['weight_map']
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f'{index}: not a safetensors index with a weight_map ({e}).') from e
    files = [path / f for f in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise MissingPathError(f'{index} names shard(s) that do not exist: {missing}')
    return files
  files = sorted(path.glob('*.safetensors'))
  if not files:
    raise MissingPathError(
        f'no *.safetensors in {path} (PyTorch .bin checkpoints are not read; '
        'convert them with save_pretrained(..., safe_serialization=True)).')
  return files


def read_tensors(path: pathlib.Path) -> dict[str, Callable[[], np.ndarray]]:
  """Tensor name -> loader, without reading the data yet."""
  loaders = {}
  for file in checkpoint_files(path):
    with safe_open(file, framework='numpy') as f:
      for name in f.keys():
        if name in loaders:
          raise ValueError(f'tensor {name} appears in more than one file of {path}.')
        loaders[name] = lambda file=file, name=name: _read_one(file, name)
  return loaders


def _read_one(file, name) -> np.ndarray:
  with safe_open(file, framework='numpy') as f:
    return f.get_tensor(name)


def hf_to_params(tensors: dict[str, Callable[[], np.ndarray]], cfg: ModelConfig,
                 *, source: str) -> dict[tuple[str, ...], np.ndarray]:
  """Maps HF tensors to jpost parameter arrays, checking names and shapes."""
  expected = expected_tensors(cfg)
  found = set(tensors)
  missing = sorted(set(expected) - found)
  unexpected = found - set(expected)
  # A tied checkpoint may still carry lm_head.weight; accept it only if it is
  # the embedding itself, so nothing in the files is silently ignored.
  if cfg.tie_embeddings and 'lm_head.weight' in unexpected and 'model.embed_tokens.weight' in found:
    if not np.array_equal(tensors['lm_head.weight'](), tensors['model.embed_tokens.weight']()):
      raise ValueError(
          f'{source}: config.json says tie_word_embeddings=true but lm_head.weight '
          'differs from model.embed_tokens.weight; set tie_word_embeddings=false.')
    unexpected.discard('lm_head.weight')
  if missing or unexpected:
    raise ValueError(
        f'{source}: checkpoint does not match config.json ({cfg.model_type}, '
        f'{cfg.num_layers} layers).'
        + (f'\n  missing tensors ({len(missing)}): {_names(missing)}' if missing else '')
        + (f'\n  unexpected tensors ({len(unexpected)}): {_names(sorted(unexpected))}'
           if unexpected else ''))

  def load(name):
    array = tensors[name]()
    if tuple(array.shape) != expected[name]:
      raise ValueError(
          f'{source}: tensor {name} has shape {tuple(array.shape)}, expected '
          f'{expected[name]} from config.json.')
    return array

  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  params = {}
  for key, (name, transposed) in _TOP_NAMES.items():
    if key == 'lm_head' and cfg.tie_embeddings:
      continue
    array = load(name)
    params[(key,)] = (array.T if transposed else array).astype(dtype)
  for key in layer_param_shapes(cfg):
    template, transposed = _LAYER_NAMES[key]
    stacked = [load(template.format(i=i)) for i in range(cfg.num_layers)]
    params[('layers', key)] = np.stack(
        [a.T if transposed else a for a in stacked]).astype(dtype)
  return params


def params_to_hf(model: Decoder) -> dict[str, np.ndarray]:
  """The inverse of hf_to_params: HF tensor name -> array. LoRA adapters are
  merged into their kernels, so the result is a plain checkpoint (in
  param_dtype)."""
  cfg = model.config
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  out = {}
  for key, (name, transposed) in _TOP_NAMES.items():
    if key == 'lm_head' and cfg.tie_embeddings:
      continue
    array = np.asarray(getattr(model, key)[...]).astype(dtype)
    out[name] = np.ascontiguousarray(array.T if transposed else array)
  layers = lora_lib.merged(model.stacked_layers(), cfg, cfg.param_dtype)
  for key in layer_param_shapes(cfg):
    template, transposed = _LAYER_NAMES[key]
    stacked = np.asarray(layers[key]).astype(dtype)
    for i in range(cfg.num_layers):
      out[template.format(i=i)] = np.ascontiguousarray(stacked[i].T if transposed else stacked[i])
  return out


def _names(names: Iterable[str], limit: int = 8) -> str:
  names = list(names)
  more = f' ... (+{len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def build_decoder(cfg: ModelConfig, params: dict[tuple[str, ...], np.ndarray],
                  shardings=None) -> Decoder:
  """A Decoder holding `params`, placed with `shardings` (an nnx.State of
  NamedShardings, see jpost.sharding.state_shardings) when given."""
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  placements = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    array = params[tuple(path)]
    target = placements.get(tuple(path))
    target = target.get_value() if isinstance(target, nnx.Variable) else target
    variable.set_value(jax.device_put(array, target) if target is not None
                       else jax.numpy.asarray(array))
  return model


def compute_options(config) -> dict:
  """ModelConfig fields a recipe's `config.model` sets: dtypes, remat policy,
  attention implementation, block and segment limit, LM-head chunk, the
  decode loop's kernels."""
  m = config.model
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.get('remat', False),
              attention=m.get('attention', 'auto'), attention_block=m.get('attention_block', 512),
              attention_max_segments=m.get('attention_max_segments', 16),
              logits_chunk=m.get('logits_chunk', 0),
              decode_kernels=m.get('decode_kernels', 'auto'))


def load(path: str | pathlib.Path, *, mesh=None, rules=None, lora_adapter=None, seed: int = 0,
         **overrides) -> Decoder:
  """Loads a HF checkpoint dir (config.json + safetensors) as a Decoder.

  `overrides` set ModelConfig fields (e.g. dtype='bfloat16'; lora=LoraConfig
  adds adapters, initialised from `seed` or read from the PEFT folder
  `lora_adapter`); with a `mesh`, parameters are placed by the logical-axis
  `rules` of jpost.sharding.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise MissingPathError(
        f'checkpoint directory {path} does not exist; pass a folder holding '
        'config.json and *.safetensors.')
  cfg = ModelConfig.from_file(path / 'config.json', **overrides)
  params = with_adapters(hf_to_params(read_tensors(path), cfg, source=str(path)), cfg,
                         seed=seed, lora_adapter=lora_adapter)
  if ('score',) in params:
    raise ValueError(f'{lora_adapter} is a reward model\'s adapter (SEQ_CLS, with a score '
                     'head); load it with jpost.models.reward.load or the reward recipe.')
  shardings = None
  if mesh is not None:
    from jpost import sharding
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract, mesh, rules)
  return build_decoder(cfg, params, shardings)


def with_adapters(params: dict, cfg: ModelConfig, *, seed: int = 0, lora_adapter=None) -> dict:
  """Checkpoint params -> those of cfg's decoder: with cfg.lora, the base
  cast or quantised and the adapters added (fresh, or a PEFT folder's)."""
  if cfg.lora is None:
    if lora_adapter:
      raise ValueError('lora_adapter needs lora=LoraConfig (lora.read_peft_config).')
    return params
  adapter = lora_lib.read_peft(lora_adapter, cfg) if lora_adapter else None
  return lora_lib.prepare_params(params, cfg, layer_param_shapes(cfg), seed=seed,
                                 adapter=adapter)


def save(model: Decoder, path: str | pathlib.Path, *, tokenizer=None,
         dtype: str | None = None, max_shard_bytes: int = 2 << 30) -> pathlib.Path:
  """Writes config.json, safetensors (+ index when sharded) and the tokenizer
  with the source model's generation_config.json (its stop ids and sampling
  defaults: transformers' `generate` stops only at the ids listed there)."""
  tensors = params_to_hf(model)
  if dtype is not None:
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
  hf_config = model.config.to_hf()
  hf_config['torch_dtype'] = dtype or model.config.param_dtype
  path = write_checkpoint(tensors, hf_config, path, max_shard_bytes=max_shard_bytes)
  generation_file = path / 'generation_config.json'
  generation_file.unlink(missing_ok=True)  # a stale one from an earlier export
  if tokenizer is not None:
    tokenizer.save(path)
    if tokenizer.generation_config:
      generation_file.write_text(json.dumps(tokenizer.generation_config, indent=2) + '\n')
  return path


def write_checkpoint(tensors: dict[str, np.ndarray], hf_config: dict,
                     path: str | pathlib.Path, *, max_shard_bytes: int = 2 << 30) -> pathlib.Path:
  """Writes HF-named tensors and a config dict as a transformers checkpoint."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(hf_config, indent=2) + '\n')
  for old in list(path.glob('*.safetensors')) + [path / _INDEX]:
    old.unlink(missing_ok=True)  # never mix shards of two exports
  shards, current, size = [], {}, 0
  for name, array in tensors.items():
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  meta = {'format': 'pt'}  # transformers expects this to load safetensors
  if len(shards) == 1:
    save_file(shards[0], path / 'model.safetensors', metadata=meta)
    return path
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    file = f'model-{n:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, path / file, metadata=meta)
    weight_map |= {name: file for name in shard}
  total = sum(a.nbytes for a in tensors.values())
  (path / _INDEX).write_text(json.dumps(
      {'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))
  return path
