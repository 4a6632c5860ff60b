"""Device mesh and logical-axis sharding rules.

Models name the axes of every parameter and of the main activations with
logical names ('embed', 'mlp', 'q_heads', ...); one rules table maps logical
names to mesh axes ('data', 'fsdp', 'tensor'). Changing the parallelism of a
run is then a config change, not a model change.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    'batch': ('data', 'fsdp'),
    'seq': None,
    'embed': 'fsdp',
    'act_embed': None,
    'vocab': 'tensor',
    'mlp': 'tensor',
    'q_heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'layers': None,
    'norm': None,
    'lora_rank': None,  # LoRA adapters: replicated along their rank
}

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar('jpost_sharding', default=None)


def make_mesh(shape: dict[str, int] | Sequence[int] = (), *, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; -1 in one axis takes the remaining devices.

  `shape` is a dict like {'data': -1, 'tensor': 2} or a 3-tuple; missing axes are 1.
  """
  devices = np.asarray(devices if devices is not None else jax.devices())
  if not isinstance(shape, dict):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh axes {sorted(unknown)} unknown; use {MESH_AXES}.')
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if not shape:
    sizes = [-1, 1, 1]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {shape}: at most one axis may be -1.')
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if devices.size % fixed:
      raise ValueError(f'mesh {shape}: {devices.size} devices not divisible by {fixed}.')
    sizes[sizes.index(-1)] = devices.size // fixed
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(
        f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
        f'found {devices.size}.')
  return Mesh(devices.reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules=None, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  A mesh axis is used at most once; with a `mesh`, axes of size 1 are dropped,
  and with a `shape`, so are axes that do not divide that dimension (e.g. a
  vocabulary of 49,153 stays replicated over 'tensor': still correct, just
  not split).
  """
  rules = DEFAULT_RULES if rules is None else rules
  used, spec = set(), []
  for dim, name in enumerate(axes):
    target = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f'logical axis {name!r} has no sharding rule; known: {sorted(rules)}')
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used and (
        mesh is None or mesh.shape[t] > 1))
    if mesh is not None and shape is not None:
      kept = []
      for t in targets:
        if shape[dim] % (int(np.prod([mesh.shape[k] for k in kept])) * mesh.shape[t]) == 0:
          kept.append(t)
      targets = tuple(kept)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
  """NamedShardings for an NNX state whose Variables carry `logical_axes`."""
  def one(variable):
    axes = getattr(variable, 'logical_axes', None)
    if axes is None:
      axes = (None,) * len(np.shape(variable.get_value()))
    shape = np.shape(variable.get_value())
    return variable.replace(NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=None):
  """Within this context `constrain` pins activations to the mesh."""
  token = _ACTIVE.set((mesh, DEFAULT_RULES if rules is None else rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh_size() -> int:
  """Devices of the mesh `activation_rules` pins activations to; 1 outside it."""
  active = _ACTIVE.get()
  return 1 if active is None else active[0].size


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `activation_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  # With the shape, a dimension that does not divide over its mesh axes (a
  # few shared prompts on many devices) stays whole instead of padded.
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))
