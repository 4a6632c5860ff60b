"""Entry point: python -m jpost.main --config=configs/NAME.py[:arg] --workdir=DIR

Any config field can be overridden on the command line, e.g.
`--config.sampling.max_new_tokens=32`; `config.trainer` picks the recipe.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file, e.g. configs/sft.py or configs/sft.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and outputs.')


def _keep_compiled_programs():
  """Keeps XLA's compiled programs in the jpost cache (`$JPOST_CACHE/xla`),
  so that a re-run of a recipe with the same shapes skips compilation (a
  SmolLM2 `generate` call on CPU: 13.4 s -> 4.8 s the second time).
  JAX_COMPILATION_CACHE_DIR, if set, takes precedence. The least recently
  used programs are dropped past 2 GiB (a CPU program is ~0.3 MB)."""
  import jax
  from jpost import assets
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', str(assets.cache_dir() / 'xla'))
  if jax.config.jax_compilation_cache_max_size == -1:  # -1: no limit, JAX's default
    jax.config.update('jax_compilation_cache_max_size', 2 << 30)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _keep_compiled_programs()
  from jpost import trainers
  # Orbax and JAX log every file operation at INFO; -v 0 / --verbosity=0 brings them back.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  trainers.get(config.trainer)(config, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
