"""A toy flow-matching model family: 2-D points from two Gaussian modes, with an analytic teacher.

The family's "weights" are the exact flow-matching velocity of the mixture (closed form) plus
a small MLP residual, zero at init: the teacher is exact, a student copied from it can learn.
All flow-matching primitives (σ, noising, x0 from velocity, the shift) come from
FlowMatchFamily; this file adds the denoiser, batches and `predict_velocity`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from distill.adapter import Batch
from distill.errors import ConfigError
from distill.models.flow_match import FlowMatchFamily

PRESETS = {"two-modes": dict(means=[[-2.0, 0.0], [2.0, 0.0]], std=0.25, hidden=64)}


class PointsDenoiser(ModelMixin, ConfigMixin):
    """v(x_t, t) = the mixture's exact velocity + an MLP residual (zero at init)."""

    @register_to_config
    def __init__(self, means: list[list[float]], std: float, hidden: int = 64, num_train_timesteps: int = 1000):
        super().__init__()
        self.register_buffer("mode_means", torch.tensor(means, dtype=torch.float32))
        self.residual = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                      nn.Linear(hidden, 2))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def analytic_x0(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] under x_t = (1 − σ) x0 + σ ε, x0 ~ ½ N(μ_0, s²I) + ½ N(μ_1, s²I)."""
        s2 = self.config.std**2
        a = (1 - sigma)[:, None, None]  # (B, 1, 1) against means (1, K, 2)
        var = a**2 * s2 + sigma[:, None, None] ** 2
        centred = x_t[:, None, :] - a * self.mode_means[None]
        log_w = -(centred**2).sum(-1) / (2 * var[..., 0])
        w = torch.softmax(log_w, dim=1)[..., None]
        x0_k = self.mode_means[None] + a * s2 / var * centred
        return (w * x0_k).sum(1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t.float() / self.config.num_train_timesteps).clamp_min(1e-4)
        exact = (x_t - self.analytic_x0(x_t, sigma)) / sigma[:, None]
        return exact + self.residual(torch.cat([x_t, sigma[:, None]], dim=1))


class PointsPlugin(FlowMatchFamily):
    denoiser_key = "denoiser"
    latents_key = "points"
    latent_shape = (2,)

    def __init__(self, cfg, *, device, frozen_dtype=torch.float32):
        super().__init__(cfg, device=device, frozen_dtype=frozen_dtype)
        if cfg.model.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {cfg.model.preset!r}; known: {', '.join(PRESETS)}")

    def new_denoiser(self, expert: str | None = None) -> PointsDenoiser:  # one denoiser: no experts
        return PointsDenoiser(**PRESETS[self.cfg.model.preset], num_train_timesteps=self.num_train_timesteps)

    def load_denoiser(self, path: str, key: str, expert: str | None = None) -> PointsDenoiser:
        return PointsDenoiser.from_pretrained(path)

    def prepare_batch(self, raw: dict, *, latents_source) -> Batch:
        B = len(raw["prompt"])
        no_text = torch.zeros(B, 1, 1, device=self.device)
        if latents_source == "data":
            return Batch(raw[self.latents_key].to(self.device), no_text, no_text, from_data=True)
        return Batch(torch.zeros(B, *self.latent_shape, device=self.device), no_text, no_text, from_data=False)

    def predict_velocity(self, handle, x_t, t, batch, *, conditional: bool) -> torch.Tensor:
        return handle.module(self.denoiser_key)(x_t, t.to(x_t.device)).float()
