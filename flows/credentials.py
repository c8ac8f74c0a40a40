"""Storage credentials at run time: Prefect Secret blocks into this process's standard AWS environment.

Nothing of them is a deployment's job variable or a flow-run parameter, so the API and the UI never show
them; the training ranks inherit them with the environment. A worker whose own environment has AWS keys
keeps those (the standard AWS chain), and a set-up without the blocks (local storage) needs none.
"""

from __future__ import annotations

import os

from prefect import get_run_logger
from prefect.blocks.system import Secret

from distill.config import ConfigError

SECRET_BLOCKS = {"AWS_ACCESS_KEY_ID": "distill-aws-access-key-id",
                 "AWS_SECRET_ACCESS_KEY": "distill-aws-secret-access-key"}


def load_storage_credentials() -> None:
    """Set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the Secret blocks unless the environment has them."""
    if all(os.environ.get(var) for var in SECRET_BLOCKS):
        return
    found = {}
    for var, block in SECRET_BLOCKS.items():
        try:
            found[var] = Secret.load(block).get()
        except ValueError:  # no such block
            continue
    if not found:
        return
    if len(found) < len(SECRET_BLOCKS):
        missing = [b for v, b in SECRET_BLOCKS.items() if v not in found]
        raise ConfigError(f"Secret block {missing[0]} is missing: storage credentials need both "
                          f"{' and '.join(SECRET_BLOCKS.values())}")
    os.environ.update(found)
    get_run_logger().info(f"storage credentials from the Secret blocks {', '.join(SECRET_BLOCKS.values())}")
