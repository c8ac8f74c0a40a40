"""Flow: check the config, then train under the deepspeed launcher (validation videos become artifacts)."""

from __future__ import annotations

import sys

from prefect import flow

from flows.credentials import load_storage_credentials
from flows.tasks import check_config, train


@flow(name="train")
def train_flow(config: str, overrides: list[str] | None = None, num_gpus: int = 0, resume: bool | None = False) -> dict:
    """resume: True continues from the newest checkpoint; None resumes when there is one (retries, schedules)."""
    overrides = overrides or []
    load_storage_credentials()
    check_config(config, overrides)
    return train(config, overrides, num_gpus, resume)


if __name__ == "__main__":
    train_flow(sys.argv[1], sys.argv[2:])
