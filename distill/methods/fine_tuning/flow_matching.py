"""Plain flow-matching training of one trainable role: pre-training a teacher, or SFT.

loss = mse(v(x_t, t, c), ε − x0) with x_t = (1 − σ) x0 + σ ε; with probability
`cond_dropout` the prompt is replaced by the negative prompt, so the model also learns
the unconditional branch that classifier-free guidance needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from distill.adapter import Batch, LatentsSource
from distill.errors import ConfigError
from distill.methods.base import DistillMethod, check_finite, make_optimizer, optimizer_settings
from distill.registry import register_method
from distill.roles import RoleHandle
from distill.strict import in_range
from distill.validation import MAX_GUIDANCE_SCALE, SamplingSpec


@dataclass(kw_only=True)
class FlowMatchingConfig:
    role: str = "student"
    """The trainable role."""
    cond_dropout: float = 0.1
    """Probability of training a sample on the negative prompt (the unconditional branch)."""
    validation_sampler: Literal["ode", "sde"] = "ode"
    """Sampler of validation videos."""
    validation_steps: int = 50
    """Steps of validation sampling (the scheduler's schedule with the flow shift), in [1, T]."""
    validation_guidance_scale: float = 5.0
    """Standard CFG scale of validation sampling, in [0, 30]."""

    def validate(self, path: str) -> None:
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ConfigError(f"{path}.cond_dropout: must be in [0, 1], got {self.cond_dropout}")
        if self.validation_steps < 1:
            raise ConfigError(f"{path}.validation_steps: must be >= 1, got {self.validation_steps}")
        in_range(self, path, "validation_guidance_scale", 0.0, MAX_GUIDANCE_SCALE)


class FlowMatchingAdapter(Protocol):
    num_train_timesteps: int

    def prepare_batch(self, raw: dict, *, latents_source: LatentsSource) -> Batch: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predict_velocity(self, handle: RoleHandle, x_t, t, batch: Batch, *, conditional: bool) -> torch.Tensor: ...
    def shift_timestep(self, t: torch.Tensor, shift: float | None = None) -> torch.Tensor: ...


@register_method("flow_matching", FlowMatchingConfig)
class FlowMatching(DistillMethod):
    headline_losses = ("flow_matching_loss",)

    @classmethod
    def required_roles(cls, method_cfg: FlowMatchingConfig) -> dict[str, bool]:
        return {method_cfg.role: True}

    def build(self) -> None:
        super().build()
        self.model = self.roles[self.method_cfg.role]

    def build_optimizers(self) -> None:
        make_optimizer(self.roles[self.method_cfg.role], **optimizer_settings(self.cfg.training))

    def train_step(self, raw_batch: dict, iteration: int) -> dict[str, float]:
        batch = self.adapter.prepare_batch(raw_batch, latents_source="data")
        x0 = batch.latents
        drop = torch.rand(batch.size, generator=self.local_rng) < self.method_cfg.cond_dropout
        mask = drop.to(x0.device).view(-1, *[1] * (batch.prompt_embeds.ndim - 1))
        batch = dataclasses.replace(
            batch, prompt_embeds=torch.where(mask, batch.negative_prompt_embeds, batch.prompt_embeds)
        )
        t = self.sample_timesteps(batch.size, x0.device)
        noise = self.randn_like(x0)
        v = self.adapter.predict_velocity(self.model, self.adapter.add_noise(x0, noise, t), t, batch, conditional=True)
        loss = F.mse_loss(v.float(), (noise - x0).float())
        check_finite(loss, "flow_matching_loss", iteration)
        self.model.backward(loss)
        self.model.step()
        return {"flow_matching_loss": loss.item()}

    @classmethod
    def reference_guidance(cls, method_cfg: FlowMatchingConfig) -> float:
        return method_cfg.validation_guidance_scale

    def sampling(self) -> SamplingSpec:
        m = self.method_cfg
        return SamplingSpec(sampler_kind=m.validation_sampler, num_inference_steps=m.validation_steps,
                            guidance_scale=m.validation_guidance_scale)
