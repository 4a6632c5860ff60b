"""Errors in what a user gave jpost, as opposed to bugs in jpost.

`python -m jpost.main` prints a `UserError` as one line on stderr and exits
with status 2; any other exception is a bug and keeps its traceback. Each
class also derives from the built-in error a caller would expect
(`ValueError`, `FileNotFoundError`), so `except ValueError` keeps working.
"""


class UserError(Exception):
  """Something the user can fix: a config field, a data row, a path."""


class ConfigError(UserError, ValueError):
  """A config field (or a combination of fields) that cannot work."""


class MissingPathError(UserError, FileNotFoundError):
  """A model, checkpoint, data or config file that is not where it was said to be."""
