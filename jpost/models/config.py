"""ModelConfig: one validated description of the Llama-family decoders.

Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 and SmolLM2 differ only in a few
switches (biases, q/k norms, tied embeddings, RoPE scaling, sliding window),
so one config and one decoder cover them all. `from_hf` reads a transformers
`config.json` (old `rope_theta`/`rope_scaling` keys and the newer
`rope_parameters` alike); `to_hf` writes one that transformers loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

from jpost.errors import ConfigError, MissingPathError

SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')
_ARCHITECTURES = {
    'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
    'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
_ROPE_TYPES = ('default', 'linear', 'llama3')
_ROPE_PARAMS = {'linear': ('factor',),
                'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                           'original_max_position_embeddings')}


def resolve_dtype(name: str) -> str:
  """The compute dtype `name` stands for on this machine: 'auto' is bfloat16
  where matmuls have 16-bit hardware (a GPU or TPU; a CPU with AVX512-BF16,
  AMX-BF16 or Arm's BF16), else float32. A CPU without it converts bfloat16
  to float32 around every matmul: on a 2-core EPYC without AVX-512 an SFT
  step ran 1.42x and a GRPO step 1.25x faster in float32 (bench/RESULTS.md)."""
  if name != 'auto':
    return name
  import jax
  return dtype_for(jax.default_backend(), cpu_flags())


def dtype_for(backend: str, flags: frozenset) -> str:
  """'auto''s choice for a backend and the CPU's feature flags."""
  if backend != 'cpu':
    return 'bfloat16'
  return 'bfloat16' if flags & {'avx512_bf16', 'amx_bf16', 'bf16'} else 'float32'


@functools.cache
def cpu_flags() -> frozenset:
  """The CPU's feature flags (x86 'flags', Arm 'Features'; empty elsewhere)."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return frozenset()
  for line in lines:
    key, _, value = line.partition(':')
    if key.strip() in ('flags', 'Features'):
      return frozenset(value.split())
  return frozenset()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shape and switches of a decoder. Dtypes are names ('float32', 'bfloat16';
  the compute `dtype` may be 'auto': `resolve_dtype`)."""

  model_type: str = 'llama'
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # None, or a dict with 'rope_type' in _ROPE_TYPES and its parameters
  # (kept as a sorted tuple of items; `rope_params` gives the dict back).
  rope_scaling: dict | tuple | None = None
  max_position_embeddings: int = 4096
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 always, Llama with attention_bias
  o_bias: bool = False  # Llama and Qwen3 with attention_bias
  qk_norm: bool = False  # Qwen3
  sliding_window: int | None = None  # Mistral
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = 'float32'
  dtype: str = 'float32'  # compute dtype of activations and matmuls
  # Recompute each layer's activations in the backward pass: 'none', 'dots'
  # (keep the weight matmuls' outputs) or 'full'; True = 'full', False = 'none'.
  remat: bool | str = False
  # attention.IMPLEMENTATIONS: 'auto', 'xla', 'blockwise', 'cpu', 'pallas' or 'cudnn';
  # the blockwise path's key block; the most segments a packed row may hold
  # under 'cudnn', whose backward workspace grows with it (SFT's packer caps
  # rows at it; README, "Attention and memory").
  attention: str = 'auto'
  attention_block: int = 512
  attention_max_segments: int = 16
  # A decode loop's matmuls and attention: 'auto' runs them on jpost's CPU
  # kernels where cpu_decode.decodes_on_kernels says they apply, 'xla' on
  # XLA's operations always.
  decode_kernels: str = 'auto'
  # Losses compute the LM head's logits this many positions at a time (0:
  # all at once), recomputed in the backward pass (ops.head_logprobs) or, for
  # SFT, with their gradient taken in the forward (ops.head_weighted_logprobs;
  # on one device, of the target positions only, gathered from all rows).
  logits_chunk: int = 0
  lora: Any = None  # a lora.LoraConfig: adapters on a frozen (maybe quantised) base

  def __post_init__(self):
    if self.dtype == 'auto':
      object.__setattr__(self, 'dtype', resolve_dtype('auto'))
    # Stored as tuples so the config is hashable (it is static data under jit).
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, 'rope_scaling', tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, 'eos_token_id', tuple(self.eos_token_id))
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f'model_type {self.model_type!r} is not supported; jpost supports '
          f'{SUPPORTED_MODEL_TYPES} (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2).')
    for name in ('vocab_size', 'hidden_size', 'intermediate_size',
                 'num_layers', 'num_heads', 'num_kv_heads'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f'ModelConfig.{name} must be a positive int, got {value!r}.')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
          f'({self.num_kv_heads}) for grouped-query attention.')
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ConfigError(
          f'hidden_size ({self.hidden_size}) is not divisible by num_heads '
          f'({self.num_heads}); set head_dim explicitly.')
    if self.head_size % 2:
      raise ConfigError(f'head_dim must be even for RoPE, got {self.head_size}.')
    if self.rope_scaling is not None:
      kind = self.rope_type
      if kind not in _ROPE_TYPES:
        raise ConfigError(
            f'rope_scaling type {kind!r} is not supported; use one of {_ROPE_TYPES}.')
      needs = _ROPE_PARAMS.get(kind, ())
      missing = [k for k in needs if not isinstance(self.rope_params.get(k), (int, float))]
      if missing:
        raise ConfigError(f'rope_scaling type {kind!r} needs the number(s) {missing}; '
                          f'got {self.rope_params}.')
    if self.remat not in (True, False, 'none', 'dots', 'full'):
      raise ConfigError(f"ModelConfig.remat={self.remat!r}; use 'none', 'dots' or 'full' "
                        '(True = full, False = none).')
    from jpost.models.attention import IMPLEMENTATIONS
    if self.attention not in IMPLEMENTATIONS:
      raise ConfigError(f'ModelConfig.attention={self.attention!r}; use one of '
                        f'{IMPLEMENTATIONS}.')
    if not isinstance(self.attention_block, int) or self.attention_block < 8:
      raise ConfigError(f'ModelConfig.attention_block={self.attention_block!r}; use an '
                        'int >= 8 (512 by default).')
    if not isinstance(self.attention_max_segments, int) or self.attention_max_segments < 1:
      raise ConfigError(f'ModelConfig.attention_max_segments={self.attention_max_segments!r}; '
                        'use an int >= 1 (16 by default).')
    from jpost.models.cpu_decode import CHOICES as DECODE_KERNELS
    if self.decode_kernels not in DECODE_KERNELS:
      raise ConfigError(f'ModelConfig.decode_kernels={self.decode_kernels!r}; use one of '
                        f'{DECODE_KERNELS}.')
    for name in ('param_dtype', 'dtype'):
      if getattr(self, name) not in ('float32', 'bfloat16', 'float16'):
        raise ConfigError(
            f'ModelConfig.{name} must be float32, bfloat16 or float16, '
            f'got {getattr(self, name)!r}.')

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def remat_policy(self) -> str:
    """'none', 'dots' or 'full' (True means 'full', False 'none')."""
    return {True: 'full', False: 'none'}.get(self.remat, self.remat)

  @property
  def rope_params(self) -> dict:
    return dict(self.rope_scaling or ())

  @property
  def rope_type(self) -> str:
    params = self.rope_params
    return params.get('rope_type', params.get('type', 'default'))

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (tied embeddings counted once)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_size
    q, kv = self.num_heads * h, self.num_kv_heads * h
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    per_layer += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * h * self.qk_norm
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + d

  # --- transformers config.json -------------------------------------------

  @classmethod
  def from_hf(cls, hf: dict[str, Any], *, source: str = 'config.json',
              **overrides) -> ModelConfig:
    """Builds a config from a transformers config dict; `source` names it in errors."""
    model_type = hf.get('model_type')
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f'{source}: model_type {model_type!r} is not supported; jpost loads '
          f'{SUPPORTED_MODEL_TYPES}.')
    required = ('vocab_size', 'hidden_size', 'intermediate_size',
                'num_hidden_layers', 'num_attention_heads')
    missing = [k for k in required if k not in hf]
    if missing:
      raise ConfigError(f'{source}: missing required field(s) {missing} for {model_type}.')
    if hf.get('hidden_act', 'silu') != 'silu':
      raise ConfigError(f'{source}: hidden_act {hf["hidden_act"]!r} unsupported; expected silu.')
    if hf.get('mlp_bias'):
      raise ConfigError(f'{source}: mlp_bias=true is not supported.')
    rope = dict(hf.get('rope_parameters') or {})
    theta = rope.pop('rope_theta', hf.get('rope_theta', 10000.0))
    scaling = hf.get('rope_scaling') or (rope if rope.get('rope_type', 'default') != 'default' else None)
    if scaling is not None:
      scaling = {k: v for k, v in scaling.items() if k != 'rope_theta'}
    sliding = None
    if model_type == 'mistral':
      sliding = hf.get('sliding_window')
    elif hf.get('use_sliding_window'):
      raise ConfigError(f'{source}: use_sliding_window=true is not supported for {model_type}.')
    attention_bias = bool(hf.get('attention_bias', False))
    try:
      return cls(
          model_type=model_type,
          vocab_size=hf['vocab_size'],
          hidden_size=hf['hidden_size'],
          intermediate_size=hf['intermediate_size'],
          num_layers=hf['num_hidden_layers'],
          num_heads=hf['num_attention_heads'],
          num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
          head_dim=hf.get('head_dim'),
          rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
          rope_theta=float(theta),
          rope_scaling=scaling,
          max_position_embeddings=hf.get('max_position_embeddings', 4096),
          tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
          qkv_bias=model_type == 'qwen2' or attention_bias,
          o_bias=model_type in ('llama', 'qwen3') and attention_bias,
          qk_norm=model_type == 'qwen3',
          sliding_window=sliding,
          bos_token_id=hf.get('bos_token_id'),
          eos_token_id=hf.get('eos_token_id'),
          pad_token_id=hf.get('pad_token_id'),
          **overrides)
    except (TypeError, ValueError) as e:
      raise ConfigError(f'{source}: {e}') from e

  @classmethod
  def from_file(cls, path: str | pathlib.Path, **overrides) -> ModelConfig:
    path = pathlib.Path(path)
    if not path.is_file():
      raise MissingPathError(
          f'{path} not found: a HF checkpoint directory must hold config.json.')
    try:
      hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f'{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}') from e
    if not isinstance(hf, dict):
      raise ConfigError(f'{path} must hold a JSON object, got {type(hf).__name__}.')
    return cls.from_hf(hf, source=str(path), **overrides)

  def to_hf(self) -> dict[str, Any]:
    """A transformers config dict (legacy rope keys, which every version reads)."""
    hf = {
        'architectures': [_ARCHITECTURES[self.model_type]],
        'model_type': self.model_type,
        'vocab_size': self.vocab_size,
        'hidden_size': self.hidden_size,
        'intermediate_size': self.intermediate_size,
        'num_hidden_layers': self.num_layers,
        'num_attention_heads': self.num_heads,
        'num_key_value_heads': self.num_kv_heads,
        'head_dim': self.head_size,
        'hidden_act': 'silu',
        'rms_norm_eps': self.rms_norm_eps,
        'rope_theta': self.rope_theta,
        'rope_scaling': self.rope_params or None,
        'max_position_embeddings': self.max_position_embeddings,
        'tie_word_embeddings': self.tie_embeddings,
        'bos_token_id': self.bos_token_id,
        'eos_token_id': (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        'pad_token_id': self.pad_token_id,
        'torch_dtype': self.param_dtype,
    }
    if self.model_type in ('llama', 'qwen3'):
      hf['attention_bias'] = self.o_bias
    if self.model_type == 'mistral':
      hf['sliding_window'] = self.sliding_window
    if self.model_type in ('qwen2', 'qwen3'):
      hf['use_sliding_window'] = False
    return hf
