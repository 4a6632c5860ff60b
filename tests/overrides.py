"""Config changes by dotted name, as `--config.a.b=value` makes them on the command line."""


def apply(config, changes: dict):
  """Sets each 'a.b.c' -> value of `changes` on an unlocked ConfigDict."""
  for dotted, value in changes.items():
    *parents, leaf = dotted.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config
