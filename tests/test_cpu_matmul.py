"""The CPU decoding matmul (models/cpu_matmul.py): the kernel against XLA's
float32-accumulated matmul over every tile split of the rows and both
weight layouts, the packed layout index by index, sampling with it against
the trainer's full forward, where 'auto' uses it, and what happens without a
compiler. The suite runs on 8 fake devices, where 'auto' keeps XLA's
matmuls; the sampling test turns the kernel on as one device would."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost import ops, sampling
from jpost.errors import ConfigError
from jpost.models import cpu_matmul, decoder, hf
from jpost.models.config import ModelConfig
from jpost.tokenizer import Tokenizer
from norms import assert_norm_close

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU kernel'),
    pytest.mark.skipif(cpu_matmul.unavailable_reason() is not None,
                       reason=f'kernel unavailable: {cpu_matmul.unavailable_reason()}')]


@pytest.mark.parametrize('m, k, n', [(1, 576, 576), (5, 64, 192), (6, 128, 64), (7, 128, 128),
                                     (16, 576, 960), (16, 1536, 576), (33, 96, 64),
                                     (130, 64, 256)])
@pytest.mark.parametrize('w_is_fd', [False, True])
def test_kernel_equals_xla_matmul(m, k, n, w_is_fd):
  """Rows 1-130 (tiles of 1 to 6 rows, 16 = 6 + 5 + 5), 1 to 24 column
  blocks, [K, N] and [N, K] weights, float32 and bfloat16 results. Inputs
  are bfloat16 and both sides accumulate in float32, so the float32 results
  differ only by summation order (a wrong pair, block or row is O(1))."""
  x = jax.random.normal(jax.random.key(m), (2, m, k), jnp.bfloat16)  # leading dims flatten
  w = jax.random.normal(jax.random.key(k + n), (n, k) if w_is_fd else (k, n), jnp.bfloat16)
  reference = jnp.einsum('bmk,nk->bmn' if w_is_fd else 'bmk,kn->bmn', x, w,
                         preferred_element_type=jnp.float32)
  packed = cpu_matmul.pack(w, w_is_fd)
  assert packed.shape == (n // 64, k // 2, 64, 2) and cpu_matmul.is_packed(packed)
  out32 = jax.jit(lambda x, p: cpu_matmul.matmul(x, p, float32_out=True))(x, packed)
  out16 = jax.jit(cpu_matmul.matmul)(x, packed)
  assert out32.shape == out16.shape == (2, m, n)
  assert out32.dtype == jnp.float32 and out16.dtype == jnp.bfloat16
  assert_norm_close(out32, reference, bound=1e-5)
  # Rounded to bfloat16 once: within half a bfloat16 step of the reference's rounding.
  assert_norm_close(out16.astype(jnp.float32), reference.astype(jnp.bfloat16).astype(jnp.float32),
                    bound=4e-3)


def test_packed_layout_index_by_index():
  """packed[b, p, c, j] = w[2p + j, 64b + c] ([K, N]) = w_fd[64b + c, 2p + j]."""
  k, n = 6, 128
  w = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n)
  packed, packed_fd = np.asarray(cpu_matmul.pack(w)), np.asarray(cpu_matmul.pack(w.T, True))
  for b, p, c, j in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 2, 63, 1), (1, 1, 5, 0), (0, 2, 17, 1)]:
    assert packed[b, p, c, j] == packed_fd[b, p, c, j] == w[2 * p + j, 64 * b + c]
  stacked = cpu_matmul.pack(jnp.stack([w, w + 1]))  # over layers: [L, N/64, K/2, 64, 2]
  np.testing.assert_array_equal(stacked[1], packed + 1)


def test_bad_shapes_are_clear_errors():
  packed = cpu_matmul.pack(jnp.ones((64, 128), jnp.bfloat16))
  with pytest.raises(ValueError, match='x has 32 features; the packed weight takes 64'):
    cpu_matmul.matmul(jnp.ones((3, 32), jnp.bfloat16), packed)
  assert not cpu_matmul.packable(64, 96) and not cpu_matmul.packable(63, 64)
  assert cpu_matmul.packable(576, 960)


@pytest.fixture
def kernel_on(monkeypatch):
  """'auto' as on one CPU device with the kernel (the suite has 8 fake devices)."""
  monkeypatch.setattr(cpu_matmul, '_auto', lambda dtype_name: dtype_name == 'bfloat16')


@pytest.mark.parametrize('scan_layers', [False, True])
def test_sampling_with_the_kernel_equals_the_full_forward(shallow_smollm2, kernel_on,
                                                          scan_layers):
  """Decoding on the kernel, over per-layer and stacked weights: the
  temperature-1 log-probs of what it samples are the trainer's (XLA's
  matmuls over the whole sequence), to test_sampling's bfloat16 bounds
  (decoding one token at a time rounds differently from a full forward)."""
  model = hf.load(shallow_smollm2, dtype='bfloat16')
  layers = model.decode_layers(scan_layers)
  layer0 = {name: value[0] for name, value in layers.items()} if scan_layers else layers[0]
  assert cpu_matmul.is_packed(layer0['qkv']) and cpu_matmul.is_packed(layer0['down'])
  assert cpu_matmul.is_packed(model.head()[0])
  tokenizer = Tokenizer.from_dir(shallow_smollm2)
  prompts = [tokenizer.encode_chat([{'role': 'user', 'content': text}],
                                   add_generation_prompt=True).ids
             for text in ('What is 12 * 7?', 'Name a prime number.', 'Hi')]
  tokens, mask = sampling.left_pad(prompts, tokenizer.pad_id)
  settings = sampling.SamplingConfig(max_new_tokens=16, temperature=1.0, num_samples=2,
                                     stop_ids=tokenizer.stop_ids, scan_layers=scan_layers)
  out = jax.device_get(sampling.generate(model, tokens, mask, settings, jax.random.key(3),
                                         **(dict(cache_dtype='bfloat16') if scan_layers else {})))
  errors = []
  for row in range(6):
    completion = out.tokens[row][out.mask[row] == 1].tolist()
    ids = np.asarray(prompts[row // 2] + completion)[None]
    logits = model(ids, np.arange(ids.shape[1])[None], np.ones_like(ids))
    full = np.asarray(ops.token_logprobs(logits, jnp.asarray(ids[:, 1:])))[0, len(prompts[row // 2]) - 1:]
    errors.append(np.abs(full - out.logprobs[row, :len(completion)]))
  errors = np.concatenate(errors)
  assert len(errors) >= 30
  assert errors.max() <= 0.4 and np.median(errors) <= 0.03, (errors.max(), np.median(errors))


def test_where_auto_packs(kernel_on):
  """bfloat16 only, 'xla' never, and a kernel whose output columns are not
  whole blocks of 64 stays as it is."""
  assert cpu_matmul.packs_for_decoding('auto', jnp.bfloat16)
  assert not cpu_matmul.packs_for_decoding('auto', jnp.float32)
  assert not cpu_matmul.packs_for_decoding('xla', jnp.bfloat16)
  with pytest.raises(ValueError, match="decode_matmul='cpu'"):
    cpu_matmul.packs_for_decoding('cpu', jnp.bfloat16)
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=2, num_kv_heads=1, dtype='bfloat16')
  assert decoder._for_decoding(jnp.zeros((2, 64, 128), jnp.bfloat16), cfg).ndim == 4 + 1
  assert decoder._for_decoding(jnp.zeros((2, 64, 96), jnp.bfloat16), cfg).shape == (2, 64, 96)
  off = dataclasses.replace(cfg, decode_matmul='xla')
  assert decoder._for_decoding(jnp.zeros((2, 64, 128), jnp.bfloat16), off).shape == (2, 64, 128)
  with pytest.raises(ConfigError, match='decode_matmul'):
    dataclasses.replace(cfg, decode_matmul='kernel')


def test_on_several_devices_auto_keeps_xla():
  """A packed weight is not sharded: on a mesh (this suite's 8 devices)
  decoding keeps XLA's matmuls."""
  assert jax.device_count() > 1
  assert not cpu_matmul.packs_for_decoding('auto', jnp.bfloat16)


def test_without_a_compiler_auto_says_why_and_decodes_on_xla(tmp_path):
  """A fresh cache and no compiler, on one device: 'auto' says once why
  not, and decoding runs on XLA's matmuls."""
  script = (
      'import jax, jax.numpy as jnp\n'
      'from jpost.models import cpu_matmul\n'
      'print("packs:", cpu_matmul.packs_for_decoding("auto", jnp.bfloat16),'
      ' cpu_matmul.packs_for_decoding("auto", jnp.bfloat16))\n'
      'print("reason:", cpu_matmul.unavailable_reason())\n')
  env = dict(os.environ, CXX=str(tmp_path / 'no-such-compiler'), JPOST_CACHE=str(tmp_path),
             XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=env, timeout=120)
  assert result.returncode == 0, result.stderr
  assert 'packs: False False' in result.stdout, result.stdout
  assert 'no-such-compiler' in result.stdout, result.stdout
  assert result.stderr.count('decoding matmul kernel is not available') == 1, result.stderr
