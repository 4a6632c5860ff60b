"""Attention implementations side by side on the machine at hand: relative
error of output and gradients against the materialised reference ('xla',
float32), and forward+backward time, on packed rows with left padding.

  python bench/attention_check.py [--batch 2] [--seq-len 2048] [--heads 32] [--kv-heads 8]
      [--head-dim 64] [--block 512] [--impls xla,blockwise,pallas,cudnn,cpu] [--interpret]

'pallas' runs the GPU kernel (on CPU only with --interpret, slowly); 'cudnn'
needs a GPU and runs in bfloat16 only; 'cpu', jpost's fused CPU kernel,
runs in bfloat16 only (`bench/cpu.sh` times it against 'blockwise' at
SmolLM2's heads). A kernel that fails is reported and
the others still run. The last line is one JSON object.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpost.models import attention as attn


def rows(batch: int, t: int):
  """Every row: 16 tokens of left padding, then packed segments of 3/8, 1/8, the rest."""
  seg, pos = np.zeros((batch, t), np.int32), np.zeros((batch, t), np.int32)
  bounds = [16, 16 + 3 * (t - 16) // 8, 16 + 4 * (t - 16) // 8, t]
  for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), 1):
    seg[:, a:b], pos[:, a:b] = s, np.arange(b - a)
  return jnp.asarray(pos), jnp.asarray(seg)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--seq-len', type=int, default=2048)
  parser.add_argument('--heads', type=int, default=32)
  parser.add_argument('--kv-heads', type=int, default=8)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--block', type=int, default=512)
  parser.add_argument('--impls', default='xla,blockwise,pallas')
  parser.add_argument('--interpret', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  b, t, n, k, h = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim
  pos, seg = rows(b, t)
  visible = attn.Visibility(pos, seg, pos, seg)
  rng = np.random.default_rng(0)
  inputs = [jnp.asarray(rng.normal(size=s), jnp.float32)
            for s in ((b, t, n, h), (b, k, h, t), (b, k, t, h))]
  real = np.asarray(seg) > 0
  weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * real[..., None, None]

  def impl(name):
    if name == 'xla':
      return lambda q, kk, v: attn.dense_attention(q, kk, v, visible.dense_mask())
    if name == 'pallas':
      return lambda q, kk, v: attn.pallas_attention(q, kk, v, visible, interpret=args.interpret)
    if name == 'cudnn':
      return lambda q, kk, v: attn.cudnn_attention(q, kk, v, visible, max_segments=8)
    if name == 'cpu':
      return lambda q, kk, v: attn.attend(q, kk, v, visible, implementation='cpu',
                                          block=args.block)
    return lambda q, kk, v: attn.blockwise_attention(q, kk, v, visible, block=args.block)

  def value_and_grads(fn, dtype):
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*(x.astype(dtype) for x in inputs))

  rel = lambda a, r: float(jnp.linalg.norm((a - r).astype(jnp.float32)) /
                           jnp.linalg.norm(r.astype(jnp.float32)))
  _, ref = value_and_grads(impl('xla'), jnp.float32)
  ref_out = impl('xla')(*inputs)

  def check(name, dtype):
    fn = impl(name)
    out = jax.jit(fn)(*(x.astype(dtype) for x in inputs))
    out_err = rel(np.asarray(out, np.float32)[real], np.asarray(ref_out)[real])
    _, grads = value_and_grads(fn, dtype)
    grad_errs = [rel(g, r) for g, r in zip(grads, ref)]  # dq, dk, dv
    grad_err = max(grad_errs)
    step = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights),
                            argnums=(0, 1, 2)))
    x = [v.astype(dtype) for v in inputs]
    jax.block_until_ready(step(*x))
    times = []
    for _ in range(args.repeats):
      tic = time.perf_counter()
      jax.block_until_ready(step(*x))
      times.append(time.perf_counter() - tic)
    ms = 1e3 * statistics.median(times)
    nan = [int(jnp.isnan(g.astype(jnp.float32)).sum()) for g in grads]
    print(f'{name:9s} {jnp.dtype(dtype).name:8s} output err {out_err:.1e}, grads err '
          f'{grad_err:.1e} (dq/dk/dv {"/".join(f"{e:.1e}" for e in grad_errs)}; NaNs '
          f'{"/".join(map(str, nan))}; vs xla float32), forward+backward {ms:.1f} ms', flush=True)
    return {'impl': name, 'dtype': jnp.dtype(dtype).name, 'output_rel_err': out_err,
            'grad_rel_err': grad_err, 'grad_rel_errs': grad_errs, 'grad_nans': nan,
            'fwd_bwd_ms': round(ms, 2)}

  results = []
  for name in args.impls.split(','):
    # cuDNN and the CPU kernel: 16-bit only.
    for dtype in (jnp.float32, jnp.bfloat16)[name in ('cudnn', 'cpu'):]:
      try:
        results.append(check(name, dtype))
      except Exception as error:  # one failing kernel must not hide the others' figures
        results.append({'impl': name, 'dtype': jnp.dtype(dtype).name,
                        'failed': f'{type(error).__name__}: {str(error)[:300]}'})
        print(f'{name:9s} {jnp.dtype(dtype).name:8s} failed: {results[-1]["failed"]}',
              flush=True)
  print(json.dumps({'device': jax.devices()[0].device_kind, 'jax': jax.__version__, 'batch': b,
                    'seq_len': t, 'heads': n, 'kv_heads': k, 'head_dim': h,
                    'cudnn_gqa_without_repeat': attn.cudnn_offsets_follow_key_heads(),
                    'results': results}))


if __name__ == '__main__':
  main()
