"""bfloat16 matmul speed on this machine for the shapes of a SmolLM2-135M step.

  python bench/matmul_shapes.py [--tokens 1024]
  XLA_FLAGS=--xla_cpu_use_onednn=true python bench/matmul_shapes.py   # another kernel path

Prints the CPU (model, AMX and AVX512-BF16 flags), XLA_FLAGS, and GFLOP/s
(median of 5) for each (M, K, N) with float32 accumulation, as the model
multiplies. It says whether the step's dense matmuls are slow by themselves
or the time goes elsewhere (LM head, attention, elementwise work).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

import common


def gflops(m: int, k: int, n: int, runs: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  reps = max(3, int(2e10 / (2 * m * k * n)))  # ~20 GFLOP a timing
  seconds = []
  for _ in range(runs):
    start = time.perf_counter()
    for _ in range(reps):
      out = matmul(a, b)
    out.block_until_ready()
    seconds.append((time.perf_counter() - start) / reps)
  return 2 * m * k * n / sorted(seconds)[runs // 2] / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tokens', type=int, default=1024, help='rows of the activations (B x T)')
  args = parser.parse_args()
  t, d, f, v = args.tokens, 576, 1536, 49152  # SmolLM2-135M: hidden, MLP, vocabulary
  shapes = {'peak 4096^3': (4096, 4096, 4096), 'mlp up': (t, d, f), 'mlp down': (t, f, d),
            'attention out': (t, d, d), 'lm head': (t, d, v),
            'weight gradient (tokens contracted)': (d, t, f)}
  figures = {name: round(gflops(*shape), 1) for name, shape in shapes.items()}
  for name, value in figures.items():
    print(f'{name:>36} {"x".join(map(str, shapes[name])):>18}: {value:8.1f} GFLOP/s')
  print(json.dumps({'machine': common.machine(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                    'gflops': figures}))


if __name__ == '__main__':
  main()
