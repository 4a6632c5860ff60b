"""Where a training step's time goes, by XLA operation kind, from JAX's profiler.

  python bench/profile_step.py [--dtype bfloat16] [--remat [full|dots|none]] [--batch 8]
      [--seq-len 256] [--by-source]

Runs the SFT step of a randomly initialised SmolLM2-135M-shaped model (as
`sft_throughput.py --random-init`), profiles one warm step and prints the
thread time of each operation kind (XLA's fusion names without their
numbers: `ynn_fusion` are YNNPACK's matmul fusions on CPU), largest first.
Thread time on a multi-threaded CPU adds up to more than the step's wall
time, and leaves out the helper threads a matmul splits its work over; the
CPU time of the process over the step's wall time says how many cores were
busy. `--by-source` adds the same time by where it came from: the forward
or backward scan over the layers or outside it, matmul or not, and the JAX
source of each operation (from the compiled step's HLO metadata).
"""

import argparse
import collections
import gzip
import json
import pathlib
import re
import resource
import tempfile
import time

import jax

import common
from jpost import sharding
from jpost.trainers import loop
from sft_throughput import synthetic_batches

# Profiler spans that wrap the operations rather than being one.
_WRAPPERS = ('ThunkExecutor', '$', 'SlinkyThreadPool')


def _operations(trace_dir: str) -> list[dict]:
  """The operation spans ('X' events, wrappers left out) of the perfetto
  trace under `trace_dir`."""
  path = next(pathlib.Path(trace_dir).rglob('perfetto_trace.json.gz'))
  trace = json.load(gzip.open(path))
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [e for e in events
          if e.get('ph') == 'X' and 'dur' in e and not e['name'].startswith(_WRAPPERS)]


def thread_time_by_kind(trace_dir: str) -> collections.Counter:
  """Microseconds per operation kind in the perfetto trace under `trace_dir`."""
  kinds = collections.Counter()
  for event in _operations(trace_dir):
    kinds[re.sub(r'\.\d+$', '', event['name'])] += event['dur']
  return kinds


def thread_time_by_source(trace_dir: str, compiled_hlo: str) -> collections.Counter:
  """Microseconds per (loop, kind, source) of the step: each operation's
  name looked up in the compiled HLO for the JAX source it came from
  (`op_name`). The loop is the forward or backward scan over the layers, or
  outside them; the kind is a YNNPACK matmul, another YNNPACK operation (a
  reduction) or XLA's own (elementwise, copies); the source is the tail of
  the op_name (an einsum's equation, a primitive). Some fusions carry no
  op_name: their loop shows as 'no source'."""
  sources = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', compiled_hlo,
                            re.M))
  by = collections.Counter()
  for event in _operations(trace_dir):
    source = sources.get(event['name'], '')
    loop = ('no source' if not source  # fusions XLA made without an op_name
            else 'outside' if '/while' not in source
            else 'backward loop' if 'transpose(' in source.split('/while')[0] else 'forward loop')
    ynn = event['name'].startswith('ynn')
    kind = ('matmul' if ynn and 'dot_general' in source else 'ynn other' if ynn
            else re.sub(r'\.\d+$', '', event['name']))
    by[loop, kind, '/'.join(source.split('/')[-2:])] += event['dur']
  return by


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process, all threads (a matmul's
  helper threads are busy without appearing as operations in the trace)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--remat', nargs='?', const='full', default='none',
                      choices=('full', 'dots', 'none'), help='policy (bare: full)')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq-len', type=int, default=256)
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--by-source', action='store_true',
                      help='also attribute thread time to (loop, kind, JAX source)')
  args = parser.parse_args()
  mesh = sharding.make_mesh()
  model = common.load_model(random_init=True, mesh=mesh, dtype=args.dtype, remat=args.remat)
  step, state = common.sft_step(model, mesh, 10)
  batches = synthetic_batches(args.batch, args.seq_len, model.config.vocab_size)

  def run_step():
    nonlocal state
    state, out = step(state, loop.place_batch(next(batches), mesh))
    jax.block_until_ready(out['loss'])

  for _ in range(2):  # compile, then one warm step
    run_step()
  cpu_before, start = _cpu_seconds(), time.perf_counter()
  run_step()
  wall = time.perf_counter() - start
  cores = (_cpu_seconds() - cpu_before) / wall
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run_step()
    kinds = thread_time_by_kind(trace_dir)
    if args.by_source:
      batch = loop.place_batch(next(batches), mesh)
      by_source = thread_time_by_source(trace_dir, step.lower(state, batch).compile().as_text())
  total = sum(kinds.values())
  print(f'warm step {wall:.2f} s wall, {cores:.2f} cores busy on average; '
        f'{total / 1e6:.2f} s of operation thread time')
  for kind, us in kinds.most_common(args.top):
    print(f'{us / 1e3:9.1f} ms {100 * us / total:5.1f}%  {kind}')
  if args.by_source:
    print('by loop, kind and source:')
    for (where, kind, source), us in by_source.most_common(args.top):
      print(f'{us / 1e3:9.1f} ms {100 * us / total:5.1f}%  {where:13s} {kind:28s} {source}')
  print(json.dumps({'machine': common.machine(), 'dtype': args.dtype, 'remat': args.remat,
                    'batch': args.batch, 'seq_len': args.seq_len, 'step_s': round(wall, 3),
                    'cores_busy': round(cores, 2), 'thread_s': round(total / 1e6, 3),
                    'by_kind_ms': {k: round(v / 1e3, 1) for k, v in kinds.most_common(args.top)}}))


if __name__ == '__main__':
  main()
