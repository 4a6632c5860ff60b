"""XLA flags for every process of the suite: this one, `jpost.main`
subprocesses and notebook kernels.

The suite compiles hundreds of small programs and runs each a few times, so
XLA compilation is most of its time. Two flags make XLA:CPU compile faster:
LLVM's optimisation level 0, and XLA's older elemental emitters in place of
its fusion emitters. The tiny models' steps still run in a fraction of a
second, and the matmuls keep their library kernels (figures: bench/RESULTS.md,
the `make test` rows). Users' runs keep XLA's defaults; only the tests set
these.
"""

import os
import subprocess
import sys

# Each flag is kept only if this XLA knows it (XLA aborts on an unknown flag,
# and a newer jax may drop one), probed once per session.
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
_KNOWN_ENV = 'JPOST_TEST_XLA_FAST_COMPILE'


def _known(flag: str) -> bool:
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                         env={**os.environ, 'XLA_FLAGS': flag, 'JAX_PLATFORMS': 'cpu'},
                         capture_output=True, timeout=120)
  return probe.returncode == 0


def fast_compile() -> str:
  """The FAST_COMPILE flags this XLA knows; the session's first call probes
  them and leaves the answer in the environment for the other processes."""
  if _KNOWN_ENV not in os.environ:
    os.environ[_KNOWN_ENV] = ' '.join(flag for flag in FAST_COMPILE if _known(flag))
  return os.environ[_KNOWN_ENV]


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process with `devices` fake CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {fast_compile()}'


def env(devices: int, **extra: str) -> dict:
  """This process's environment for a subprocess on `devices` CPU devices."""
  return {**os.environ, 'XLA_FLAGS': xla_flags(devices), **extra}
