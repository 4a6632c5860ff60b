"""Entry point: python -m jpost.main --config=configs/NAME.py[:arg] --workdir=DIR

Any config field can be overridden on the command line, e.g.
`--config.sampling.max_new_tokens=32`; `config.trainer` picks the recipe.

A mistake in what the user gave (a bad flag or config field, a bad data row, a
missing model, checkpoint or file: `jpost.errors.UserError`) is printed as one
line on stderr, with exit status 2. `JPOST_TRACEBACK=1` (or `--verbosity=1`)
shows the traceback too; a bug in jpost always does.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jpost import errors, host

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe config file, e.g. configs/sft.py or configs/sft.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and outputs.')
USER_ERROR_STATUS = 2


def _keep_compiled_programs():
  """Keeps XLA's compiled programs in the jpost cache (`$JPOST_CACHE/xla`),
  so that a re-run of a recipe with the same shapes skips compilation.
  JAX_COMPILATION_CACHE_DIR, if set, takes precedence. The least recently
  used programs are dropped past 2 GiB (a CPU program is ~0.3 MB)."""
  import jax
  from jpost import assets
  if not compilation_cache_is_safe():
    jax.config.update('jax_enable_compilation_cache', False)
    return
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', str(assets.cache_dir() / 'xla'))
  if jax.config.jax_compilation_cache_max_size == -1:  # -1: no limit, JAX's default
    jax.config.update('jax_compilation_cache_max_size', 2 << 30)


def compilation_cache_is_safe() -> bool:
  """False with several XLA:CPU devices in one process: there, a program
  whose collectives run over device sub-groups (a [2, ...] batch on 8
  devices, a tensor axis) deadlocks in its rendezvous when it is loaded from
  the persistent cache, while the same program compiled afresh runs (jax
  0.10.2; the GRPO train-batch program, every time). Why, from XLA's CPU
  thunk serialisation: a compiled program shares one communicator resource
  among its collectives, which keeps them in program order on every device;
  the deserialised program gives each collective a resource of its own, so
  independent collectives run in any order and devices wait in different
  rendezvous (seen: five devices in an all-reduce, three in an all-gather
  that comes before it). GPU runs and one CPU device keep the cache."""
  flags_ = os.environ.get('XLA_FLAGS', '')
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)', flags_)
  return not (match and int(match.group(1)) > 1)


def _traceback_asked_for(flags_parsed: bool = True) -> bool:
  """JPOST_TRACEBACK=1, or --verbosity=1 once the flags are parsed."""
  if os.environ.get('JPOST_TRACEBACK', '') not in ('', '0'):
    return True
  verbosity = flags.FLAGS['verbosity']
  return flags_parsed and verbosity.present and verbosity.value >= 1


def _user_error(message: str):
  """Ends the run with one line on stderr and the user-error status."""
  sys.stderr.write(f'jpost: error: {message}\n')
  sys.exit(USER_ERROR_STATUS)


def _flag_error_message(error: Exception, argv: list[str]) -> str:
  """One line for a command-line mistake. ml_collections reports an exception
  raised inside a config file as a whole traceback: its last line says it."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if isinstance(error, (AttributeError, KeyError)):  # an override of a field that does not exist
    field = str(error).strip('"\'')
    flag = next((a for a in argv if a.startswith('--config.') and field in a), field)
    return (f'{flag}: the config has no field {field!r} (fields are listed in the config '
            'file; check the spelling and the dotted path)')
  message = ' '.join(lines)
  if 'Traceback' in message:  # '<flag>: Error whilst parsing...' ... 'ValueError: <what>'
    message = f'{lines[0].split(": ")[0]}: {lines[-1].split(": ", 1)[-1]}'
  return message.removeprefix('flag ')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a mistake on the command line as one line and status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    if _traceback_asked_for(flags_parsed=False):
      raise
    _user_error(_flag_error_message(e, argv))
  except OSError as e:  # an override of a config file that did not load
    if _traceback_asked_for(flags_parsed=False):
      raise
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
    path = path.split(':', 1)[0]
    _user_error(f'--config={path}: no such config file (recipes are configs/NAME.py, from '
                'the repository root)' if not os.path.isfile(path) else
                f'--config={path}: {" ".join(str(e).split())}')


def _load_config():
  """The parsed config; a config file that failed to load is a user error."""
  try:
    config = _CONFIG.value
    config.get('trainer')  # a config that failed to load raises on first use
    return config
  except OSError as e:  # ml_collections defers a missing or broken file to first use
    path = config_flags.get_config_filename(flags.FLAGS['config']).split(':', 1)[0]
    if not os.path.isfile(path):
      raise errors.MissingPathError(
          f'--config={path}: no such config file (recipes are configs/NAME.py, from the '
          'repository root)') from e
    raise errors.ConfigError(f'--config={path}: {" ".join(str(e).split())}') from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _keep_compiled_programs()
  from jpost import trainers
  # Orbax and JAX log every file operation at INFO; -v 0 / --verbosity=0 brings them back.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    config = _load_config()
    # Before JAX allocates anything; the restarted process loads the config again.
    host.restart_with_huge_pages(config.get('trainer'))
    trainers.get(config.trainer)(config, _WORKDIR.value)
  except errors.UserError as e:
    if _traceback_asked_for():
      raise
    _user_error(str(e))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=_parse_flags)
