"""DMD2's GAN term (§4.3): a real/fake classifier on the critic's intermediate features.

The head reads the hidden states of chosen blocks of the critic's denoiser at a noisy input
(a "diffusion GAN": real and student samples both noised to one t drawn up to a max
timestep), pools each block's tokens after a per-token projection, and gives one logit per
sample. It trains with the critic, in the critic's engine, on the non-saturating loss
softplus(D(fake)) + softplus(−D(real)); the student's term is softplus(−D(fake)), whose
gradient reaches the student through the critic and head, frozen for that forward
(`RoleHandle.frozen`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GANHead(nn.Module):
    """Logits from a list of (B, tokens, width) block features: per token LayerNorm → Linear → SiLU,
    mean over tokens, then one linear layer over the blocks' pooled vectors."""

    def __init__(self, width: int, num_blocks: int, hidden: int = 256):
        super().__init__()
        self.token = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU())
        self.out = nn.Linear(hidden * num_blocks, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        dtype = self.out.weight.dtype
        pooled = [self.token(f.to(dtype)).mean(dim=1) for f in features]
        return self.out(torch.cat(pooled, dim=-1)).squeeze(-1).float()


def critic_gan_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss: mean softplus(D(fake)) + mean softplus(−D(real))."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(−D(fake))."""
    return F.softplus(-logits_fake).mean()
