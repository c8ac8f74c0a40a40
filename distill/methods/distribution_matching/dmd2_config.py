"""DMD2's settings: the student's steps, the critic's cadence, real-score guidance, the timestep ranges, EMA and
the GAN term."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distill.errors import ConfigError
from distill.model_config import MAX_FLOW_SHIFT
from distill.strict import in_range
from distill.validation import MAX_GUIDANCE_SCALE


@dataclass(kw_only=True)
class DMD2Config:
    rollout_mode: Literal["simulate", "data_latent"] = "simulate"
    """simulate: roll the student out from pure noise (prompts only); data_latent: noise data latents."""
    dmd_denoising_steps: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    """The student's timesteps, noisiest first, each in [0, T] (T = 1000 for Wan); the student samples in len(steps) steps."""
    warp_denoising_step: bool = False
    """Map each step s to the shifted training schedule: noise_scheduler.timesteps[T − s]."""
    generator_update_interval: int = 5
    """Update the student every this many iterations; the critic updates every iteration."""
    real_score_guidance_scale: float = 3.5
    """CFG scale of the teacher's (real) score, in the convention below; in [0, 30] (video models use 3 to 8)."""
    cfg_convention: Literal["standard", "cond_plus"] = "standard"
    """standard: uncond + w (cond − uncond); cond_plus: cond + w (cond − uncond) = standard w + 1."""
    min_timestep_ratio: float = 0.02
    """Lower bound of the DMD / critic timestep, as a fraction of T, in [0, 1]."""
    max_timestep_ratio: float = 0.98
    """Upper bound of the DMD / critic timestep, as a fraction of T, in [0, 1] and not below the lower bound."""
    timestep_shift: float | None = None
    """Shift of the DMD / critic timestep distribution, σ' = s σ / (1 + (s − 1) σ) of a uniform σ; unset = the
    model's flow shift; 1 = uniform (more weight on low noise, where detail and grain are decided)."""
    ema_decay: float = 0.0
    """EMA of the student, updated after each student update (0 = off); checkpoints, validation, bench and
    export then use the averaged weights."""
    ema_start_step: int = 0
    """Student updates before averaging starts; until then the EMA tracks the student's weights."""
    gan_critic_weight: float = 0.0
    """Weight of the real/fake classification loss added to the critic's (DMD2 §4.3; SDXL recipe 1e-2; 0 = no GAN).
    Needs real samples: shards that carry latents (or pixels), also with rollout_mode simulate."""
    gan_generator_weight: float = 0.0
    """Weight of the student's non-saturating GAN loss added to the DMD loss (SDXL recipe 5e-3, ImageNet 3e-3)."""
    gan_blocks: list[int] | None = None
    """Blocks of the critic's denoiser whose hidden states the classifier reads (negative counts from the end);
    unset = the middle block."""
    gan_max_timestep_ratio: float = 1.0
    """Real and student samples are noised to one t drawn uniformly in [0, this · T] (1000 in the SDXL recipe)."""
    gan_head_hidden: int = 256
    """Width of the classifier head's per-token projection."""

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
        in_range(self, path, "real_score_guidance_scale", 0.0, MAX_GUIDANCE_SCALE)
        if self.timestep_shift is not None and not 0 < self.timestep_shift <= MAX_FLOW_SHIFT:
            raise ConfigError(f"{path}.timestep_shift: must be in (0, {MAX_FLOW_SHIFT}] (unset = the model's flow "
                              f"shift), got {self.timestep_shift}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{path}.ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.ema_start_step < 0:
            raise ConfigError(f"{path}.ema_start_step: must be >= 0, got {self.ema_start_step}")
        for key in ("gan_critic_weight", "gan_generator_weight"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{path}.{key}: must be >= 0, got {getattr(self, key)}")
        if self.gan_generator_weight and not self.gan_critic_weight:
            raise ConfigError(f"{path}.gan_generator_weight ({self.gan_generator_weight}) needs "
                              f"{path}.gan_critic_weight > 0: the classifier learns only from the critic's loss")
        if not 0.0 < self.gan_max_timestep_ratio <= 1.0:
            raise ConfigError(f"{path}.gan_max_timestep_ratio: must be in (0, 1], got {self.gan_max_timestep_ratio}")
        if self.gan_head_hidden < 1:
            raise ConfigError(f"{path}.gan_head_hidden: must be >= 1, got {self.gan_head_hidden}")

    @property
    def standard_guidance_scale(self) -> float:
        w = self.real_score_guidance_scale
        return w + 1.0 if self.cfg_convention == "cond_plus" else w
