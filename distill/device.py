"""Which device a run uses, from its config."""

from __future__ import annotations

import torch

from distill.config import Config
from distill.errors import ConfigError


def resolve_device(cfg: Config) -> torch.device:
    """training.device as a torch device: auto = cuda when a GPU is visible."""
    want = cfg.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device: cuda was asked for, but no GPU is visible")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)
