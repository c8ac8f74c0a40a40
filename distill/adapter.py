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

    def cond_uncond(self) -> Batch:
        """A batch of 2B: this batch with its prompts, then again with its negative prompts, so that one
        conditional forward over it gives both halves of classifier-free guidance."""
        both = torch.cat([self.prompt_embeds, self.negative_prompt_embeds])
        return Batch(latents=torch.cat([self.latents, self.latents]), prompt_embeds=both,
                     negative_prompt_embeds=both, from_data=self.from_data)
