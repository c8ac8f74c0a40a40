"""The `parallel` section: how a run's ranks split the work beyond data parallelism."""

from __future__ import annotations

from dataclasses import dataclass

from distill.strict import positive


@dataclass(kw_only=True)
class ParallelConfig:
    sequence_parallel_size: int = 1
    """Ranks that split each video's tokens (Ulysses: an all-to-all over attention heads inside self-attention, each
    rank holding 1 / N of the sequence elsewhere). The world size must be a multiple of it; the ranks of one group
    read the same batch and draw the same noise, and the groups are data parallel. 1 = off."""

    def validate(self, path: str) -> None:
        positive(self, path, "sequence_parallel_size")
