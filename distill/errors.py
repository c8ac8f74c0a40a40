"""The errors every user-facing check raises: bad input, named (config key, file, shard)."""


class InputError(ValueError):
    """Bad input the user must fix; the message names the config key, the file or the shard."""


class ConfigError(InputError):
    """A config value is unknown, mistyped or impossible; the message names the key path."""


class NonFiniteError(InputError, FloatingPointError):
    """A loss, gradient or weight became NaN or Inf; the run stops before it reaches a published checkpoint.

    Usually the cause is the config (a learning rate or guidance scale too large), so it is an InputError.
    """
