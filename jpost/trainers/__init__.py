"""Recipes by name: `config.trainer` picks one, `run(config, workdir)` runs it."""

from __future__ import annotations

import importlib
from typing import Callable

from jpost.errors import ConfigError

_RECIPES: dict[str, Callable] = {}
# Recipes whose imports are heavy (a web server), imported only when asked for.
_ON_DEMAND = {'serve': 'jpost.serve.recipe'}


def register(name: str):
  """Decorator adding a `run(config, workdir)` function under `name`."""
  def add(fn):
    if name in _RECIPES:
      raise ValueError(f'recipe {name!r} is registered twice.')
    _RECIPES[name] = fn
    return fn
  return add


def get(name: str) -> Callable:
  _load_builtin()
  if name in _ON_DEMAND:
    importlib.import_module(_ON_DEMAND[name])
  if name not in _RECIPES:
    raise ConfigError(
        f'config.trainer={name!r} is not a known recipe; known recipes: {names()}.')
  return _RECIPES[name]


def names() -> list[str]:
  _load_builtin()
  return sorted(set(_RECIPES) | set(_ON_DEMAND))


def _load_builtin():
  # Imported here, not at package import, so `jpost.trainers` stays light.
  from jpost.trainers import (chat, curate, dpo, evaluate, generate, online, pairs,  # noqa: F401
                              prm, prm_labels, reward, sft)
