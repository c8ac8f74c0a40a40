"""Sampling Wan roles through diffusers' WanPipeline, honouring a ValidationRequest exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from distill.validation import ValidationRequest, ValidationResult
from distill.video import contact_sheet, to_uint8_frames, write_video


class ExactTimestepsScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler that samples exactly `fixed_timesteps`.

    WanPipeline has no `timesteps` argument: it calls `set_timesteps(num_inference_steps)`.
    Configure with shift=1 so that sigma = t / T exactly; `stochastic_sampling` (diffusers'
    own flag) turns each step into: predict x0, re-noise it with fresh noise (sde).
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


class WanValidator:
    """Method-agnostic sampler: one video per (prompt, seed), an mp4 each, a contact sheet, meta.json."""

    def __init__(self, plugin):
        self.plugin = plugin

    def scheduler_for(self, request: ValidationRequest) -> FlowMatchEulerDiscreteScheduler:
        base = self.plugin.noise_scheduler.config
        stochastic = request.sampler_kind == "sde"
        if request.sampling_timesteps is None:
            return FlowMatchEulerDiscreteScheduler.from_config(base, stochastic_sampling=stochastic)
        scheduler = ExactTimestepsScheduler.from_config(base, shift=1.0, stochastic_sampling=stochastic)
        scheduler.fixed_timesteps = list(request.sampling_timesteps)
        return scheduler

    @torch.no_grad()
    def run(self, request: ValidationRequest) -> ValidationResult:
        plugin = self.plugin
        handle = request.sample_handle
        transformer = handle.modules[plugin.denoiser_key]
        scheduler = self.scheduler_for(request)
        pipe = WanPipeline(
            tokenizer=plugin.tokenizer, text_encoder=None, vae=plugin.vae, scheduler=scheduler, transformer=transformer
        )
        pipe.set_progress_bar_config(disable=True)
        shape = plugin.video_latent_shape(request.num_frames, request.height, request.width)
        negative = plugin.encode_prompts([request.negative_prompt])
        cfg_passes = 2 if request.guidance_scale > 1.0 else 1

        was_training = transformer.training
        transformer.eval()
        videos, seconds, denoise_seconds, names = [], [], [], []
        try:
            for p_idx, prompt in enumerate(request.prompts):
                embeds = plugin.encode_prompts([prompt])
                for seed in request.seeds:
                    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(plugin.device)
                    marks = {}

                    def mark_denoised(pipe_, i, t, kwargs, marks=marks):
                        if i == pipe_.num_timesteps - 1:
                            _sync(plugin.device)
                            marks["denoised"] = time.perf_counter()
                        return {}

                    _sync(plugin.device)
                    start = time.perf_counter()
                    with torch.random.fork_rng(devices=[plugin.device] if plugin.device.type == "cuda" else []):
                        torch.manual_seed(seed)  # the sde re-noising draws from the global generator
                        out = pipe(
                            prompt_embeds=embeds,
                            negative_prompt_embeds=negative,
                            latents=noise,
                            height=request.height,
                            width=request.width,
                            num_frames=request.num_frames,
                            num_inference_steps=request.num_steps,
                            guidance_scale=request.guidance_scale,
                            output_type="latent" if plugin.vae is None else "np",
                            callback_on_step_end=mark_denoised,
                        ).frames
                    _sync(plugin.device)
                    seconds.append(time.perf_counter() - start)
                    denoise_seconds.append(marks["denoised"] - start)
                    if plugin.vae is None:
                        videos.append(to_uint8_frames(out[0]))  # pixels in [-1, 1]
                    else:
                        videos.append(to_uint8_frames(out[0], value_range=(0.0, 1.0)))
                    names.append(f"p{p_idx:02d}-s{seed}.{request.video_format}")
        finally:
            transformer.train(was_training)

        result = ValidationResult(
            frames=videos,
            seconds_per_video=seconds,
            denoising_seconds_per_video=denoise_seconds,
            function_evaluations_per_video=request.num_steps * cfg_passes,
            timesteps=[float(t) for t in scheduler.timesteps],
        )
        if request.output_dir is not None:
            out_dir = Path(request.output_dir)
            result.videos = [str(write_video(v, out_dir / n, fps=request.fps, full_chroma=False))  # browser-playable
                             for v, n in zip(videos, names)]
            result.contact_sheet = str(contact_sheet(videos, out_dir / "contact.png"))
            meta = {
                "role": handle.name,
                "sampler_kind": request.sampler_kind,
                "timesteps": result.timesteps,
                "guidance_scale": request.guidance_scale,
                "function_evaluations_per_video": result.function_evaluations_per_video,
                "prompts": request.prompts,
                "seeds": request.seeds,
                "videos": [Path(v).name for v in result.videos],
                "seconds_per_video": seconds,
                "denoising_seconds_per_video": denoise_seconds,
                "size": {"num_frames": request.num_frames, "height": request.height, "width": request.width},
            }
            result.meta = str(out_dir / "meta.json")
            Path(result.meta).write_text(json.dumps(meta, indent=2))
        return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
