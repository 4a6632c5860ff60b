"""Entry point: python -m jpost.main --config=configs/NAME.py[:arg] --workdir=DIR

Any config field can be overridden on the command line, e.g.
`--config.sampling.max_new_tokens=32`; `config.trainer` picks the recipe.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file, e.g. configs/sft.py or configs/sft.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and outputs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from jpost import trainers
  # Orbax and JAX log every file operation at INFO; -v 0 / --verbosity=0 brings them back.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  trainers.get(config.trainer)(config, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
