"""XLA flags for every process of the suite: this one, `jpost.main`
subprocesses and notebook kernels.

The suite compiles hundreds of small programs and runs each a few times, so
XLA compilation is most of its time. LLVM's optimisation passes are the
slowest part of compiling for the CPU, and at level 0 the tiny models' steps
still run in a fraction of a second, while the matmuls keep their library
kernels (figures: bench/RESULTS.md, the `make test` rows). Users' runs keep XLA's
default level; only the tests set this.
"""

import os

FAST_COMPILE = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process with `devices` fake CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}'


def env(devices: int, **extra: str) -> dict:
  """This process's environment for a subprocess on `devices` CPU devices."""
  return {**os.environ, 'XLA_FLAGS': xla_flags(devices), **extra}
