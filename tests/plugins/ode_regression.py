"""A toy method: distil the teacher's probability-flow ODE into a one-step student.

Each iteration draws noise, runs the frozen teacher's Euler ODE from σ = 1 to 0 (no grad),
and regresses the student's one-step x0 on the result (knowledge distillation of the ODE,
Luhman & Luhman 2021). Model-agnostic: it uses only the flow-matching primitives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.methods.base import DistillMethod, check_finite, make_optimizer, optimizer_settings
from distill.registry import register_method
from distill.validation import SamplingSpec


@dataclass(kw_only=True)
class ODERegressionConfig:
    teacher_steps: int = 16
    """Euler steps of the teacher's ODE."""


@register_method("ode_regression", ODERegressionConfig)
class ODERegression(DistillMethod):
    headline_losses = ("ode_loss",)

    @classmethod
    def required_roles(cls, method_cfg):
        return {"student": True, "teacher": False}

    @classmethod
    def latents_source(cls, method_cfg):
        return "zeros"

    def build_optimizers(self):
        make_optimizer(self.roles["student"], **optimizer_settings(self.cfg.training))

    @torch.no_grad()
    def teacher_ode(self, noise, batch):
        T = self.adapter.num_train_timesteps
        ts = torch.linspace(T, 0, self.method_cfg.teacher_steps + 1, device=noise.device)
        x = noise
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = self.adapter.predict_velocity(self.roles["teacher"], x, t.expand(len(x)), batch, conditional=True)
            x = x + (self.adapter.sigma(t_next) - self.adapter.sigma(t)) * v
        return x

    def train_step(self, raw_batch, iteration):
        batch = self.adapter.prepare_batch(raw_batch, latents_source="zeros")
        noise = self.randn_like(batch.latents)
        target = self.teacher_ode(noise, batch)
        t = torch.full((batch.size,), float(self.adapter.num_train_timesteps), device=noise.device)
        x0 = self.adapter.predict_x0(self.roles["student"], noise, t, batch, conditional=True)
        loss = F.mse_loss(x0, target)
        check_finite(loss, "ode_loss", iteration)
        self.roles["student"].backward(loss)
        self.roles["student"].step()
        return {"ode_loss": loss.item()}

    def sampling(self) -> SamplingSpec:
        return SamplingSpec(sampler_kind="ode", timesteps=(float(self.adapter.num_train_timesteps),))
