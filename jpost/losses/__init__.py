"""Pure losses: arrays in, `(loss, metrics)` out; never a model or a config."""
