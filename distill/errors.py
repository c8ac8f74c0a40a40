"""The error every user-facing check raises: bad input, named (config key, file, shard)."""


class InputError(ValueError):
    """Bad input the user must fix; the message names the config key, the file or the shard."""
