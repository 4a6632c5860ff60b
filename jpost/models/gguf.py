"""GGUF (llama.cpp) import for the Llama architecture.

A GGUF file holds quantised weights, the model's hyperparameters and its
tokenizer with chat template. `convert` dequantises the weights with the
`gguf` package, undoes llama.cpp's per-head permutation of the query and key
projections (its rotary layout interleaves the two halves that HF's
rotate-half keeps apart), and writes an ordinary HF checkpoint directory that
both jpost and transformers load.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jpost.errors import ConfigError, MissingPathError
from jpost.models import hf

SUPPORTED_ARCHITECTURES = ('llama',)

# GGUF tensor name (per block {i}) -> HF tensor name.
_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
    'blk.{i}.attn_norm.weight': 'model.layers.{i}.input_layernorm.weight',
    'blk.{i}.attn_q.weight': 'model.layers.{i}.self_attn.q_proj.weight',
    'blk.{i}.attn_k.weight': 'model.layers.{i}.self_attn.k_proj.weight',
    'blk.{i}.attn_v.weight': 'model.layers.{i}.self_attn.v_proj.weight',
    'blk.{i}.attn_output.weight': 'model.layers.{i}.self_attn.o_proj.weight',
    'blk.{i}.ffn_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.ffn_gate.weight': 'model.layers.{i}.mlp.gate_proj.weight',
    'blk.{i}.ffn_up.weight': 'model.layers.{i}.mlp.up_proj.weight',
    'blk.{i}.ffn_down.weight': 'model.layers.{i}.mlp.down_proj.weight',
}


def _field(reader, key, default=None, *, source):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ConfigError(f'{source}: GGUF metadata key {key!r} is missing.')
    return default
  return field.contents()


def hf_config_from_gguf(reader, *, source: str) -> dict:
  """The transformers config.json of a llama-architecture GGUF."""
  arch = _field(reader, 'general.architecture', source=source)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConfigError(
        f'{source}: GGUF architecture {arch!r} is not supported; jpost imports '
        f'{SUPPORTED_ARCHITECTURES} GGUFs. Load an HF checkpoint directory instead.')
  names = {t.name for t in reader.tensors}
  if 'rope_freqs.weight' in names:
    raise ConfigError(
        f'{source}: GGUF carries rope_freqs (Llama 3.1 RoPE scaling), which the '
        'GGUF import does not map yet; load the HF checkpoint directory instead.')
  tokens = reader.fields.get('tokenizer.ggml.tokens')
  heads = int(_field(reader, f'{arch}.attention.head_count', source=source))
  hidden = int(_field(reader, f'{arch}.embedding_length', source=source))
  head_dim = int(_field(reader, f'{arch}.attention.key_length', hidden // heads, source=source))
  def token_id(key):
    field = reader.fields.get(f'tokenizer.ggml.{key}')
    return None if field is None else int(field.contents())
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': int(_field(reader, f'{arch}.vocab_size',
                               len(tokens.data) if tokens else None, source=source)),
      'hidden_size': hidden,
      'intermediate_size': int(_field(reader, f'{arch}.feed_forward_length', source=source)),
      'num_hidden_layers': int(_field(reader, f'{arch}.block_count', source=source)),
      'num_attention_heads': heads,
      'num_key_value_heads': int(_field(reader, f'{arch}.attention.head_count_kv', heads, source=source)),
      'head_dim': head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': float(_field(reader, f'{arch}.attention.layer_norm_rms_epsilon', source=source)),
      'rope_theta': float(_field(reader, f'{arch}.rope.freq_base', 10000.0, source=source)),
      'rope_scaling': _rope_scaling(reader, arch, head_dim, source=source),
      'max_position_embeddings': int(_field(reader, f'{arch}.context_length', 4096, source=source)),
      'tie_word_embeddings': 'output.weight' not in names,
      'attention_bias': False,
      'mlp_bias': False,
      'bos_token_id': token_id('bos_token_id'),
      'eos_token_id': token_id('eos_token_id'),
      'pad_token_id': token_id('padding_token_id'),
      'torch_dtype': 'float32',
  }


def _rope_scaling(reader, arch: str, head_dim: int, *, source: str) -> dict | None:
  """HF's rope_scaling for the GGUF's RoPE metadata: linear scaling maps;
  YaRN and partial rotary embeddings are refused rather than dropped, which
  would put every position past the original context in the wrong place."""
  rotary = int(_field(reader, f'{arch}.rope.dimension_count', head_dim, source=source))
  if rotary != head_dim:
    raise ConfigError(
        f'{source}: GGUF rotates {rotary} of each head\'s {head_dim} dimensions '
        f'({arch}.rope.dimension_count); jpost rotates whole heads. Load an HF '
        'checkpoint directory of a supported model instead.')
  kind = _field(reader, f'{arch}.rope.scaling.type', 'none', source=source)
  factor = float(_field(reader, f'{arch}.rope.scaling.factor', 0.0, source=source))
  legacy = float(_field(reader, f'{arch}.rope.scale_linear', 0.0, source=source))
  if kind == 'none' and legacy not in (0.0, 1.0):  # files from before rope.scaling.*
    kind, factor = 'linear', legacy
  if kind == 'none' or (kind == 'linear' and factor in (0.0, 1.0)):
    return None
  if kind != 'linear':
    raise ConfigError(
        f'{source}: GGUF RoPE scaling {kind!r} ({arch}.rope.scaling.type) is not '
        "supported by the GGUF import (only 'linear'); load the HF checkpoint "
        'directory instead.')
  return {'rope_type': 'linear', 'factor': factor}


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k permutation: per head, rows (pairs interleaved)
  go back to HF's layout (first half, then second half)."""
  out_dim = weight.shape[0]
  head = out_dim // num_heads
  return (weight.reshape(num_heads, head // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def hf_tensors_from_gguf(reader, config: dict, *, source: str) -> dict[str, np.ndarray]:
  """Dequantised float32 tensors under their HF names; every tensor is used."""
  import gguf
  table = {}
  for g, h in _NAMES.items():
    if '{i}' in g:
      table |= {g.format(i=i): h.format(i=i) for i in range(config['num_hidden_layers'])}
    else:
      table[g] = h
  unknown = sorted(t.name for t in reader.tensors if t.name not in table)
  if unknown:
    raise ConfigError(f'{source}: GGUF tensors with no HF mapping: {unknown[:8]}')
  out = {}
  for tensor in reader.tensors:
    array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    name = table[tensor.name]
    if name.endswith('q_proj.weight'):
      array = unpermute_rotary(array, config['num_attention_heads'])
    elif name.endswith('k_proj.weight'):
      array = unpermute_rotary(array, config['num_key_value_heads'])
    out[name] = np.ascontiguousarray(array)
  return out


def convert(gguf_path: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes a HF checkpoint directory (config, safetensors, tokenizer) from a GGUF."""
  import gguf
  from jpost.models.gguf_tokenizer import tokenizer_files_from_gguf
  gguf_path = pathlib.Path(gguf_path)
  if not gguf_path.is_file():
    raise MissingPathError(f'GGUF file {gguf_path} does not exist.')
  source = str(gguf_path)
  reader = gguf.GGUFReader(gguf_path)
  config = hf_config_from_gguf(reader, source=source)
  try:  # before the weights: a vocabulary jpost cannot convert fails in a second
    tokenizer_json, tokenizer_config = tokenizer_files_from_gguf(reader)
  except ValueError as e:
    raise ConfigError(f'{source}: {e}') from e
  tensors = hf_tensors_from_gguf(reader, config, source=source)
  out_dir = hf.write_checkpoint(tensors, config, out_dir)
  (out_dir / 'tokenizer.json').write_text(json.dumps(tokenizer_json, ensure_ascii=False))
  (out_dir / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config, indent=2))
  generation = {k: config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
                if config[k] is not None}
  (out_dir / 'generation_config.json').write_text(json.dumps(generation, indent=2))
  return out_dir
