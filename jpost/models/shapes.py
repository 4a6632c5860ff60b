"""Real model shapes without weights: random initialisation for benchmarks,
memory planning and GPU checks (`bench/plan.py`, `bench/gpu.sh`).

Each entry is the model's transformers config.json (the fields jpost reads),
so `ModelConfig.from_hf` builds it exactly as it would the real checkpoint.
"""

from __future__ import annotations

import jax
from flax import nnx

from jpost.errors import ConfigError
from jpost.models.config import ModelConfig
from jpost.models.decoder import Decoder

_LLAMA3_ROPE = dict(rope_type='llama3', low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

SHAPES = {
    'smollm2-135m': dict(
        model_type='llama', vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    'llama-3.2-1b': dict(
        model_type='llama', vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001),
    'qwen2.5-1.5b': dict(
        model_type='qwen2', vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    'llama-3.1-8b': dict(
        model_type='llama', vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001),
}


def config(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of a named shape; `overrides` set its fields (dtype,
  remat, attention, num_layers for a shallower copy, ...)."""
  if name not in SHAPES:
    raise ConfigError(f'unknown model shape {name!r}; use one of {sorted(SHAPES)}.')
  hf = {k: dict(v) if isinstance(v, dict) else v for k, v in SHAPES[name].items()}
  if 'num_layers' in overrides:
    hf['num_hidden_layers'] = overrides.pop('num_layers')
  return ModelConfig.from_hf(hf, source=f'shape {name}', **overrides)


def init(cfg: ModelConfig, *, mesh=None, seed: int = 0) -> Decoder:
  """A randomly initialised Decoder, created directly in its shardings on
  `mesh` (no full copy on one device first)."""
  if mesh is None:
    return Decoder(cfg, rngs=nnx.Rngs(seed))
  from jpost import sharding
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  shardings = sharding.state_shardings(state, mesh)

  def make():
    return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)))
  return nnx.merge(graphdef, jax.jit(make, out_shardings=shardings)())
