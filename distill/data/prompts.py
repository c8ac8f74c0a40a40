"""Prompt-only data and the per-rank batch stream the trainer consumes."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler, default_collate


class PromptDataset(Dataset):
    """Prompts only: enough for methods that roll the student out from noise."""

    fields = ("prompt",)

    def __init__(self, prompts: list[str]):
        if not prompts:
            raise ValueError("PromptDataset: no prompts")
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"prompt": self.prompts[index]}


def batch_stream(dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int) -> Iterator[dict]:
    """Endless batches of this rank's share, reshuffled (by seed and epoch) every epoch.

    Batches run across epoch boundaries, so a data set smaller than a batch still yields full batches.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    pending: list[int] = []
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        pending.extend(sampler)
        epoch += 1
        while len(pending) >= batch_size:
            indices, pending = pending[:batch_size], pending[batch_size:]
            yield default_collate([dataset[i] for i in indices])
