"""Where a training step's time goes, by XLA operation kind, from JAX's profiler.

  python bench/profile_step.py [--dtype bfloat16] [--remat [full|dots|none]] [--batch 8]
      [--seq-len 256] [--logits-chunk 32] [--attention-block 512] [--synthetic] [--by-source]
      [--ops] [--matmuls]

Runs the SFT step of a randomly initialised SmolLM2-135M-shaped model, with
configs/sft.py's settings (bfloat16, remat 'dots', its head and attention), on
packed GSM8K rows (as `sft_throughput.py`; `--synthetic`: random rows, as
`sft_throughput.py --random-init`), profiles one warm step and prints the
thread time of each operation kind (XLA's fusion names without their
numbers: `ynn_fusion` are YNNPACK's matmul fusions on CPU), largest first.
Thread time on a multi-threaded CPU adds up to more than the step's wall
time, and leaves out the helper threads a matmul splits its work over; the
CPU time of the process over the step's wall time says how many cores were
busy. `--by-source` adds the same time by where it came from: the forward
or backward scan over the layers or outside it, matmul or not, and the JAX
source of each operation (from the compiled step's HLO metadata).
`--ops` lists the other operations one by one (each HLO instruction's
result shape, calls, thread time and source), largest first.
`--matmuls` lists each matmul fusion with its operand shapes, calls, thread
time and FLOP rate (from the HLO's dot shapes), and splits the step's wall
time between matmuls and the rest (each instant shared among the operations
running then; two matmuls that overlap each show half the rate they had).
"""

import argparse
import collections
import gzip
import json
import math
import pathlib
import re
import resource
import tempfile
import time

import jax

import common
from jpost import host, sharding
from jpost.models import lora
from jpost.trainers import loop
from sft_throughput import gsm8k_batches, recipe_packing, synthetic_batches

# Profiler spans that wrap the operations rather than being one.
_WRAPPERS = ('ThunkExecutor', '$', 'SlinkyThreadPool')


def _operations(trace_dir: str) -> list[dict]:
  """XLA's operation spans ('X' events) of the perfetto trace under
  `trace_dir`: without the wrappers around them and without host-side spans
  (a Python call such as `PjitFunction(step)`, the runtime's
  `...::ExecuteHelper...`), which would count as operation thread time."""
  path = next(pathlib.Path(trace_dir).rglob('perfetto_trace.json.gz'))
  trace = json.load(gzip.open(path))
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [e for e in events
          if e.get('ph') == 'X' and 'dur' in e and not e['name'].startswith(_WRAPPERS)
          and '(' not in e['name'] and '::' not in e['name']]


def thread_time_by_kind(trace_dir: str) -> collections.Counter:
  """Microseconds per operation kind in the perfetto trace under `trace_dir`."""
  kinds = collections.Counter()
  for event in _operations(trace_dir):
    kinds[re.sub(r'\.\d+$', '', event['name'])] += event['dur']
  return kinds


def _op_sources(compiled_hlo: str) -> dict[str, str]:
  """{HLO instruction name: the JAX source of it (its op_name)}."""
  return dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', compiled_hlo,
                         re.M))


def thread_time_by_source(trace_dir: str, compiled_hlo: str) -> collections.Counter:
  """Microseconds per (loop, kind, source) of the step: each operation's
  name looked up in the compiled HLO for the JAX source it came from
  (`op_name`). The loop is the forward or backward scan over the layers, or
  outside them; the kind is a YNNPACK matmul, another YNNPACK operation (a
  reduction) or XLA's own (elementwise, copies); the source is the tail of
  the op_name (an einsum's equation, a primitive). Some fusions carry no
  op_name: their loop shows as 'no source'."""
  sources = _op_sources(compiled_hlo)
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


def print_operations(trace_dir: str, compiled_hlo: str, top: int) -> None:
  """The non-matmul operations one by one: thread time, calls, the HLO
  instruction's result type and its JAX source."""
  result_types = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ', compiled_hlo, re.M))
  sources = _op_sources(compiled_hlo)
  dots = dot_flops(compiled_hlo)
  calls, thread_us = collections.Counter(), collections.Counter()
  for event in _operations(trace_dir):
    if event['name'] not in dots:
      calls[event['name']] += 1
      thread_us[event['name']] += event['dur']
  print('other operations by thread time:')
  for name, us in thread_us.most_common(top):
    source = '/'.join(sources.get(name, '').split('/')[-3:])
    print(f'{us / 1e3:8.1f} ms x{calls[name]:3d}  {name:40s} {result_types.get(name, "?"):36s} {source}')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(',') if d]


def dot_flops(compiled_hlo: str) -> dict[str, tuple[float, str]]:
  """{fusion name: (FLOPs of one call, 'lhs x rhs -> out' shapes)} for every
  fusion of the compiled HLO whose computation holds dots."""
  bodies, current = {}, None
  for line in compiled_hlo.splitlines():
    opening = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$', line)
    if opening:
      current = bodies.setdefault(opening.group(1), [])
    elif current is not None:
      current.append(line)
  out = {}
  for fusion, computation in re.findall(r'%([\w.\-]+) = [^\n]*?calls=%([\w.\-]+)', compiled_hlo):
    body = '\n'.join(bodies.get(computation, ()))
    shapes = dict(re.findall(r'%([\w.\-]+) = \w+\[([\d,]*)\]', body))
    flops, described = 0.0, []
    for result, lhs, rhs, contracting in re.findall(
        r'= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\).*?lhs_contracting_dims=\{([\d,]*)\}',
        body):
      lhs_dims = _dims(shapes[lhs])
      flops += 2 * math.prod(_dims(result)) * math.prod(lhs_dims[i] for i in _dims(contracting))
      described.append(f'{lhs_dims} x {_dims(shapes[rhs])} -> {_dims(result)}')
    if flops:
      out[fusion] = (flops, '; '.join(described))
  return out


