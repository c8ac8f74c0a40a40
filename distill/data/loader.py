"""The trainer's batch stream: this rank's share of the data, shuffled per epoch, resumable."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, default_collate


class BatchLoader:
    """Endless micro-batches of one rank's share of a map-style data set.

    Every epoch has an order fixed by (seed, epoch): the data set's own `epoch_order` when it
    has one (shards: shard-local shuffling), else a permutation. Ranks take interleaved
    slices of it, padded to a multiple of the world size, so every rank sees as many
    batches. Batches run across epoch boundaries. The position (epoch, offset) is the
    whole state: `state_dict()` / `load_state_dict()` resume the stream exactly.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int):
        if len(dataset) == 0:
            raise ValueError("BatchLoader: the data set is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.offset = 0, 0
        self._indices = self._epoch_indices(0)

    def _epoch_indices(self, epoch: int) -> list[int]:
        if hasattr(self.dataset, "epoch_order"):
            order = self.dataset.epoch_order(epoch, self.seed)
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
        padded = order + order[: (-len(order)) % self.world_size]
        return padded[self.rank :: self.world_size]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = []
        while len(batch) < self.batch_size:
            if self.offset == len(self._indices):
                self.epoch, self.offset = self.epoch + 1, 0
                self._indices = self._epoch_indices(self.epoch)
            batch.append(self.dataset[self._indices[self.offset]])
            self.offset += 1
        return default_collate(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._indices = self._epoch_indices(self.epoch)

    def load_resharded(self, states: list[dict]) -> None:
        """The position of a run with `len(states)` data ranks, for this run's ranks. That run's ranks, at one
        offset each, had drawn the first offset × len(states) samples of the epoch's order; these go on from the
        nearest multiple of their own count below, so fewer than world_size samples are drawn again and none is
        skipped (a finished epoch: the next one from its start)."""
        positions = {(s["epoch"], s["offset"]) for s in states}
        if len(positions) != 1:
            raise ValueError(f"the ranks' data positions (epoch, offset) differ: {sorted(positions)}")
        epoch, offset = positions.pop()
        drawn = offset * len(states)
        if drawn >= len(self.dataset):
            epoch, drawn = epoch + 1, 0
        self.load_state_dict({"epoch": epoch, "offset": drawn // self.world_size})
