"""Validation sampling: what a method asks for, and what a model plugin's validator returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass
class ValidationRequest:
    """Sample `prompts` x `seeds` with one role's model.

    Give either `sampling_timesteps` (the exact timesteps, noisiest first) or
    `num_inference_steps` (the scheduler's own N-step schedule with the model's flow shift).
    sde: predict x0 at each step and re-noise it with fresh noise to the next timestep;
    ode: Euler steps of the flow.
    """

    sample_handle: Any
    sampler_kind: Literal["sde", "ode"]
    prompts: list[str]
    seeds: list[int]
    num_frames: int
    height: int
    width: int
    output_dir: str | None
    """Where videos, contact.png and meta.json go; None = sample but write nothing (non-zero ranks)."""
    sampling_timesteps: list[float] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float = 1.0
    """Standard CFG scale: uncond + w (cond - uncond); 1 = conditional only (no uncond pass)."""
    negative_prompt: str = ""
    fps: int = 8
    video_format: Literal["mp4", "gif"] = "mp4"

    def __post_init__(self) -> None:
        if (self.sampling_timesteps is None) == (self.num_inference_steps is None):
            raise ValueError("ValidationRequest: give exactly one of sampling_timesteps and num_inference_steps")
        if self.sampler_kind not in ("sde", "ode"):
            raise ValueError(f"ValidationRequest.sampler_kind: expected 'sde' or 'ode', got {self.sampler_kind!r}")

    @property
    def num_steps(self) -> int:
        return len(self.sampling_timesteps) if self.sampling_timesteps is not None else self.num_inference_steps


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