def wall_shares(operations: list[dict]) -> collections.Counter:
  """Microseconds of wall time per operation name, each instant shared
  equally among the operations running then."""
  edges = sorted([(e['ts'], 1, i) for i, e in enumerate(operations)]
                 + [(e['ts'] + e['dur'], -1, i) for i, e in enumerate(operations)])
  running, last, shares = set(), edges[0][0], collections.Counter()
  for ts, kind, i in edges:
    for j in running:
      shares[operations[j]['name']] += (ts - last) / len(running)
    last = ts
    (running.add if kind == 1 else running.discard)(i)
  return shares


def print_matmuls(trace_dir: str, compiled_hlo: str, top: int) -> dict:
  """Prints the matmuls' share and rates; returns the share's figures."""
  operations = _operations(trace_dir)  # XLA's own: host spans would take wall shares
  dots = dot_flops(compiled_hlo)
  calls, thread_us = collections.Counter(), collections.Counter()
  for event in operations:
    calls[event['name']] += 1
    thread_us[event['name']] += event['dur']
  shares = wall_shares(operations)
  span = max(e['ts'] + e['dur'] for e in operations) - min(e['ts'] for e in operations)
  matmul_wall = sum(us for name, us in shares.items() if name in dots)
  flops = sum(dots[name][0] * calls[name] for name in dots if calls[name])
  print(f'profiled step {span / 1e6:.2f} s: matmuls {matmul_wall / 1e6:.2f} s of its wall time '
        f'({flops / 1e9:.0f} GFLOP, {flops / matmul_wall / 1e3:.0f} GFLOP/s), other operations '
        f'{(sum(shares.values()) - matmul_wall) / 1e6:.2f} s')
  print('matmul fusions by thread time (GFLOP/s per second of thread time):')
  for name, us in sorted(((n, thread_us[n]) for n in dots if calls[n]), key=lambda x: -x[1])[:top]:
    print(f'{us / 1e3:8.1f} ms x{calls[name]:3d} {dots[name][0] * calls[name] / us / 1e3:6.0f} '
          f'GFLOP/s  {dots[name][1]}')
  return {'profiled_step_s': round(span / 1e6, 3), 'matmul_wall_s': round(matmul_wall / 1e6, 3),
          'matmul_gflop': round(flops / 1e9), 'matmul_gflops': round(flops / matmul_wall / 1e3)}


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process, all threads (a matmul's
  helper threads are busy without appearing as operations in the trace)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main():
  host.restart_with_huge_pages('sft')  # as `python -m jpost.main` runs SFT (jpost/host.py)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--remat', nargs='?', const='full', default='dots',
                      choices=('full', 'dots', 'none'),
                      help="policy (bare: full; default: configs/sft.py's)")
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq-len', type=int, default=256)
  parser.add_argument('--logits-chunk', type=int, default=32, help="configs/sft.py's")
  parser.add_argument('--attention-block', type=int, default=512, help="configs/sft.py's")
  parser.add_argument('--synthetic', action='store_true',
                      help='random packed rows (sft_throughput.py --random-init) instead of GSM8K')
  parser.add_argument('--lora-rank', type=int, default=0,
                      help='LoRA adapters of this rank on every kernel (alpha 2 x rank)')
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--by-source', action='store_true',
                      help='also attribute thread time to (loop, kind, JAX source)')
  parser.add_argument('--ops', action='store_true',
                      help='also list the other operations one by one, with shapes and sources')
  parser.add_argument('--matmuls', action='store_true',
                      help="also list the matmuls' shapes and rates, and their share of the wall time")
  args = parser.parse_args()
  mesh = sharding.make_mesh()
  adapters = ({'lora': lora.LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)}
              if args.lora_rank else {})
  model = common.load_model(random_init=True, mesh=mesh, dtype=args.dtype, remat=args.remat,
                            logits_chunk=args.logits_chunk, attention_block=args.attention_block,
                            **adapters)
  step, state = common.sft_step(model, mesh, 10, max_len=args.seq_len)
  if args.synthetic:
    batches = synthetic_batches(args.batch, args.seq_len, model.config.vocab_size)
  else:  # the real batches' target tokens decide how much reaches the LM head
    # Laid out as the recipe lays them out (padding-free where it packs so).
    batches = gsm8k_batches(args.batch, args.seq_len,
                            **recipe_packing(model.config, args.batch, args.seq_len, 'auto'))

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
    if args.by_source or args.matmuls or args.ops:
      compiled_hlo = step.lower(state, loop.place_batch(next(batches), mesh)).compile().as_text()
    if args.by_source:
      by_source = thread_time_by_source(trace_dir, compiled_hlo)
    if args.ops:
      print_operations(trace_dir, compiled_hlo, args.top)
    matmuls = print_matmuls(trace_dir, compiled_hlo, args.top) if args.matmuls else None
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
                    'by_kind_ms': {k: round(v / 1e3, 1) for k, v in kinds.most_common(args.top)},
                    **({'matmuls': matmuls} if matmuls else {})}))


if __name__ == '__main__':
  main()
