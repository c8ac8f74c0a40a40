"""What passes between a method and a model plugin at step time.

Methods declare a `Protocol` of the primitives they need (see each method's module) and
receive a `Batch`; model plugins satisfy the protocol. Neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distill.errors import InputError

LatentsSource = Literal["data", "zeros"]


class BatchError(InputError):
    """A batch lacks what the method asked for (e.g. `vae_latent` for data latents)."""


@dataclass
class Batch:
    """A micro-batch ready for the models, on the training device."""

    latents: torch.Tensor
    """Clean latents x0 from the data (latents_source="data") or zeros of the right shape."""
    prompt_embeds: torch.Tensor
    """Conditional text embeddings."""
    negative_prompt_embeds: torch.Tensor
    """Unconditional (negative prompt) text embeddings."""
    from_data: bool
    """True when `latents` holds data, False when it is a zero tensor."""

    @property
    def size(self) -> int:
        return self.latents.shape[0]
