"""DMD2: distribution matching distillation with a trainable critic (fake score).

One iteration i, per micro-batch:
  1. batch = prepare_batch(raw, latents_source = zeros if simulate else data)
  2. student rollout to x̂0 at a step index k drawn the same on every rank
  3. on student-update iterations (i % generator_update_interval == 0): the DMD loss
     grad = (fake − real) / mean_per_sample |x̂0 − real|,  loss_G = ½ mse(x̂0, x̂0 − grad)
  4. every iteration: the critic's flow-matching loss on the (detached) student sample
The trainer logs each role's grad norm and learning rate beside the losses returned here.

Guidance convention: `real = uncond + w (cond − uncond)` with w = real_score_guidance_scale
(standard CFG; w = 1 is conditional only). Configs written for the other convention,
`cond + w' (cond − uncond)`, set `cfg_convention: cond_plus`; that is standard w = w' + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F

from distill.adapter import Batch, LatentsSource
from distill.errors import ConfigError
from distill.methods.base import DistillMethod, check_finite, make_optimizer, optimizer_settings
from distill.methods.ema import EMA
from distill.registry import register_method
from distill.roles import RoleHandle
from distill.validation import SamplingSpec

if TYPE_CHECKING:
    from distill.config import Config


@dataclass(kw_only=True)
class DMD2Config:
    rollout_mode: Literal["simulate", "data_latent"] = "simulate"
    """simulate: roll the student out from pure noise (prompts only); data_latent: noise data latents."""
    dmd_denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    """The student's timesteps, noisiest first; the student samples in len(steps) steps."""
    warp_denoising_step: bool = False
    """Map each step s to the shifted training schedule: noise_scheduler.timesteps[T − s]."""
    generator_update_interval: int = 5
    """Update the student every this many iterations; the critic updates every iteration."""
    real_score_guidance_scale: float = 3.5
    """CFG scale of the teacher's (real) score, in the convention below."""
    cfg_convention: Literal["standard", "cond_plus"] = "standard"
    """standard: uncond + w (cond − uncond); cond_plus: cond + w (cond − uncond) = standard w + 1."""
    min_timestep_ratio: float = 0.02
    """Lower bound of the DMD / critic timestep, as a fraction of T."""
    max_timestep_ratio: float = 0.98
    """Upper bound of the DMD / critic timestep, as a fraction of T."""
    ema_decay: float = 0.0
    """EMA of the student, updated after each student update (0 = off); checkpoints, validation, bench and
    export then use the averaged weights."""
    ema_start_step: int = 0
    """Student updates before averaging starts; until then the EMA tracks the student's weights."""

    def validate(self, path: str) -> None:
        steps = self.dmd_denoising_steps
        if not steps:
            raise ConfigError(f"{path}.dmd_denoising_steps: must list at least one step")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ConfigError(f"{path}.dmd_denoising_steps: steps must be strictly decreasing (noisiest first), got {steps}")
        if self.generator_update_interval < 1:
            raise ConfigError(f"{path}.generator_update_interval: must be >= 1, got {self.generator_update_interval}")
        for key in ("min_timestep_ratio", "max_timestep_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{path}.{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.min_timestep_ratio > self.max_timestep_ratio:
            raise ConfigError(
                f"{path}.min_timestep_ratio ({self.min_timestep_ratio}) must not exceed "
                f"{path}.max_timestep_ratio ({self.max_timestep_ratio})"
            )
        if not self.real_score_guidance_scale >= 0:  # also rejects NaN
            raise ConfigError(f"{path}.real_score_guidance_scale: must be >= 0, got {self.real_score_guidance_scale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{path}.ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.ema_start_step < 0:
            raise ConfigError(f"{path}.ema_start_step: must be >= 0, got {self.ema_start_step}")

    @property
    def standard_guidance_scale(self) -> float:
        w = self.real_score_guidance_scale
        return w + 1.0 if self.cfg_convention == "cond_plus" else w


class DMD2Adapter(Protocol):
    """The primitives DMD2 needs from a model plugin."""

    num_train_timesteps: int
    noise_scheduler: object  # exposes `.timesteps`, the T-step training schedule (shifted)

    def prepare_batch(self, raw: dict, *, latents_source: LatentsSource) -> Batch: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predict_velocity(self, handle: RoleHandle, x_t, t, batch: Batch, *, conditional: bool) -> torch.Tensor: ...
    def predict_x0(self, handle: RoleHandle, x_t, t, batch: Batch, *, conditional: bool) -> torch.Tensor: ...
    def shift_timestep(self, t: torch.Tensor) -> torch.Tensor: ...


@register_method("dmd2", DMD2Config)
class DMD2(DistillMethod):
    headline_losses = ("critic_loss", "generator_loss")
    update_kinds = ("student_update", "critic_only")

    @classmethod
    def required_roles(cls, method_cfg: DMD2Config) -> dict[str, bool]:
        return {"student": True, "teacher": False, "critic": True}

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        from distill import registry

        T = registry.model_spec(cfg.model.family).num_train_timesteps
        for i, s in enumerate(cfg.method_config.dmd_denoising_steps):
            if not 0 <= s <= T:
                raise ConfigError(f"method_config.dmd_denoising_steps[{i}]: step {s} is outside [0, {T}]")
        if cfg.method_config.ema_decay and cfg.deepspeed.get("zero_optimization", {}).get("stage", 0) == 3:
            raise ConfigError("method_config.ema_decay: the EMA averages the student's whole weights on each rank, "
                              "which deepspeed.zero_optimization.stage 3 partitions; use stage 0-2 with an EMA")

    def build(self) -> None:
        super().build()
        self.student = self.roles["student"]
        self.teacher = self.roles["teacher"]
        self.critic = self.roles["critic"]
        self.denoising_steps = self._denoising_steps()
        m = self.method_cfg
        self.ema = EMA(self.student.modules, m.ema_decay, m.ema_start_step) if m.ema_decay else None

    def exported_modules(self) -> dict:
        return self.ema.modules if self.ema is not None else super().exported_modules()

    @property
    def exports_state(self) -> bool:
        return self.ema is not None

    @classmethod
    def metadata(cls, method_cfg: DMD2Config) -> dict:
        return {**super().metadata(method_cfg), "weights": "ema" if method_cfg.ema_decay else "trained",
                "ema_decay": method_cfg.ema_decay}

    def build_optimizers(self) -> None:
        tr = self.cfg.training
        # The student steps every generator_update_interval iterations: its schedule counts those steps.
        make_optimizer(self.roles["student"], **optimizer_settings(tr, every=self.method_cfg.generator_update_interval))
        make_optimizer(self.roles["critic"], **optimizer_settings(tr, prefix="fake_score_"))

    def _denoising_steps(self) -> torch.Tensor:
        steps = torch.tensor(self.method_cfg.dmd_denoising_steps, dtype=torch.float32)
        if self.method_cfg.warp_denoising_step:
            # Index the shifted T-step training schedule, with 0 appended so s = 0 maps to 0.
            T = self.adapter.num_train_timesteps
            schedule = torch.cat([self.adapter.noise_scheduler.timesteps.float().cpu(), torch.zeros(1)])
            steps = schedule[T - steps.long()]
        return steps

    # -- one micro-batch ----------------------------------------------------------------------

    @classmethod
    def latents_source(cls, method_cfg: DMD2Config) -> LatentsSource:
        return "zeros" if method_cfg.rollout_mode == "simulate" else "data"

    def is_student_update(self, iteration: int) -> bool:
        return iteration % self.method_cfg.generator_update_interval == 0

    def iteration_kind(self, iteration: int) -> str:
        return "student_update" if self.is_student_update(iteration) else "critic_only"

    @classmethod
    def reference_guidance(cls, method_cfg: DMD2Config) -> float:
        return method_cfg.standard_guidance_scale

    def train_step(self, raw_batch: dict, iteration: int) -> dict[str, float]:
        batch = self.adapter.prepare_batch(raw_batch, latents_source=self.latents_source(self.method_cfg))
        update_student = self.is_student_update(iteration)
        metrics: dict[str, float] = {"updated_student": float(update_student)}

        # 1. Student rollout (with grad only where the student learns this iteration).
        x0_student, k = self.rollout(batch, grad=update_student)
        metrics["rollout_k"] = float(k)

        # 2. Student update: the distribution-matching loss.
        if update_student:
            loss_g, stats = self.generator_loss(x0_student, batch)
            check_finite(loss_g, "generator_loss", iteration)
            self.student.backward(loss_g)
            steps = self.student.optimizer_steps
            self.student.step()
            if self.ema is not None and self.student.optimizer_steps > steps:  # a step was applied
                self.ema.update(self.student.modules, self.student.optimizer_steps)
            metrics["generator_loss"] = loss_g.item()
            metrics.update(stats)

        # 3. Critic update on the student's sample (reused, detached).
        loss_c = self.critic_loss(x0_student.detach(), batch)
        check_finite(loss_c, "critic_loss", iteration)
        self.critic.backward(loss_c)
        self.critic.step()
        metrics["critic_loss"] = loss_c.item()
        return metrics

    def pick_rollout_index(self) -> int:
        """k uniform over the step list, from the generator every rank advances identically."""
        return int(torch.randint(len(self.denoising_steps), (1,), generator=self.shared_rng))

    def rollout(self, batch: Batch, *, grad: bool) -> tuple[torch.Tensor, int]:
        """The student's x̂0 at step k; the last call carries grad when `grad`."""
        k = self.pick_rollout_index()
        steps = self.denoising_steps.to(batch.latents.device)
        B = batch.size

        def t_at(j: int) -> torch.Tensor:
            return steps[j].expand(B)

        if self.method_cfg.rollout_mode == "data_latent":
            x = self.adapter.add_noise(batch.latents, self.randn_like(batch.latents), t_at(k))
        else:
            x = self.randn_like(batch.latents)  # pure noise at s_0
            with torch.no_grad():
                for j in range(k):  # only the k steps needed to reach s_k
                    x0 = self.adapter.predict_x0(self.student, x, t_at(j), batch, conditional=True)
                    x = self.adapter.add_noise(x0, self.randn_like(x0), t_at(j + 1))
        with torch.set_grad_enabled(grad):
            x0 = self.adapter.predict_x0(self.student, x, t_at(k), batch, conditional=True)
        return x0, k

    def real_and_fake_x0(self, x0_student: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise the detached sample to a random t; the teacher's CFG x0 and the critic's x0 there."""
        m = self.method_cfg
        x0 = x0_student.detach()
        t = self.sample_timesteps(batch.size, x0.device, m.min_timestep_ratio, m.max_timestep_ratio)
        x_t = self.adapter.add_noise(x0, self.randn_like(x0), t)
        with torch.no_grad():
            fake = self.adapter.predict_x0(self.critic, x_t, t, batch, conditional=True)
            cond = self.adapter.predict_x0(self.teacher, x_t, t, batch, conditional=True)
            w = m.standard_guidance_scale
            if w == 1.0:
                real = cond
            else:
                uncond = self.adapter.predict_x0(self.teacher, x_t, t, batch, conditional=False)
                real = uncond + w * (cond - uncond)
        return real, fake

    def generator_loss(self, x0_student: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The student's loss, and what shows a collapse early: the DMD gradient's size and the x0 statistics."""
        real, fake = self.real_and_fake_x0(x0_student, batch)
        return dmd_loss(x0_student, real, fake), dmd_statistics(x0_student, real, fake)

    def critic_loss(self, x0_sample: torch.Tensor, batch: Batch) -> torch.Tensor:
        m = self.method_cfg
        t = self.sample_timesteps(batch.size, x0_sample.device, m.min_timestep_ratio, m.max_timestep_ratio)
        noise = self.randn_like(x0_sample)
        x_t = self.adapter.add_noise(x0_sample, noise, t)
        v = self.adapter.predict_velocity(self.critic, x_t, t, batch, conditional=True)
        return F.mse_loss(v.float(), (noise - x0_sample).float())

    # -- validation ---------------------------------------------------------------------------

    def sampling(self) -> SamplingSpec:
        # The student samples with exactly the steps it trains on: never written twice in a config.
        return SamplingSpec(sampler_kind="sde", timesteps=tuple(self._denoising_steps().tolist()), guidance_scale=1.0)


@torch.no_grad()
def dmd_gradient(x0_student: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """grad = (fake − real) / mean_per_sample |x̂0 − real|, fp32, NaN (a zero normaliser) set to 0."""
    x0 = x0_student.float()
    dims = tuple(range(1, x0.ndim))
    normalizer = (x0 - real.float()).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake.float() - real.float()) / normalizer)


def dmd_loss(x0_student: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """½ mse(x̂0, x̂0 − grad), in fp32.

    Its gradient w.r.t. x̂0 is grad / numel: the normalised score difference, pushed
    through the student's parameters.
    """
    x0 = x0_student.float()
    return 0.5 * F.mse_loss(x0, (x0 - dmd_gradient(x0_student, real, fake)).detach())


@torch.no_grad()
def dmd_statistics(x0_student: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Logged beside the losses: the DMD gradient's RMS, and the spread of the student's, the teacher's
    (real) and the critic's (fake) x0. A student collapsing to few modes shows as a falling x0 std."""
    grad = dmd_gradient(x0_student, real, fake)
    return {"dmd_grad_rms": grad.pow(2).mean().sqrt().item(),
            "student_x0_std": x0_student.float().std().item(),
            "real_x0_std": real.float().std().item(), "fake_x0_std": fake.float().std().item(),
            "real_fake_x0_gap": (fake.float() - real.float()).abs().mean().item()}
