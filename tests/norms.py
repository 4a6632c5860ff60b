"""Closeness by norm, for results whose summation order differs by CPU.

Two XLA:CPU runs of the same maths (another processor, thread count, device
layout or sharding) add in another order. An element near zero then carries a
rounding error that is large relative to itself, so an elementwise `rtol`
fails by chance. The error relative to the whole tensor's norm does not: it
is ~1e-7 for float32 noise and O(1) for a wrong mask, a dropped term or a
missing all-reduce.
"""

import jax
import numpy as np


def relative_error(got, want) -> float:
  """||got - want|| / ||want|| in float64 (0 when both are zero)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  scale = np.linalg.norm(want)
  diff = np.linalg.norm(got - want)
  return float(diff / scale) if scale else float(diff)


def assert_norm_close(got, want, *, bound: float, what: str = ''):
  """Every leaf of the pytrees `got` and `want` within `bound` relative error.

  The message names the leaf, its error and the bound, so a failure says how
  far off it was, not only that it was."""
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves = jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), (len(got_leaves), len(want_leaves))
  errors = {jax.tree_util.keystr(path): relative_error(g, w)
            for (path, g), w in zip(got_leaves, want_leaves)}
  worst = max(errors, key=errors.get)
  assert errors[worst] <= bound, (
      f'{what}{worst}: relative error {errors[worst]:.3g} > {bound:g} '
      f'({sum(e > bound for e in errors.values())} of {len(errors)} leaves over)')
  return errors[worst]
