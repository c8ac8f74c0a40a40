"""Sampling Wan roles through diffusers' WanPipeline, honouring a ValidationRequest exactly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import WanPipeline

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
        transformer = handle.modules[plugin.denoiser_key]
        scheduler = plugin.sampling_scheduler(request.sampling)
        pipe = WanPipeline(
            tokenizer=plugin.tokenizer, text_encoder=None, vae=plugin.vae, scheduler=scheduler, transformer=transformer
        )
        pipe.set_progress_bar_config(disable=True)
        shape = plugin.video_latent_shape(request.num_frames, request.height, request.width)
        negative = plugin.encode_prompts([request.negative_prompt])
        cfg_passes = 2 if request.sampling.guidance_scale > 1.0 else 1

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
                            guidance_scale=request.sampling.guidance_scale,
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
                "sampler_kind": request.sampling.sampler_kind,
                "timesteps": result.timesteps,
                "guidance_scale": request.sampling.guidance_scale,
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
