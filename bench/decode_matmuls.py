"""A decode step's weight matmuls alone: jpost's CPU kernel against XLA's.

  python bench/decode_matmuls.py [--rows 1,16,32,128] [--shape smollm2-135m] [--repeats 9]

One jitted chain through every layer's matmuls in a decode step's order
(q/k/v joined, o, gate/up joined, down; bfloat16 weights of random values)
and the LM head, each matmul's input the previous one's output cut or
tiled to width, as the decode loop runs them one after another: once on
XLA's bfloat16 matmul with float32 accumulation (what `decoder.dense`
asks XLA for), once on
the kernel over weights packed once (`models/cpu_decode.py`). Prints the
median milliseconds a step, GFLOP/s and the rate the weights stream at
(GB/s of bfloat16 weights read); the last line is one JSON object.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import common
from jpost.models import cpu_decode, shapes


def layer_shapes(cfg) -> list[tuple[int, int]]:
  """(K, N) of a layer's decode matmuls: qkv, o, gate_up, down."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
  qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * h
  return [(d, qkv), (cfg.num_heads * h, d), (d, 2 * f), (f, d)]


def weights(cfg) -> list[jax.Array]:
  key = jax.random.key(0)
  out = []
  for _ in range(cfg.num_layers):
    for k, n in layer_shapes(cfg):
      key, sub = jax.random.split(key)
      out.append((jax.random.normal(sub, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16))
  head = jax.random.normal(key, (cfg.hidden_size, cfg.vocab_size), jnp.float32)
  return out + [(head * cfg.hidden_size ** -0.5).astype(jnp.bfloat16)]


def chain(x, ws, matmul):
  """Each matmul on the previous output, cut or tiled to its input width."""
  for w in ws:
    k = w.shape[0] if w.ndim == 2 else 2 * w.shape[1]
    if x.shape[-1] < k:
      x = jnp.tile(x, (1, -(-k // x.shape[-1])))
    x = matmul(x[:, :k], w)
  return x


def time_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tic)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rows', default='1,16,32,128')
  parser.add_argument('--shape', default='smollm2-135m')
  parser.add_argument('--repeats', type=int, default=9)
  args = parser.parse_args()
  reason = cpu_decode.unavailable_reason()
  if reason is not None:
    raise SystemExit(f'the kernel is not available here: {reason}')
  cfg = shapes.config(args.shape)
  ws = weights(cfg)
  packed = [cpu_decode.pack(w) for w in ws]
  params = sum(w.size for w in ws)  # each read once a step (2 bytes), 2 FLOPs a row each
  xla = jax.jit(lambda x, ws: chain(x, ws, lambda a, w: jnp.dot(
      a, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)))
  kernel = jax.jit(lambda x, ws: chain(x, ws, cpu_decode.matmul))
  results = []
  for rows in map(int, args.rows.split(',')):
    x = jax.random.normal(jax.random.key(rows), (rows, cfg.hidden_size), jnp.bfloat16)
    for name, fn, operands in (('xla', xla, ws), ('kernel', kernel, packed)):
      ms = time_ms(fn, (x, operands), args.repeats)
      result = {'rows': rows, 'matmul': name, 'ms': round(ms, 2),
                'gflops': round(2 * params * rows / ms / 1e6, 1),
                'weights_gb_per_s': round(2 * params / ms / 1e6, 1)}
      results.append(result)
      print(f"{args.shape} {rows} rows, {name}: {result['ms']} ms a step, "
            f"{result['gflops']} GFLOP/s, weights at {result['weights_gb_per_s']} GB/s", flush=True)
  print(json.dumps({'machine': common.machine(), 'shape': args.shape, 'results': results}))


if __name__ == '__main__':
  main()
