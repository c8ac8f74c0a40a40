"""The `model` section of the run config: the plugin, its weights, and how its denoisers run (memory and speed).

A section of `distill.config.Config`, in a module of its own; loading it imports no model library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from distill.errors import ConfigError
from distill.locations import check_weights_source, hub_id
from distill.strict import check_seeds, positive

MAX_FLOW_SHIFT = 20.0
"""The largest flow shift a config takes: flow-matching video models use 3 to 17."""

CHECKPOINT_SAVE = ("attention", "matmul")
"""Kinds of operator whose outputs a recomputed block may keep (`model.checkpoint_save`)."""

RUNTIME_KEYS = ("model.gradient_checkpointing", "model.checkpoint_every", "model.checkpoint_save",
                "model.attention_backend", "model.compile", "model.compile_mode", "model.compile_backend",
                "model.compile_options", "model.batched_cfg", "model.vae_channels_last", "model.vae_compile")
"""Keys of this section that change how the model runs, not what it computes: a resumed run may change them, and
`wan_latency --against-stock` leaves them out of its stock build."""

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass(kw_only=True)
class ModelConfig:
    family: str = "wan"
    """Model plugin, by registry name."""
    preset: str | None = None
    """In-code architecture with random weights (`tiny`, `wan2.1-1.3b`); exclusive with `path`."""
    path: str | None = None
    """A diffusers model folder (a local path) or a hub model written `hub:<org>/<name>`, for `from_pretrained`."""
    pixel_space: bool = False
    """Train on pixels with no VAE (the shapes world); otherwise on VAE latents."""
    flow_shift: float = 3.0
    """Flow-matching timestep shift of the noise scheduler, in (0, 20] (Wan uses 3 at 480p, 5 at 720p)."""
    max_text_length: int = 512
    """Token length that prompt embeddings are padded to."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass of trainable transformers."""
    checkpoint_every: int = 1
    """With gradient_checkpointing: recompute blocks 0, n, 2n, ... only (1 = all); the rest keep their activations."""
    checkpoint_save: list[str] = field(default_factory=list)
    """With gradient_checkpointing: a recomputed block keeps the outputs of these operators and recomputes the rest
    (selective checkpointing): "attention" (the attention kernels, most of a block's time at long sequences),
    "matmul" (the linears). Empty = recompute everything."""
    attention_backend: str | None = None
    """diffusers attention backend of every role's transformer (native, _native_cudnn, flash, ...); unset = default."""
    compile: bool = False
    """torch.compile every transformer block of every role (diffusers' regional compile_repeated_blocks)."""
    compile_mode: CompileMode | None = None
    """torch.compile mode of the blocks (inductor's); unset = torch's default."""
    compile_backend: str = "inductor"
    """torch.compile backend of the blocks (inductor; aot_eager or eager to debug)."""
    compile_options: dict[str, Any] = field(default_factory=dict)
    """Inductor settings for what compiles (torch.compile's `options`, keys of `torch._inductor.config`, e.g.
    `{split_reductions: false}`), over those of `compile_mode` and distill's own (`distill.models.compiling`)."""
    vae_channels_last: bool = False
    """Hold the VAE's 5-D conv weights channels-last (`torch.channels_last_3d`), so its convolutions run in the
    layout cuDNN is fastest in; the same numbers up to float rounding (latent models only)."""
    vae_compile: bool = False
    """torch.compile the VAE's decoder (with `compile_mode` and `compile_backend`), in place; it compiles on the first
    decode of each video length (latent models only)."""
    init_seed: int = 0
    """Seed of a preset's random weights, in [0, 2**32): the same seed gives the same weights in every run and tool."""
    batched_cfg: bool = True
    """Run classifier-free guidance's prompt and negative-prompt passes as one forward of twice the batch (on:
    equal to two forwards up to float rounding, and fewer, larger kernels); off = two forwards."""

    def validate(self, path: str) -> None:
        if (self.preset is None) == (self.path is None):
            raise ConfigError(f"{path}: set exactly one of {path}.preset and {path}.path")
        positive(self, path, "flow_shift", "max_text_length", "checkpoint_every")
        check_seeds(path, "init_seed", [self.init_seed])
        if self.flow_shift > MAX_FLOW_SHIFT:
            raise ConfigError(f"{path}.flow_shift: must be at most {MAX_FLOW_SHIFT}, got {self.flow_shift}")
        if self.path is not None:
            if self.path.startswith("s3://"):
                raise ConfigError(f"{path}.path: a model is loaded from a local folder or hub:<id>, not from s3://")
            check_weights_source(self.path, f"{path}.path")
        self._check_speed_settings(path)

    def _check_speed_settings(self, path: str) -> None:
        """A setting that a switch left off would ignore is refused rather than silently dropped."""
        if self.checkpoint_every != 1 and not self.gradient_checkpointing:
            raise ConfigError(f"{path}.checkpoint_every: only means something with {path}.gradient_checkpointing: "
                              f"true (got {self.checkpoint_every} with gradient checkpointing off)")
        if self.checkpoint_save and not self.gradient_checkpointing:
            raise ConfigError(f"{path}.checkpoint_save: only means something with {path}.gradient_checkpointing: true")
        for kind in self.checkpoint_save:
            if kind not in CHECKPOINT_SAVE:
                raise ConfigError(f"{path}.checkpoint_save: unknown kind {kind!r}; one of {', '.join(CHECKPOINT_SAVE)}")
        if len(set(self.checkpoint_save)) != len(self.checkpoint_save):
            raise ConfigError(f"{path}.checkpoint_save: {self.checkpoint_save} names a kind twice")
        if not (self.compile or self.vae_compile):
            for key, unset in (("compile_mode", None), ("compile_backend", "inductor"), ("compile_options", {})):
                if getattr(self, key) != unset:
                    raise ConfigError(f"{path}.{key}: only means something with {path}.compile: true or "
                                      f"{path}.vae_compile: true")
        if self.pixel_space:
            for key in ("vae_channels_last", "vae_compile"):
                if getattr(self, key):
                    raise ConfigError(f"{path}.{key}: a pixel-space model ({path}.pixel_space: true) has no VAE")
        for key, unset in (("compile_mode", None), ("compile_options", {})):
            if getattr(self, key) != unset and self.compile_backend != "inductor":
                raise ConfigError(f"{path}.{key}: inductor's settings; with compile_backend {self.compile_backend!r} "
                                  f"leave it unset")
        graphs = {"compile_mode": self.compile_mode in ("reduce-overhead", "max-autotune"),
                  "compile_options": bool(self.compile_options.get("triton.cudagraphs"))}
        for key, cuda_graphs in graphs.items():
            if self.compile and cuda_graphs:
                raise ConfigError(f"{path}.{key}: CUDA graphs of the transformer's repeated blocks overwrite one "
                                  f"block's output with the next one's replay (H200, torch 2.11; docs/PERFORMANCE.md); "
                                  f"use max-autotune-no-cudagraphs, or CUDA graphs for {path}.vae_compile alone")

    @property
    def pretrained(self) -> str | None:
        """What `from_pretrained` takes: the folder, or the hub id without its `hub:`."""
        return hub_id(self.path) or self.path
