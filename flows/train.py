"""Flow: check the config, then train under the deepspeed launcher (validation videos become artifacts)."""

from __future__ import annotations

import sys

from prefect import flow

from flows.credentials import load_storage_credentials
from flows.tasks import check_config, check_ranks, train


@flow(name="train")
def train_flow(config: str, overrides: list[str] | None = None, num_gpus: int = 0, resume: bool | None = False,
               sequence_parallel_size: int = 1) -> dict:
    """resume: True continues from the newest checkpoint; None resumes when there is one (retries, schedules).
    sequence_parallel_size: ranks of the num_gpus that split each video's tokens (parallel.sequence_parallel_size)."""
    overrides = list(overrides or [])
    check_ranks(num_gpus, sequence_parallel_size)
    if sequence_parallel_size != 1:
        overrides.append(f"parallel.sequence_parallel_size={sequence_parallel_size}")
    load_storage_credentials()
    check_config(config, overrides)
    return train(config, overrides, num_gpus, resume)


if __name__ == "__main__":
    train_flow(sys.argv[1], sys.argv[2:])
