"""Validation sampling: what a method asks for, and what a model plugin's validator returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

SamplerKind = Literal["sde", "ode"]
MAX_GUIDANCE_SCALE = 30.0
"""The largest CFG scale a config or a bench accepts: video models sample at 3 to 8, so more is a typo."""


@dataclass(frozen=True)
class SamplingSpec:
    """How a role samples: what a method declares for its product, and a checkpoint's manifest records.

    Give either `timesteps` (exact, noisiest first) or `num_inference_steps` (the scheduler's own
    N-step schedule with the model's flow shift).
    """

    sampler_kind: SamplerKind
    """sde: predict x0 and re-noise it with fresh noise at each step; ode: Euler steps of the flow."""
    timesteps: tuple[float, ...] | None = None
    """The exact timesteps, in [0, T], noisiest first."""
    num_inference_steps: int | None = None
    """Steps of the scheduler's own schedule, when no exact timesteps are given."""
    guidance_scale: float = 1.0
    """Standard CFG scale: uncond + w (cond - uncond); 1 = conditional only (no uncond pass)."""

    def __post_init__(self) -> None:
        if (self.timesteps is None) == (self.num_inference_steps is None):
            raise ValueError("SamplingSpec: give exactly one of timesteps and num_inference_steps")
        if self.sampler_kind not in ("sde", "ode"):
            raise ValueError(f"SamplingSpec.sampler_kind: expected 'sde' or 'ode', got {self.sampler_kind!r}")
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) if self.timesteps is not None else self.num_inference_steps

    @property
    def label(self) -> str:
        """`<sampler>-<steps>`, e.g. sde-4."""
        return f"{self.sampler_kind}-{self.num_steps}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["timesteps"] = None if self.timesteps is None else list(self.timesteps)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> SamplingSpec:
        return cls(**data)



@dataclass
class ValidationRequest:
    """Sample `prompts` x `seeds` with one role's modules, as `sampling` says."""

    sample_handle: Any
    sampling: SamplingSpec
    prompts: list[str]
    seeds: list[int]
    num_frames: int
    height: int
    width: int
    output_dir: str | None
    """Where videos, contact.png and meta.json go; None = sample but write nothing (non-zero ranks)."""
    negative_prompt: str = ""
    fps: int = 8
    video_format: Literal["mp4", "gif"] = "mp4"

    @property
    def num_steps(self) -> int:
        return self.sampling.num_steps


@dataclass
class ValidationResult:
    frames: list[Any] = field(default_factory=list, repr=False)
    """One (F, H, W, 3) uint8 array per (prompt, seed), prompt-major: the videos in memory."""
    videos: list[str] = field(default_factory=list)
    contact_sheet: str | None = None
    meta: str | None = None
    seconds_per_video: list[float] = field(default_factory=list)
    denoising_seconds_per_video: list[float] = field(default_factory=list)
    function_evaluations_per_video: int = 0
    timesteps: list[float] = field(default_factory=list)


class Validator(Protocol):
    def run(self, request: ValidationRequest) -> ValidationResult: ...
