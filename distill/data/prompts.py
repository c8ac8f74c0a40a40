"""Prompt-only data given inline in the config."""

from __future__ import annotations

from torch.utils.data import Dataset


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
