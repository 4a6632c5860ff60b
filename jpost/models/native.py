"""jpost's C++ kernels for XLA:CPU (cpu_attention.cc, cpu_matmul.cc,
cpu_decode_attention.cc, and what they share in cpu_kernels.h): built on
first use with the machine's C++ compiler (`$CXX`, else `c++`) for the
machine's own instructions, cached in the jpost cache
(`$JPOST_CACHE/kernels`) under a hash of the source, the headers beside it,
the flags, jaxlib's version and the processor, and registered as XLA FFI
targets. `unavailable_reason` says why a kernel cannot run here (no
compiler, a CPU without the instructions it needs), so its caller can fall
back to XLA's own operations and say so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax

SOURCES = pathlib.Path(__file__).parent
FLAGS = ('-O3', '-march=native', '-mprefer-vector-width=512', '-fopenmp-simd',
         '-fno-math-errno', '-std=c++17', '-shared', '-fPIC', '-w')


class KernelUnavailable(RuntimeError):
  """A kernel could not be built or loaded here (the message says why)."""


def _compiler() -> str | None:
  return os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')


def _machine() -> str:
  """The processor a `-march=native` build is for: a cache shared between
  machines (a network home, an image) must not hand one CPU's build to another."""
  import platform
  try:
    with open('/proc/cpuinfo') as f:
      lines = [line for line in f if line.startswith(('model name', 'flags', 'Features'))]
    return ''.join(dict.fromkeys(lines))  # each distinct line once
  except OSError:
    return platform.processor() + platform.machine()


def _library_path(source: pathlib.Path, compiler: str) -> pathlib.Path:
  import jaxlib
  from jpost import assets
  headers = b''.join(h.read_bytes() for h in sorted(SOURCES.glob('*.h')))
  key = hashlib.sha256(source.read_bytes() + headers + ' '.join((compiler, *FLAGS)).encode()
                       + jaxlib.__version__.encode() + _machine().encode()).hexdigest()[:16]
  return assets.cache_dir() / 'kernels' / f'{source.stem}-{key}.so'


def _build(source: pathlib.Path, compiler: str, target: pathlib.Path) -> None:
  from jpost import assets
  target.parent.mkdir(parents=True, exist_ok=True)
  with assets.cache_lock('kernels'):
    if target.exists():  # another process built it meanwhile
      return
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      built = pathlib.Path(tmp) / target.name
      command = [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', f'-I{SOURCES}', str(source),
                 '-o', str(built)]
      result = subprocess.run(command, capture_output=True, text=True, timeout=300)
      if result.returncode != 0:
        raise KernelUnavailable(f'compiling {source.name} failed ({" ".join(command)}):\n'
                                f'{result.stderr.strip()[-2000:]}')
      os.replace(built, target)  # atomic: a reader never sees half a library


@functools.lru_cache(maxsize=None)
def _load(source_name: str, targets: tuple[tuple[str, str], ...]) -> None:
  """Builds (once per machine and source) `source_name` and registers each
  (FFI target name, exported symbol) of `targets`."""
  compiler = _compiler()
  if compiler is None:
    raise KernelUnavailable('no C++ compiler found (set $CXX or install g++)')
  source = SOURCES / source_name
  target = _library_path(source, compiler)
  if not target.exists():
    _build(source, compiler, target)
  library = ctypes.cdll.LoadLibrary(str(target))
  for name, symbol in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')


@functools.lru_cache(maxsize=None)
def unavailable_reason(source_name: str, targets: tuple[tuple[str, str], ...]) -> str | None:
  """None if the kernel in `source_name` is built and its `targets`
  registered here (`_load`), else why not."""
  if jax.default_backend() != 'cpu':
    return f'it runs on CPU only (the backend is {jax.default_backend()})'
  try:
    _load(source_name, targets)
  except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
    return str(e)
  return None
