"""LoRA and QLoRA adapters on the decoder's linear layers, as PEFT defines them.

An adapted kernel computes x @ W + scale * (x @ A) @ B, with A [D, r] drawn
like PEFT's default (Kaiming-uniform, bound 1/sqrt(D)) and B [r, F] = 0, so
step 0 is the base model; scale = alpha / r, or alpha / sqrt(r) with rsLoRA.
The base is frozen and held in `base_dtype` (bfloat16 by default) or
quantised (int8 or NF4, see quant.py) and dequantised inside its layer.

jpost's layers are stacked [L, ...] arrays scanned over, with one custom
matmul (decoder.dense), so adapters are stacked the same way ([L, D, r] and
[L, r, F], `nnx.LoRAParam`s on the decoder's `Layers`) and applied where the
kernel is used. Adapter libraries that wrap linear modules (flax's nnx.LoRA,
qwix's interception of per-layer modules) have no per-layer module to wrap here.

Only the adapters (and a reward model's or critic's head) are trained:
`trainable` splits a model's state. The reference of DPO, GRPO and PPO is
the same state with every B zeroed (`adapters_off`): no second copy of the
weights. Sampling merges the adapters into the kernels once per rollout.

PEFT interop: `save_peft` writes adapter_config.json + adapter_model.safetensors
with PEFT's tensor names; `read_peft` reads such a folder (e.g. trained by
TRL), and `hf.load(..., lora_adapter=dir)` starts from it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jpost.errors import ConfigError, MissingPathError
from jpost.models import quant

# jpost kernel -> its module in a transformers decoder layer.
PEFT_MODULES = {
    'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
    'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
    'down': 'mlp.down_proj'}
KERNELS = tuple(PEFT_MODULES)
_DTYPES = ('float32', 'bfloat16', 'float16')
_ADAPTER_FILE, _CONFIG_FILE = 'adapter_model.safetensors', 'adapter_config.json'


class Quantized(nnx.Variable):
  """Quantised codes or their block scales: frozen, never differentiated."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  rank: int
  alpha: float
  targets: tuple[str, ...] = KERNELS  # jpost kernel names (resolve_targets)
  rslora: bool = False
  dropout: float = 0.0  # on each adapter's input, in training updates only
  base_dtype: str = 'bfloat16'  # the frozen base's storage, unless quantised
  quantize: str = 'none'  # 'none', 'int8' or 'nf4'
  block_size: int = 64  # inputs per quantisation block

  def __post_init__(self):
    object.__setattr__(self, 'targets', tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ConfigError(f'lora.rank={self.rank!r}: must be a positive int (0 turns LoRA off).')
    if self.alpha <= 0:
      raise ConfigError(f'lora.alpha={self.alpha}: must be positive.')
    if not 0 <= self.dropout < 1:
      raise ConfigError(f'lora.dropout={self.dropout}: must be in [0, 1).')
    unknown = [t for t in self.targets if t not in KERNELS]
    if unknown or not self.targets:
      raise ConfigError(f'LoRA targets {unknown or "()"}: use kernels of {KERNELS}.')
    if self.base_dtype not in _DTYPES:
      raise ConfigError(f'lora.base_dtype={self.base_dtype!r}; use one of {_DTYPES}.')
    if self.quantize != 'none' and self.quantize not in quant.KINDS:
      raise ConfigError(f"lora.quantize={self.quantize!r}; use 'none' or one of {quant.KINDS}.")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def resolve_targets(patterns) -> tuple[str, ...]:
  """Kernel names matched by patterns over jpost's ('q', 'gate') or PEFT's
  ('q_proj', 'gate_proj') names; 'all' or 'all-linear' selects every kernel."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  chosen = set()
  for pattern in patterns:
    if pattern in ('all', 'all-linear'):
      chosen.update(KERNELS)
      continue
    hits = {k for k, module in PEFT_MODULES.items()
            if fnmatch.fnmatch(k, pattern) or fnmatch.fnmatch(module.split('.')[-1], pattern)}
    if not hits:
      raise ConfigError(
          f'LoRA target {pattern!r} matches no kernel; names are {KERNELS} or '
          f'{[m.split(".")[-1] for m in PEFT_MODULES.values()]}, patterns like "*_proj".')
    chosen |= hits
  return tuple(k for k in KERNELS if k in chosen)


def default_config():
  """config.lora of every recipe: rank 0 is full fine-tuning."""
  import ml_collections
  return ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, targets=('all',), rslora=False, dropout=0.0,
      base_dtype='bfloat16', quantize='none', block_size=64, adapter=''))


def from_config(c) -> LoraConfig | None:
  """config.lora -> LoraConfig, or None when LoRA is off (rank 0, no adapter).
  An `adapter` folder (PEFT format) sets rank, alpha, targets and rsLoRA."""
  common = dict(base_dtype=c.base_dtype, quantize=c.quantize, block_size=c.block_size,
                dropout=float(c.dropout))
  default = default_config()
  changed = lambda names: [f'lora.{n}={c[n]!r}' for n in names if c[n] != default[n]]
  if c.adapter:
    if set_here := changed(('rank', 'alpha', 'targets', 'rslora')):
      raise ConfigError(f"{', '.join(set_here)}: the adapter {c.adapter} sets its own rank, "
                        'alpha, targets and rsLoRA (its adapter_config.json); drop these.')
    return read_peft_config(c.adapter, **common)
  if not c.rank:
    if c.quantize != 'none':
      raise ConfigError('lora.quantize needs adapters: a quantised base is frozen. Set lora.rank.')
    if set_here := changed(('alpha', 'targets', 'rslora', 'dropout', 'base_dtype')):
      raise ConfigError(f"{', '.join(set_here)} but lora.rank=0, which is full fine-tuning "
                        'without adapters: set lora.rank (e.g. 16) to train LoRA adapters.')
    return None
  return LoraConfig(rank=c.rank, alpha=float(c.alpha), targets=resolve_targets(c.targets),
                    rslora=c.rslora, **common)


def load_options(config) -> dict:
  """hf.load / reward.load keyword arguments for a run config's `lora`
  section (none when it has none or LoRA is off)."""
  section = config.get('lora')
  spec = from_config(section) if section is not None else None
  if spec is None:
    return {}
  return {'lora': spec, 'lora_adapter': section.adapter or None, 'seed': config.seed}


# --- the decoder's variables -------------------------------------------------------------


def base_dtype(cfg) -> str:
  return cfg.param_dtype if cfg.lora is None else cfg.lora.base_dtype


def is_quantized(cfg, name: str) -> bool:
  return cfg.lora is not None and cfg.lora.quantize != 'none' and name in KERNELS


def adapter_shapes(cfg, base_shapes: dict) -> dict:
  """'<kernel>_lora_a' / '_lora_b' -> (shape, logical axes), without the layer axis."""
  if cfg.lora is None:
    return {}
  r, out = cfg.lora.rank, {}
  for name in cfg.lora.targets:
    (d, f), (d_axis, f_axis) = base_shapes[name]
    out[f'{name}_lora_a'] = ((d, r), (d_axis, 'lora_rank'))
    out[f'{name}_lora_b'] = ((r, f), ('lora_rank', f_axis))
  return out


def num_params(cfg) -> int:
  """Adapter parameters of a decoder config (0 without LoRA)."""
  from jpost.models.decoder import layer_param_shapes  # (the decoder imports this module)
  shapes = adapter_shapes(cfg, layer_param_shapes(cfg))
  return cfg.num_layers * sum(math.prod(shape) for shape, _ in shapes.values())


def quantized_shapes(cfg, base_shapes: dict) -> dict:
  """'<kernel>' (codes) / '<kernel>_scale' -> (shape, axes, dtype) of a quantised base."""
  if cfg.lora is None or cfg.lora.quantize == 'none':
    return {}
  kind, block, out = cfg.lora.quantize, cfg.lora.block_size, {}
  for name in KERNELS:
    (d, f), axes = base_shapes[name]
    quant.check(kind, block, d, name)
    out[name] = (quant.stored_shape(kind, (d, f)), axes, np.int8 if kind == 'int8' else np.uint8)
    out[f'{name}_scale'] = ((d // block, f), axes, np.float32)
  return out


def add_variables(layers: nnx.Module, cfg, base_shapes: dict, key) -> None:
  """Adds the adapters (PEFT's initialisation) and replaces quantised kernels
  on the stacked `layers` module (shapes only matter: loaders set values)."""
  num = cfg.num_layers
  for name, (shape, axes, dtype) in quantized_shapes(cfg, base_shapes).items():
    value = jnp.zeros((num, *shape), dtype) if dtype != np.float32 else jnp.ones((num, *shape))
    setattr(layers, name, Quantized(value, logical_axes=('layers', *axes)))
  init = init_adapters(cfg, base_shapes, key)
  for name, (_, axes) in adapter_shapes(cfg, base_shapes).items():
    setattr(layers, name, nnx.LoRAParam(init[name], logical_axes=('layers', *axes)))


def init_adapters(cfg, base_shapes: dict, key) -> dict:
  """A: uniform(+-1/sqrt(D)) (torch's Kaiming-uniform with a = sqrt(5), PEFT's
  default); B: zeros. Stacked [L, ...], in cfg.param_dtype."""
  dtype, out = jnp.dtype(cfg.param_dtype), {}
  for i, (name, (shape, _)) in enumerate(adapter_shapes(cfg, base_shapes).items()):
    full = (cfg.num_layers, *shape)
    if name.endswith('_lora_b'):
      out[name] = jnp.zeros(full, dtype)
    else:
      bound = 1 / math.sqrt(shape[0])
      out[name] = jax.random.uniform(jax.random.fold_in(key, i), full, dtype, -bound, bound)
  return out


def prepare_params(params: dict, cfg, base_shapes: dict, *, seed: int = 0,
                   adapter: dict | None = None) -> dict:
  """HF-loaded params ({path tuple: array}) -> the adapted decoder's: the base
  cast to base_dtype (or quantised), adapters from `adapter` or initialised."""
  if cfg.lora is None:
    return params
  base = np.dtype(jnp.dtype(cfg.lora.base_dtype))
  out = {}
  for path, array in params.items():
    if path[0] == 'layers' and is_quantized(cfg, path[1]):
      quant.check(cfg.lora.quantize, cfg.lora.block_size, array.shape[-2], path[1])
      codes, scales = quant.quantize(array, cfg.lora.quantize, cfg.lora.block_size)
      out[path], out[('layers', f'{path[1]}_scale')] = codes, scales
    else:
      out[path] = np.asarray(array).astype(base)
  if adapter is None:
    adapter = init_adapters(cfg, base_shapes, jax.random.key(seed))
  if 'score' in adapter:  # a reward model's head, set by its loader
    out[('score',)] = np.asarray(adapter['score'], np.float32)
  for name, (shape, _) in adapter_shapes(cfg, base_shapes).items():
    want = (cfg.num_layers, *shape)
    got = np.shape(adapter[name]) if name in adapter else None
    if got != want:
      raise ConfigError(f'the LoRA adapter\'s {name} has shape {got}; expected {want}.')
    out[('layers', name)] = np.asarray(adapter[name]).astype(np.dtype(jnp.dtype(cfg.param_dtype)))
  return out


# --- the maths ---------------------------------------------------------------------------


def dequantized(p: dict, cfg, dtype) -> dict:
  """One layer's (or the stacked) weights with quantised kernels dequantised."""
  if cfg.lora is None or cfg.lora.quantize == 'none' or 'q_scale' not in p:
    return p  # (sampling's weights were dequantised when the adapters were merged)
  out = {k: v for k, v in p.items() if not k.endswith('_scale')}
  for name in KERNELS:
    out[name] = quant.dequantize(p[name], p[f'{name}_scale'], cfg.lora.quantize, dtype)
  return out


def adapter_input(x, p: dict, name: str, cfg, matmul):
  """scale * dropout(x) @ A [..., rank] for kernel `name` (its adapter's
  output is this @ B), or None when it has no adapter. Dropout applies where
  the layer's weights carry a 'dropout_key' (see `dropout_keys`), with a
  mask of its own per kernel."""
  if f'{name}_lora_a' not in p:
    return None
  if p.get('dropout_key') is not None:
    keep = 1.0 - cfg.lora.dropout
    mask = jax.random.bernoulli(jax.random.fold_in(p['dropout_key'], KERNELS.index(name)),
                                keep, x.shape)
    x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
  return matmul(x, p[f'{name}_lora_a']) * jnp.asarray(cfg.lora.scale, x.dtype)


_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar('jpost_lora_dropout', default=None)


@contextlib.contextmanager
def dropout(key):
  """Adapter dropout on, drawn from `key`, for the forward passes traced
  inside (the train update sets it; evaluation, sampling and the reference
  never do)."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


def dropout_keys(cfg, num_layers: int):
  """One key per layer [L] for a scan over the layers, or None when adapter
  dropout is off here."""
  key = _DROPOUT_KEY.get()
  if key is None or cfg.lora is None or not cfg.lora.dropout:
    return None
  return jax.random.split(key, num_layers)


def merged(p: dict, cfg, dtype=jnp.float32) -> dict:
  """Weights with every adapter folded in (W + scale A B, in float32, then
  `dtype`) and no adapter or scale entries: what sampling and export use."""
  if cfg.lora is None:
    return p
  p = dequantized(p, cfg, jnp.float32)
  out = {k: v for k, v in p.items() if '_lora_' not in k and k != 'dropout_key'}
  for name in cfg.lora.targets:
    delta = jnp.einsum('...dr,...rf->...df', p[f'{name}_lora_a'].astype(jnp.float32),
                       p[f'{name}_lora_b'].astype(jnp.float32))
    out[name] = p[name].astype(jnp.float32) + cfg.lora.scale * delta
  return {k: v.astype(dtype) if k in KERNELS else v for k, v in out.items()}


def frozen_in_training(cfg, name: str) -> bool:
  """Whether layer parameter `name` is never differentiated: with adapters,
  everything in the layers but the adapters themselves (`trainable`)."""
  return cfg.lora is not None and not name.endswith(('_lora_a', '_lora_b'))


def has_adapters(state) -> bool:
  return any(isinstance(v, nnx.LoRAParam)
             for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def trainable(state) -> tuple:
  """(trainable, frozen) parts of a model's state: with adapters, the
  adapters and any head named 'score'; without, every parameter."""
  if has_adapters(state):
    return nnx.split_state(state, nnx.Any(nnx.LoRAParam, nnx.PathContains('score')), ...)
  return nnx.split_state(state, nnx.Param, ...)


def adapters_off(state):
  """The state with every B zeroed: the base model (a reference without a copy)."""
  def off(path, x):
    names = [str(getattr(entry, 'key', getattr(entry, 'name', entry))) for entry in path]
    return jnp.zeros_like(x) if any(n.endswith('_lora_b') for n in names) else x
  return jax.tree.map_with_path(off, state)


def without_adapters(model):
  """The same module with every B zeroed (usable inside jit and grad)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, adapters_off(state))


# --- PEFT files --------------------------------------------------------------------------


def _peft_name(prefix: str, i: int, name: str, which: str) -> str:
  return f'{prefix}model.layers.{i}.{PEFT_MODULES[name]}.lora_{which}.weight'


_SCORE = 'base_model.model.score.weight'  # a SEQ_CLS adapter's trained head


def save_peft(model, path, *, base_model: str = '',
              prefix: str = 'base_model.model.') -> pathlib.Path:
  """Writes a model's adapters as a PEFT LoRA adapter folder: a causal LM's
  (task CAUSAL_LM), or a reward model's with its head (SEQ_CLS, the head in
  `modules_to_save` as PEFT saves it)."""
  decoder = getattr(model, 'decoder', model)
  cfg = decoder.config
  if cfg.lora is None:
    raise ConfigError('this model has no LoRA adapters to export.')
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for name in cfg.lora.targets:
    a = np.asarray(getattr(decoder.layers, f'{name}_lora_a')[...], np.float32)
    b = np.asarray(getattr(decoder.layers, f'{name}_lora_b')[...], np.float32)
    for i in range(cfg.num_layers):  # PEFT's A is [r, D] and B [F, r] (torch [out, in])
      tensors[_peft_name(prefix, i, name, 'A')] = np.ascontiguousarray(a[i].T)
      tensors[_peft_name(prefix, i, name, 'B')] = np.ascontiguousarray(b[i].T)
  reward = decoder is not model
  if reward:
    tensors[_SCORE] = np.asarray(model.score[...], np.float32)[None, :]
  save_file(tensors, path / _ADAPTER_FILE, metadata={'format': 'pt'})
  config = {
      'peft_type': 'LORA', 'task_type': 'SEQ_CLS' if reward else 'CAUSAL_LM',
      'base_model_name_or_path': base_model,
      'r': cfg.lora.rank, 'lora_alpha': cfg.lora.alpha, 'use_rslora': cfg.lora.rslora,
      'target_modules': sorted(PEFT_MODULES[t].split('.')[-1] for t in cfg.lora.targets),
      'lora_dropout': cfg.lora.dropout, 'bias': 'none', 'fan_in_fan_out': False,
      'init_lora_weights': True, 'inference_mode': True,
      'modules_to_save': ['classifier', 'score'] if reward else None,
      'use_dora': False}
  (path / _CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
  return path


def read_peft_config(path, **common) -> LoraConfig:
  """The LoraConfig of a PEFT adapter folder; options jpost cannot honour
  (DoRA, biases, per-layer ranks, ...) are errors, not silently dropped."""
  file = pathlib.Path(path) / _CONFIG_FILE
  if not file.is_file():
    raise MissingPathError(f'{file} not found: a PEFT adapter folder holds {_CONFIG_FILE} '
                           f'and {_ADAPTER_FILE} (peft save_pretrained).')
  c = json.loads(file.read_text())
  if c.get('peft_type') != 'LORA':
    raise ConfigError(f'{file}: peft_type {c.get("peft_type")!r}; jpost reads LORA adapters.')
  unsupported = {k: c[k] for k in ('use_dora', 'rank_pattern', 'alpha_pattern',
                                   'layers_to_transform', 'fan_in_fan_out') if c.get(k)}
  if set(c.get('modules_to_save') or ()) - {'classifier', 'score'}:
    unsupported['modules_to_save'] = c['modules_to_save']  # a reward head is all jpost reads
  if c.get('bias', 'none') != 'none':
    unsupported['bias'] = c['bias']
  if unsupported:
    raise ConfigError(f'{file}: options jpost does not support: {unsupported}.')
  targets = c['target_modules']
  common.setdefault('dropout', float(c.get('lora_dropout') or 0.0))
  return LoraConfig(rank=int(c['r']), alpha=float(c['lora_alpha']),
                    targets=resolve_targets(targets if targets != 'all-linear' else 'all'),
                    rslora=bool(c.get('use_rslora', False)), **common)


def read_peft(path, cfg) -> dict:
  """A PEFT adapter's tensors as stacked jpost adapters {name: [L, ...]}, plus
  'score' [D] for a reward model's (SEQ_CLS) head; every tensor in the file
  must be used and every expected one present."""
  file = pathlib.Path(path) / _ADAPTER_FILE
  if not file.is_file():
    raise MissingPathError(f'{file} not found (PyTorch adapter_model.bin is not read; '
                           're-save it with safe_serialization=True).')
  tensors = load_file(file)
  prefix = 'base_model.model.'
  out, used = {}, set()
  if _SCORE in tensors:
    out['score'] = tensors[_SCORE].astype(np.float32).reshape(-1)
    used.add(_SCORE)
  for name in cfg.lora.targets:
    for which, key in (('A', f'{name}_lora_a'), ('B', f'{name}_lora_b')):
      layers = []
      for i in range(cfg.num_layers):
        hf_name = _peft_name(prefix, i, name, which)
        if hf_name not in tensors:
          raise ConfigError(f'{file}: missing {hf_name}.')
        layers.append(tensors[hf_name].astype(np.float32).T)
        used.add(hf_name)
      out[key] = np.stack(layers)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ConfigError(f'{file}: tensors jpost would not use ({len(extra)}): {extra[:4]}.')
  return out
