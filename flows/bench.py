"""Flows: benchmark checkpoints (a report each, published as artifacts) and compare reports."""

from __future__ import annotations

import sys
from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.credentials import load_storage_credentials
from flows.tasks import bench, check_checkpoints, compare

Some = Field(min_length=1)
"""A list parameter that needs an item: the server refuses a run without one, naming the parameter."""
Count = Field(ge=1)


@flow(name="bench")
def bench_flow(checkpoints: Annotated[list[str], Some], prompts: Annotated[int, Count] = 8,
               seeds: Annotated[int, Count] = 4, teacher_steps: Annotated[int, Count] = 50,
               training_iterations: Annotated[int, Field(ge=0)] = 0, storage: dict | None = None,
               compare_to: str | None = None) -> list[str]:
    """Benchmark each checkpoint (`<output>/checkpoints/latest` follows the pointer); with `compare_to`, also
    write the comparison there. Every checkpoint is checked before the first benchmark."""
    load_storage_credentials()
    resolved = check_checkpoints(checkpoints, storage)
    reports = [bench(c, prompts, seeds, teacher_steps, training_iterations, storage) for c in resolved]
    if compare_to and len(reports) > 1:
        compare(reports, compare_to, storage)
    return reports


@flow(name="compare")
def compare_flow(reports: Annotated[list[str], Some], out: str, storage: dict | None = None) -> str:
    load_storage_credentials()
    return compare(reports, out, storage)


if __name__ == "__main__":
    bench_flow(sys.argv[1:])
