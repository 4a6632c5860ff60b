"""Set-up shared by the benchmarks: the real SmolLM2-135M-Instruct, or a
randomly initialised model of exactly its shape (`--random-init`, for machines
that cannot fetch the weights; speed does not depend on weight values), and
the machine a figure was measured on."""

import os
import pathlib
import platform

from jpost.models import hf, pretrained, shapes
from jpost.models.config import cpu_flags

# SmolLM2-135M's config.json, as read from its GGUF.
SMOLLM2_135M = shapes.SHAPES['smollm2-135m']


def recipe_config(name: str):
  """configs/NAME.py's config, as shipped (configs are loaded by path, not
  as a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      f'{name}_config', pathlib.Path(__file__).resolve().parents[1] / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def load_model(*, random_init: bool, mesh=None, shape: str = 'smollm2-135m', **overrides):
  """The real SmolLM2-135M-Instruct, or a random model of a named shape
  (jpost.models.shapes; any shape but SmolLM2's is random)."""
  if random_init or shape != 'smollm2-135m':
    return shapes.init(shapes.config(shape, **overrides), mesh=mesh)
  return hf.load(pretrained.resolve('smollm2-135m-instruct'), mesh=mesh, **overrides)


def machine() -> dict:
  """What a figure was measured on: the CPU (model, logical cores, those
  this process may use, hardware threads per physical core, AMX and
  AVX512-BF16, whose kernels set a bfloat16 step's speed), the JAX device,
  and the measured bfloat16 matmul peak (float32-accumulating, the MFU
  denominator). Two logical cores that are one physical core's two threads
  share its matmul units (AMX's tiles among them)."""
  import jax

  from jpost import metrics
  info = {'cpu': platform.processor() or platform.machine(), 'cores': None,
          'amx_bf16': False, 'avx512_bf16': False, 'device': jax.devices()[0].device_kind}
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if cpuinfo.exists():
    lines = cpuinfo.read_text().splitlines()
    names = [line.split(':', 1)[1].strip() for line in lines if line.startswith('model name')]
    flags = cpu_flags()
    info.update(cpu=names[0] if names else info['cpu'], cores=len(names) or None,
                threads_per_core=_threads_per_core(lines),
                amx_bf16='amx_bf16' in flags, avx512_bf16='avx512_bf16' in flags)
  # The logical CPUs this process may run on (fewer under taskset): what
  # XLA's thread pool and the measured peak below use.
  info['cpus_used'] = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  info['peak_bf16_gflops'] = round(metrics.measured_peak_flops('bfloat16') / 1e9, 1)
  return info


def _threads_per_core(cpuinfo_lines: list[str]) -> int | None:
  """'siblings' (logical CPUs per package) over 'cpu cores' (physical cores
  per package) of /proc/cpuinfo, where both are given (x86)."""
  fields = dict(line.split(':', 1) for line in cpuinfo_lines if ':' in line)
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  try:
    return int(fields['siblings']) // int(fields['cpu cores'])
  except (KeyError, ValueError, ZeroDivisionError):
    return None


def time_steps(step, state, batches, mesh, count: int):
  """Runs `count` steps on host batches from the iterator `batches`: the
  last metrics, each step's seconds (the first includes compilation) and
  each batch's real (non-padding) token count and `metrics.attended_length`."""
  import time

  import jax

  from jpost import metrics
  from jpost.trainers import loop
  times, tokens, contexts = [], [], []
  for _ in range(count):
    host = next(batches)
    tic = time.perf_counter()
    state, out = step(state, loop.place_batch(host, mesh))
    jax.block_until_ready(out['loss'])
    times.append(time.perf_counter() - tic)
    tokens.append(int((host['segment_ids'] > 0).sum()))
    contexts.append(metrics.attended_length(host['segment_ids']))
  return out, times, tokens, contexts


def sft_step(model, mesh, total_steps: int, max_len: int | None = None):
  """The SFT recipe's jitted train step (AdamW, clip 1.0, token-normalised
  loss, state donated) and its initial state, as the benches time it;
  `max_len`: the recipe's data.max_len, for padding-free rows (sft.loss_fn)."""
  import functools

  import ml_collections

  from jpost import optim
  from jpost.trainers import loop, sft
  tx, schedule = optim.build(ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-5, warmup_steps=0, schedule='constant', end_lr_ratio=1.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)), total_steps)
  graphdef, state = loop.init_state(model, tx, 0, mesh)
  step = loop.make_update(graphdef,
                          functools.partial(sft.loss_fn, normalization='token', max_len=max_len),
                          functools.partial(sft.normalizer_fn, normalization='token'), tx,
                          schedule, accum_steps=1, mesh=mesh, state=state)
  return step, state
