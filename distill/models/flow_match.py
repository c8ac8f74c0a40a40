"""Flow-matching primitives any flow-matching family reuses (Wan; a toy 2-D family in the tests).

x_t = (1 − σ) x0 + σ ε with σ = t / T; the denoiser predicts the velocity v = ε − x0, so
x0 = x_t − σ v. The training schedule is diffusers' FlowMatchEulerDiscreteScheduler with the
model's flow shift; sampling at exact timesteps, or fitting a stock scheduler to them for
export, is done here with that same scheduler.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from distill.adapter import Batch
from distill.config import Config
from distill.models.base import ModelPlugin
from distill.roles import RoleHandle
from distill.validation import SamplingSpec


class FlowMatchFamily(ModelPlugin):
    """A ModelPlugin whose noise is flow matching; a family adds its components and `predict_velocity`."""

    def __init__(self, cfg: Config, *, device: torch.device, frozen_dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device=device, frozen_dtype=frozen_dtype)
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                                               shift=cfg.model.flow_shift)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ = t / T (the scheduler's timesteps are σ · T)."""
        return t.float() / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = per_sample(self.sigma(t), x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def shift_timestep(self, t: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """σ' = shift σ / (1 + (shift − 1) σ); unset = the scheduler's own shift."""
        shift = self.noise_scheduler.config.shift if shift is None else shift
        s = self.sigma(t)
        return shift * s / (1.0 + (shift - 1.0) * s) * self.num_train_timesteps

    def predict_x0(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, batch: Batch, *,
                   conditional: bool) -> torch.Tensor:
        v = self.predict_velocity(handle, x_t, t, batch, conditional=conditional)
        return x_t.float() - per_sample(self.sigma(t), v) * v

    def sampling_scheduler(self, sampling: SamplingSpec) -> FlowMatchEulerDiscreteScheduler:
        """A scheduler that samples exactly as `sampling` says (sde re-noises, ode takes Euler steps)."""
        stochastic = sampling.sampler_kind == "sde"
        base = self.noise_scheduler.config
        if sampling.timesteps is None:
            return FlowMatchEulerDiscreteScheduler.from_config(base, stochastic_sampling=stochastic)
        scheduler = ExactTimestepsScheduler.from_config(base, shift=1.0, stochastic_sampling=stochastic)
        scheduler.fixed_timesteps = list(sampling.timesteps)
        return scheduler

    def export_scheduler(self, sampling: SamplingSpec) -> tuple[FlowMatchEulerDiscreteScheduler, float]:
        """A stock scheduler whose `set_timesteps(N)` gives `sampling`'s steps; and its max deviation from them."""
        stochastic = sampling.sampler_kind == "sde"
        if sampling.timesteps:
            return fit_flow_match_scheduler(list(sampling.timesteps), stochastic=stochastic, T=self.num_train_timesteps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config, stochastic_sampling=stochastic)
        scheduler.set_timesteps(sampling.num_inference_steps)
        return scheduler, 0.0


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast over `like` (B, ...)."""
    return values.to(like.device).view(-1, *[1] * (like.ndim - 1))


class ExactTimestepsScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler that samples exactly `fixed_timesteps`.

    Pipelines such as WanPipeline have no `timesteps` argument: they call
    `set_timesteps(num_inference_steps)`. Configure with shift=1 so that sigma = t / T exactly;
    `stochastic_sampling` (diffusers' own flag) turns each step into: predict x0, re-noise it
    with fresh noise (sde).
    """

    fixed_timesteps: list[float] | None = None

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if self.fixed_timesteps is None:
            return super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        ts = [float(t) for t in self.fixed_timesteps]
        if num_inference_steps is not None and num_inference_steps != len(ts):
            raise ValueError(f"asked for {num_inference_steps} steps, fixed schedule has {len(ts)}")
        T = self.config.num_train_timesteps
        super().set_timesteps(device=device, sigmas=[t / T for t in ts], timesteps=ts)


def flow_match_timesteps(num_steps: int, shift: float, terminal: float | None, T: int = 1000) -> np.ndarray:
    """The timesteps FlowMatchEulerDiscreteScheduler(shift, shift_terminal) gives for `num_steps` (its own math)."""

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigmas = shifted(np.linspace(1.0, shifted(1.0 / T), num_steps))
    if terminal:
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    return sigmas * T


def fit_flow_match_scheduler(timesteps: list[float], *, stochastic: bool, T: int = 1000):
    """A stock FlowMatchEulerDiscreteScheduler whose N-step schedule comes closest to `timesteps`.

    Stock pipelines only pass a step count, so the schedule must come from the config:
    shift and shift_terminal. Equally spaced steps from T are reproduced exactly (shift 1,
    terminal = last step); others as closely as the two parameters allow.
    Returns (scheduler, max |deviation| in timesteps).
    """
    target = np.asarray(timesteps, dtype=np.float64)
    n = len(target)

    def error(shift, terminal):
        err = float(np.abs(flow_match_timesteps(n, shift, terminal, T) - target).max())
        return err if np.isfinite(err) else float("inf")

    # shift_terminal puts the last step exactly where it is asked; the shift then fits the rest.
    terminal = target[-1] / T if 0 < target[-1] < T else None
    shifts = np.geomspace(0.05, 50.0, 4001)
    shift = min(shifts, key=lambda a: (round(error(a, terminal), 4), abs(np.log(a))))  # ties: closest to 1
    step = 0.01
    while step > 1e-9:  # refine: a step each way, halved when neither helps
        trial = min((shift * (1 + step), shift / (1 + step)), key=lambda a: error(a, terminal))
        if error(trial, terminal) < error(shift, terminal):
            shift = trial
        else:
            step /= 2
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=T, shift=float(shift), shift_terminal=None if terminal is None else float(terminal),
        stochastic_sampling=stochastic,
    )
    scheduler.set_timesteps(n)
    deviation = float(np.abs(scheduler.timesteps.numpy().astype(np.float64) - target).max())
    return scheduler, deviation
