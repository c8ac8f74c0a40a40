"""Sampling Wan roles through diffusers' WanPipeline, honouring a ValidationRequest exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import WanPipeline
from torch import nn

from distill.validation import ValidationRequest, ValidationResult
from distill.video import contact_sheet, to_uint8_frames, write_video


class WanValidator:
    """Method-agnostic sampler: one video per (prompt, seed), an mp4 each, a contact sheet, meta.json."""

    def __init__(self, plugin):
        self.plugin = plugin

    @torch.no_grad()
    def run(self, request: ValidationRequest) -> ValidationResult:
        plugin = self.plugin
        handle = request.sample_handle
        experts = [handle.modules[key] for key in plugin.expert_keys]  # two: WanPipeline switches at boundary_ratio
        scheduler = plugin.sampling_scheduler(request.sampling)
        shape = plugin.video_latent_shape(request.num_frames, request.height, request.width)
        negative = plugin.encode_prompts([request.negative_prompt])
        guidance = request.sampling.guidance_scale
        cfg_passes = 2 if guidance > 1.0 else 1
        batched = cfg_passes == 2 and plugin.cfg.model.batched_cfg
        if batched:  # the pipeline then samples without guidance, and the denoiser it calls applies it
            denoisers, pipe_guidance, pipe_negative = [BatchedCFG(e, negative, guidance) for e in experts], 1.0, None
        else:
            denoisers, pipe_guidance, pipe_negative = experts, guidance, negative
        pipe = WanPipeline(
            tokenizer=plugin.tokenizer, text_encoder=None, vae=plugin.vae, scheduler=scheduler,
            transformer=denoisers[0], transformer_2=denoisers[1] if len(denoisers) > 1 else None,
            boundary_ratio=plugin.boundary_ratio,
        )
        pipe.set_progress_bar_config(disable=True)

        was_training = [e.training for e in experts]
        for e in experts:
            e.eval()
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
                            negative_prompt_embeds=pipe_negative,
                            latents=noise,
                            height=request.height,
                            width=request.width,
                            num_frames=request.num_frames,
                            num_inference_steps=request.num_steps,
                            guidance_scale=pipe_guidance,
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
            for e, training in zip(experts, was_training):
                e.train(training)

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
                "sampler_kind": request.sampling.sampler_kind,
                "timesteps": result.timesteps,
                "guidance_scale": guidance,
                "batched_cfg": batched,
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


class BatchedCFG(nn.Module):
    """The denoiser that a WanPipeline called with guidance_scale 1 runs: each call is one forward of twice the
    batch, the prompt's half and the negative prompt's, combined as the pipeline combines its two forwards,
    uncond + w (cond − uncond)."""

    def __init__(self, transformer: nn.Module, negative_prompt_embeds: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.transformer = transformer
        self.negative_prompt_embeds = negative_prompt_embeds
        self.guidance_scale = guidance_scale

    # What WanPipeline reads of its transformer besides calling it.
    config = property(lambda self: self.transformer.config)
    dtype = property(lambda self: self.transformer.dtype)
    device = property(lambda self: self.transformer.device)

    def cache_context(self, name: str, **kwargs):
        return self.transformer.cache_context(name, **kwargs)

    def forward(self, hidden_states, timestep, encoder_hidden_states, **kwargs):
        B = hidden_states.shape[0]
        negative = self.negative_prompt_embeds.to(encoder_hidden_states).expand(B, -1, -1)
        out = self.transformer(hidden_states=torch.cat([hidden_states, hidden_states]),
                               timestep=torch.cat([timestep, timestep]),
                               encoder_hidden_states=torch.cat([encoder_hidden_states, negative]),
                               **{**kwargs, "return_dict": False})[0]
        cond, uncond = out.chunk(2)
        return (uncond + self.guidance_scale * (cond - uncond),)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
