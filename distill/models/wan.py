"""Wan 2.1 / 2.2 through diffusers: WanTransformer3DModel, AutoencoderKLWan (or pixels), UMT5.

Weights come from a diffusers model folder (`model.path`: a local path or `hub:<id>`) or from
an in-code size preset with random weights (`model.preset`, `distill.models.wan_presets`: `tiny`
for tests, `wan2.1-1.3b` for benchmarks). A two-expert model (Wan 2.2 A14B) gives every role both
experts, each call routed by its timestep as WanPipeline routes it. Pixel space (`model.pixel_space`)
trains the transformer directly on videos in [-1, 1] with no VAE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from torch import nn

from distill.adapter import Batch, BatchError, LatentsSource
from distill.config import Config
from distill.locations import hub_id
from distill.errors import ConfigError, InputError
from distill.models.casting import cast_frozen
from distill.models.compiling import compile_kwargs, raise_recompile_limit
from distill.models.flow_match import FlowMatchFamily
from distill.models.lora import ADAPTER_FILE, is_adapter_folder, read_adapter
from distill.models.wan_presets import _PART_SEEDS, EXPERTS, PRESETS
from distill.roles import RoleHandle
from distill.validation import SamplingSpec


class WanPlugin(FlowMatchFamily):
    """Builds Wan roles and serves the step-time primitives (flow matching: see FlowMatchFamily)."""

    presets = tuple(PRESETS)
    # Every block's attention projections (self and cross) and its feed-forward linears
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]

    def __init__(self, cfg: Config, *, device: torch.device, frozen_dtype: torch.dtype = torch.float32):
        super().__init__(cfg, device=device, frozen_dtype=frozen_dtype)
        m = cfg.model
        if m.preset is not None and m.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {m.preset!r}; known: {', '.join(PRESETS)}")
        if m.path is not None and hub_id(m.path) is None and not Path(m.path).is_dir():
            raise ConfigError(f"model.path: {m.path} is not a folder")
        self.vae = None if m.pixel_space else self._set_up_vae(self._frozen(self._load_vae()))
        self.tokenizer = self._load_tokenizer()
        self._text_encoder: nn.Module | None = None  # built on first use: batches may carry embeddings
        self._embeds: dict[str, torch.Tensor] = {}
        self.latent_channels = 3 if m.pixel_space else self.vae.config.z_dim
        self.boundary_ratio = self._boundary_ratio()
        """Two experts: the fraction of T at and above which `transformer` runs, below it `transformer_2`."""
        self.latents_key = "pixels" if m.pixel_space else "vae_latent"
        self.latent_shape = self.video_latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width, key="data")

    @classmethod
    def check_runtime(cls, cfg: Config, device: torch.device, *, backward: bool) -> None:
        super().check_runtime(cfg, device, backward=backward)
        if cfg.model.attention_backend is not None:
            bf16 = device.type == "cuda" and cfg.training.mixed_precision != "fp32"
            check_attention_backend(cfg.model.attention_backend, device, torch.bfloat16 if bf16 else torch.float32,
                                    backward=backward)

    # -- building --------------------------------------------------------------------------

    def _preset(self, part: str) -> dict:
        return dict(PRESETS[self.cfg.model.preset][part])

    @contextlib.contextmanager
    def _preset_seed(self, part: str):
        """Random preset weights depend on model.init_seed and the part alone, not on call order."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.model.init_seed * 1009 + _PART_SEEDS[part])
            yield

    def _boundary_ratio(self) -> float | None:
        """A preset's, or that of model.path's pipeline (its model_index.json) when it has a `transformer_2`."""
        m = self.cfg.model
        if m.preset is not None:
            return PRESETS[m.preset].get("boundary_ratio")
        from diffusers import DiffusionPipeline

        if hub_id(m.path) is None and not (Path(m.path) / "model_index.json").is_file():
            return None
        index = DiffusionPipeline.load_config(m.pretrained)
        if (index.get("transformer_2") or [None])[0] is None:
            return None
        if index.get("boundary_ratio") is None:
            raise ConfigError(f"model.path: {m.path} has a transformer_2 but no boundary_ratio in its model_index.json")
        return float(index["boundary_ratio"])

    @property
    def expert_keys(self) -> tuple[str, ...]:
        return EXPERTS if self.boundary_ratio is not None else (self.denoiser_key,)

    def new_denoiser(self, expert: str | None = None) -> WanTransformer3DModel:
        m, expert = self.cfg.model, expert or self.denoiser_key
        if m.path is not None:
            return self.load_denoiser(m.path, key="model.path", expert=expert)
        channels = 3 if m.pixel_space else self.vae.config.z_dim
        # Random init straight on the device: 1.3B params init fast there.
        with torch.device(self.device), self._preset_seed(expert):
            return WanTransformer3DModel(**self._preset("transformer"), in_channels=channels, out_channels=channels)

    def load_denoiser(self, path: str, key: str, expert: str | None = None) -> WanTransformer3DModel:
        expert = expert or self.denoiser_key
        if hub_id(path) is not None:
            return WanTransformer3DModel.from_pretrained(hub_id(path), subfolder=expert, torch_dtype=torch.float32)
        folder = Path(path)
        if (folder / expert / "config.json").is_file():
            return WanTransformer3DModel.from_pretrained(folder, subfolder=expert, torch_dtype=torch.float32)
        if (folder / "config.json").is_file():  # a transformer's own folder
            return WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32)
        raise ConfigError(f"{key}: {path} holds no {expert} (no config.json in it or in its {expert}/)")

    def _load_vae(self) -> AutoencoderKLWan:
        if self.cfg.model.path is not None:
            return AutoencoderKLWan.from_pretrained(self.cfg.model.pretrained, subfolder="vae", torch_dtype=torch.float32)
        with self._preset_seed("vae"):
            return AutoencoderKLWan(**self._preset("vae"))

    def _set_up_vae(self, vae: AutoencoderKLWan) -> AutoencoderKLWan:
        """The model section's VAE speed settings, in place (its state-dict keys stay): channels-last conv weights,
        a compiled decoder. Every decode goes through them: validation, the bench, WanPipeline."""
        m = self.cfg.model
        if m.vae_channels_last:
            for conv in (module for module in vae.modules() if isinstance(module, nn.Conv3d)):  # (Module.to: 4-D too)
                conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        if m.vae_compile:
            # The decoder runs once per latent frame with the causal cache's lists: the first frame, the second (a
            # one-frame cache) and the rest are three graphs, three more when the video length first changes (then
            # its strides are dynamic), and none after (tested): far under the raised limit, nothing runs eager.
            raise_recompile_limit()
            vae.decoder.compile(**compile_kwargs(m))
        return vae

    def _load_tokenizer(self):
        if self.cfg.model.path is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.cfg.model.pretrained, subfolder="tokenizer")
        from transformers import ByT5Tokenizer  # needs no files; presets have random weights anyway

        return ByT5Tokenizer()

    @property
    def text_encoder(self) -> nn.Module:
        if self._text_encoder is None:
            from transformers import UMT5Config, UMT5EncoderModel

            if self.cfg.model.path is not None:
                encoder = UMT5EncoderModel.from_pretrained(self.cfg.model.pretrained, subfolder="text_encoder")
            else:
                with self._preset_seed("text_encoder"):
                    encoder = UMT5EncoderModel(UMT5Config(**self._preset("text_encoder")))
            self._text_encoder = self._frozen(encoder)
        return self._text_encoder

    def _frozen(self, module: nn.Module) -> nn.Module:
        return cast_frozen(module.to(self.device).eval().requires_grad_(False), self.frozen_dtype)

    def copy_denoiser(self, module: nn.Module, memo: dict | None = None) -> nn.Module:
        from distill.models.sequence_parallel import copied

        return copied(module, memo)

    def enable_sequence_parallel(self, module: nn.Module) -> None:
        from distill.models.sequence_parallel import enable_ulysses

        patch = module.config.patch_size
        sizes = {"data": self.cfg.data, "validation": self.cfg.validation}
        tokens = {}
        for key, part in sizes.items():
            num_frames, height, width = (getattr(part, k, None) or getattr(self.cfg.data, k)
                                         for k in ("num_frames", "height", "width"))
            _, f, h, w = self.video_latent_shape(num_frames, height, width, key=key)
            tokens[key] = f // patch[0] * (h // patch[1]) * (w // patch[2])
        enable_ulysses(module, self.sequence_mesh, self.device, tokens)

    def video_latent_shape(self, num_frames: int, height: int, width: int, key: str = "validation") -> tuple[int, ...]:
        """(C, F, H, W) of the transformer's input for a video of this size; errors name `key`."""
        patch = self._preset("transformer")["patch_size"] if self.cfg.model.preset else (1, 2, 2)
        if self.cfg.model.pixel_space:
            t_factor, s_factor = 1, 1
        else:
            t_factor, s_factor = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
        if (num_frames - 1) % t_factor:
            raise ConfigError(f"{key}.num_frames: {num_frames} - 1 must be a multiple of {t_factor} (the VAE's time stride)")
        for name, size in (("height", height), ("width", width)):
            if size % (s_factor * patch[1]):
                raise ConfigError(f"{key}.{name}: {size} must be a multiple of {s_factor * patch[1]}")
        return (self.latent_channels, (num_frames - 1) // t_factor + 1, height // s_factor, width // s_factor)

    def identity(self) -> dict:
        """What preprocessed data depends on: the VAE / pixel space and the text encoder, and their settings."""
        m = self.cfg.model
        return {
            "family": m.family,
            "weights": self._encoder_weights(),
            "pixel_space": m.pixel_space,
            "max_text_length": m.max_text_length,
            "latent_channels": self.latent_channels,
        }

    def _encoder_weights(self) -> str:
        """The text encoder's (and in latent space the VAE's) weights, in words: model.path, or for a preset its
        encoders' settings and the seed, so that presets differing only in the transformer share shards."""
        m = self.cfg.model
        if m.path is not None:
            return m.path
        parts = {"text_encoder": self._preset("text_encoder"), **({} if m.pixel_space else {"vae": self._preset("vae")})}
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
        return f"preset-encoders:{digest}:init_seed={m.init_seed}"

    # -- encoding (text, videos) ------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], cache: bool = True) -> torch.Tensor:
        """UMT5 embeddings (B, max_text_length, D), padded with zeros as WanPipeline does.

        `cache` keeps each prompt's embedding (training and validation prompts repeat);
        preprocessing of a large caption set passes False.
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if not missing:
            return torch.stack([self._embeds[p] for p in prompts])
        pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=None, scheduler=self.noise_scheduler)
        embeds, _ = pipe.encode_prompt(
            missing, do_classifier_free_guidance=False, max_sequence_length=self.cfg.model.max_text_length,
            device=self.device, dtype=torch.float32,
        )
        found = dict(zip(missing, embeds))
        if cache:
            self._embeds.update(found)
        return torch.stack([self._embeds[p] if p in self._embeds else found[p] for p in prompts])

    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> the transformer's x0: pixels as they are, or normalised VAE latents.

        The normalisation (z − latents_mean) / latents_std is the inverse of what WanPipeline
        applies before decoding.
        """
        if self.vae is None:
            return videos
        z = self.vae.encode(videos.to(self.device, self.vae.dtype)).latent_dist.mode().float()
        mean = torch.tensor(self.vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
        return (z - mean) / std

    # -- adapter primitives ----------------------------------------------------------------

    def prepare_batch(self, raw: dict, *, latents_source: LatentsSource) -> Batch:
        if "prompt_embeds" in raw:
            cond = raw["prompt_embeds"].to(self.device, torch.float32)
        elif "prompt" in raw:
            cond = self.encode_prompts(list(raw["prompt"]))
        else:
            raise BatchError(f"batch has neither 'prompt' nor 'prompt_embeds' (keys: {', '.join(raw)})")
        B = cond.shape[0]
        if "negative_prompt_embeds" in raw:
            uncond = raw["negative_prompt_embeds"].to(self.device, torch.float32)
        else:
            uncond = self.encode_prompts([self.cfg.data.negative_prompt]).expand(B, -1, -1)
        if latents_source == "data":
            if self.latents_key not in raw:
                raise BatchError(
                    f"this method trains on data latents, but the batch has no {self.latents_key!r} "
                    f"(keys: {', '.join(raw)}); preprocess videos into shards that carry it, "
                    f"or configure the method to start from noise (prompts only)"
                )
            latents = raw[self.latents_key].to(self.device, torch.float32)
            from_data = True
        else:
            latents = torch.zeros(B, *self.latent_shape, device=self.device)
            from_data = False
        return Batch(latents=latents, prompt_embeds=cond, negative_prompt_embeds=uncond, from_data=from_data)

    def predict_velocity(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, batch: Batch, *,
                         conditional: bool) -> torch.Tensor:
        """The transformer's flow output v = ε − x0, in fp32. Two experts: each sample goes to the one its timestep
        selects, as in WanPipeline (`transformer` where t ≥ boundary_ratio · T, else `transformer_2`)."""
        embeds = batch.prompt_embeds if conditional else batch.negative_prompt_embeds
        if self.boundary_ratio is None:
            return self._velocity(handle, self.denoiser_key, x_t, t, embeds)
        t = t.to(x_t.device)
        high = t >= self.boundary_ratio * self.num_train_timesteps
        if high.all() or not high.any():
            return self._velocity(handle, EXPERTS[0] if high[0] else EXPERTS[1], x_t, t, embeds)
        out = torch.empty(x_t.shape, device=x_t.device, dtype=torch.float32)
        for expert, rows in zip(EXPERTS, (high, ~high)):
            out[rows] = self._velocity(handle, expert, x_t[rows], t[rows], embeds[rows])
        return out

    def _velocity(self, handle: RoleHandle, expert: str, x_t: torch.Tensor, t: torch.Tensor,
                  embeds: torch.Tensor) -> torch.Tensor:
        module = handle.module(expert)
        dtype = next(handle.modules[expert].parameters()).dtype
        out = module(
            hidden_states=x_t.to(dtype), timestep=t.to(x_t.device), encoder_hidden_states=embeds.to(dtype), return_dict=False
        )[0]
        return out.float()

    def block_feature_shape(self, handle: RoleHandle) -> tuple[int, int]:
        if self.boundary_ratio is not None:
            raise NotImplementedError("a two-expert model (Wan 2.2 A14B) has two sequences of blocks; block features "
                                      "of one are not supported yet")
        config = handle.modules[self.denoiser_key].config
        return config.num_layers, config.num_attention_heads * config.attention_head_dim

    # -- sampling and export ---------------------------------------------------------------

    def validator(self):
        from distill.models.wan_sampling import WanValidator

        return WanValidator(self)

    def export_pipeline(self, modules_folder: Path, out_dir: Path, sampling: SamplingSpec, *, fuse: bool = False) -> dict:
        """Save a stock WanPipeline folder: the role's transformer, the shared components, a scheduler for `sampling`.
        A LoRA role's adapters are saved as diffusers LoRA files beside the scheduler (one per expert it trained),
        or with `fuse` merged into the base weights of a whole pipeline folder."""
        adapters = [e for e in self.expert_keys if is_adapter_folder(Path(modules_folder) / e)]
        lora = bool(adapters)
        if fuse and not lora:
            raise InputError(f"--fuse: the checkpoint's {self.denoiser_key} holds whole weights, not a LoRA adapter; "
                             f"export it without --fuse")
        scheduler, deviation = self.export_scheduler(sampling)
        record = {
            "load": {}, "fused_lora": lora and fuse,
            "call": {"num_inference_steps": len(scheduler.timesteps), "guidance_scale": sampling.guidance_scale,
                     "max_sequence_length": self.cfg.model.max_text_length,
                     "output_type": "latent (pixels in [-1, 1])" if self.vae is None else "np"},
            "sampler_kind": sampling.sampler_kind,
            "timesteps_trained": None if sampling.timesteps is None else list(sampling.timesteps),
            "timesteps_exported": [float(t) for t in scheduler.timesteps],
            "max_timestep_deviation": deviation,
            "pixel_space": self.vae is None,
            "negative_prompt": self.cfg.data.negative_prompt,
        }
        if lora and not fuse:
            # WanPipeline.load_lora_weights(OUT_DIR) loads the first expert's file; the second's loads with its
            # weight_name and load_into_transformer_2=True (an expert the role kept frozen has none: the base's)
            loads = []
            for expert in adapters:
                tensors, config, base = read_adapter(Path(modules_folder) / expert)
                name = ADAPTER_FILE if expert == self.denoiser_key else ADAPTER_FILE.replace(".", f"_{expert}.", 1)
                WanPipeline.save_lora_weights(out_dir, transformer_lora_layers=tensors, weight_name=name,
                                              transformer_lora_adapter_metadata=config)
                loads.append({"weight_name": name, **({"load_into_transformer_2": True} if expert != self.denoiser_key
                                                      else {})})
            scheduler.save_pretrained(Path(out_dir) / "scheduler")
            return {**record, "lora": {"load_lora_weights": loads, "base": base}}
        experts = {e: self.load_exported(str(Path(modules_folder) / e), key=f"export/{e}", expert=e)
                   for e in self.expert_keys}
        pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=scheduler, **experts, boundary_ratio=self.boundary_ratio)
        pipe.save_pretrained(out_dir)
        if self.vae is None:  # pixel space: record the absent VAE as diffusers records an absent transformer_2
            index = Path(out_dir) / "model_index.json"
            index.write_text(json.dumps({**json.loads(index.read_text()), "vae": [None, None]}, indent=2))
            # WanPipeline lists no VAE as optional: a pixel-space folder loads with from_pretrained(out, vae=None).
            record["load"] = {"vae": None}
        return record


def check_attention_backend(name: str, device: torch.device, dtype: torch.dtype, *, backward: bool) -> None:
    """A ConfigError naming model.attention_backend unless the backend runs here: its package is there (a Hub
    kernel is fetched, as set_attention_backend would), and a tiny attention call in `dtype` goes through it,
    and its backward when roles train (some kernels only infer)."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        _maybe_download_kernel_for_backend,
        dispatch_attention_fn,
    )

    backend = AttentionBackendName(name)
    try:
        _check_attention_backend_requirements(backend)
        _maybe_download_kernel_for_backend(backend)
        # (batch, tokens, heads, head dim), as Wan's attention processor calls it; no random draw, so that a
        # checked run draws the same numbers as an unchecked one
        q = torch.linspace(-1, 1, 16 * 2 * 64, device=device, dtype=dtype).reshape(1, 16, 2, 64)
        q.requires_grad_(backward)
        out = dispatch_attention_fn(q, q, q, backend=backend)
        if backward:
            out.float().sum().backward()
    except Exception as err:  # whatever stops the backend here would stop the run mid-build or at its first step
        reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        what = f"{device.type}, {str(dtype).removeprefix('torch.')}{', with backward' if backward else ''}"
        raise ConfigError(f"model.attention_backend: {name!r} does not run here ({what}): {reason}; "
                          f"unset it for diffusers' default (native)") from None
