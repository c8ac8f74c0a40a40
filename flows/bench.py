"""Flows: benchmark checkpoints (a report each, published as artifacts) and compare reports."""

from __future__ import annotations

import sys

from prefect import flow

from flows.tasks import bench, compare


@flow(name="bench")
def bench_flow(checkpoints: list[str], prompts: int = 8, seeds: int = 4, teacher_steps: int = 50,
               training_iterations: int = 0, storage: dict | None = None, compare_to: str | None = None) -> list[str]:
    """Benchmark each checkpoint; with `compare_to`, also write the comparison there."""
    reports = [bench(c, prompts, seeds, teacher_steps, training_iterations, storage) for c in checkpoints]
    if compare_to and len(reports) > 1:
        compare(reports, compare_to, storage)
    return reports


@flow(name="compare")
def compare_flow(reports: list[str], out: str, storage: dict | None = None) -> str:
    return compare(reports, out, storage)


if __name__ == "__main__":
    bench_flow(sys.argv[1:])
