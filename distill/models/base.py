"""The model-plugin contract: everything the trainer, methods, bench and export ask of a model family.

A plugin assembles a family's components (denoiser, text encoder, VAE) into roles at build
time and serves step-time primitives to methods. It knows nothing of any training method.
A new family is one module that subclasses `ModelPlugin` (a flow-matching family subclasses
`distill.models.flow_match.FlowMatchFamily`, which gives the noise primitives) plus a
`register_model` line in `distill/models/__init__.py`.

Conventions of every primitive: x0, x_t, noise are float32 tensors of shape (B, *latent_shape)
on `device`; t is a (B,) float tensor of timesteps in [0, T] with T = num_train_timesteps,
t = T the pure-noise end; σ(t) is the fraction of noise at t.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from distill.adapter import Batch, LatentsSource
from distill.config import Config
from distill.locations import hub_id
from distill.errors import ConfigError
from distill.models.casting import cast_role
from distill.models.checkpointing import checkpoint_inside, checkpoint_marked_blocks
from distill.models.compiling import compile_kwargs, raise_recompile_limit
from distill.models.lora import add_lora, adapter_base, base_fingerprint, fused, is_adapter_folder, share_weights
from distill.role_config import init_order
from distill.roles import RoleHandle, RoleManager
from distill.run_layout import resolve_export
from distill.validation import SamplingSpec, Validator


class ModelPlugin(ABC):
    num_train_timesteps: ClassVar[int] = 1000
    """T: timesteps of the training noise schedule."""
    denoiser_key: ClassVar[str] = "transformer"
    """The name of a role's denoiser module (the family's diffusers component name)."""
    lora_target_modules: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    """The denoiser's linears a LoRA role adapts unless roles.<name>.lora.target_modules says otherwise."""

    noise_scheduler: Any
    """The family's diffusers training scheduler; `.timesteps` is its T-step (shifted) schedule, noisiest first."""
    latents_key: str
    """The data field that holds x0 ("vae_latent", or "pixels" in pixel space)."""
    latent_shape: tuple[int, ...]
    """(C, F, H, W) of one training sample's x0 at the configured video size."""

    def __init__(self, cfg: Config, *, device: torch.device, frozen_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.sequence_mesh = None
        """Set by the trainer when parallel.sequence_parallel_size > 1: every denoiser set up then splits its tokens."""
        self.device = torch.device(device)
        self.frozen_dtype = frozen_dtype
        """dtype of frozen roles and components (bf16 on GPU)."""
        self.check_runtime(cfg, self.device, backward=False)

    # -- building roles --------------------------------------------------------------------

    @property
    def expert_keys(self) -> tuple[str, ...]:
        """The denoisers every role holds, by module name: one (`denoiser_key`), or a family's experts (Wan 2.2
        A14B: `transformer` for high noise, `transformer_2` for low), each call routed by its timestep."""
        return (self.denoiser_key,)

    @abstractmethod
    def new_denoiser(self, expert: str | None = None) -> nn.Module:
        """The model's own weights of denoiser `expert` (default: `denoiser_key`), from model.path or a preset's
        random init, fp32."""

    @abstractmethod
    def load_denoiser(self, path: str, key: str, expert: str | None = None) -> nn.Module:
        """Denoiser `expert` (default: `denoiser_key`) from a folder, fp32; `key` names the config key for errors."""

    def load_module(self, name: str, folder: str) -> nn.Module:
        """Module `name` of an exported role, from its folder; every exported module is a denoiser by default."""
        return self.load_exported(folder, key=f"export/{name}", expert=name)

    def load_exported(self, folder: str, key: str, expert: str | None = None) -> nn.Module:
        """A denoiser from a checkpoint's export folder, fp32: a diffusers folder, or a LoRA adapter fused into the
        model's own weights (refused unless they are the base it was trained on)."""
        if is_adapter_folder(Path(folder)):
            # its base: a source this run's roles start from (a teacher folder or checkpoint), else the model's own
            base = adapter_base(Path(folder))["weights"]
            if base in {self.weights_of(name) for name in self.cfg.roles} - {self.model_weights()}:
                module = self.source_denoiser(base, f"{key} (its LoRA base)", expert)
            else:
                module, base = self.new_denoiser(expert), self.model_weights()
            return fused(module, Path(folder), base, where=f"{key} ({folder})")
        return self.load_denoiser(folder, key=key)

    def source_denoiser(self, source: str | None, key: str, expert: str) -> nn.Module:
        """Denoiser `expert` from an init_from source other than a role: None (the model's own weights), a hub id, a
        checkpoint (its exported denoiser) or a diffusers folder; fp32."""
        if source is None:
            return self.new_denoiser(expert)
        if hub_id(source) is not None:
            return self.load_denoiser(source, key, expert)
        export = resolve_export(source, self.cfg.storage)
        return self.load_exported(str(Path(export) / expert), key, expert) if export else self.load_denoiser(
            source, key, expert)

    def build_roles(self, names: list[str] | None = None) -> RoleManager:
        """A handle per configured role (or per role in `names`), weights resolved through `init_from`,
        frozen roles frozen."""
        roles = self.cfg.roles
        wanted = set(roles if names is None else names)
        needed = set()
        for name in wanted:  # the roles asked for and those they start from
            while name in roles and name not in needed:
                needed.add(name)
                name = roles[name].init_from
        experts = self.expert_keys
        # A frozen role that no full-weight role copies is cast as each of its denoisers is made: the fp32 weights of
        # one expert at a time, not of all (two 14B experts in fp32 would not fit one GPU beside their bf16 copies).
        copied_in_fp32 = {r.init_from for r in roles.values() if r.trainable and r.lora is None}

        def made(name: str, module: nn.Module) -> nn.Module:
            if roles[name].trainable or name in copied_in_fp32:
                return module
            return cast_role(module.to(self.device).eval().requires_grad_(False), self.frozen_dtype)

        trains: dict[str, set[str]] = {name: self._trained_experts(name) for name in needed}  # checked before any build
        modules: dict[str, dict[str, nn.Module]] = {}  # role -> its denoisers by module name, fp32 unless frozen
        for name in (n for n in init_order(roles) if n in needed):
            source = roles[name].init_from
            key = f"roles.{name}.init_from"
            if roles[name].share_base:
                continue  # its base is the source role's modules, once those are cast (below)
            if source in roles:
                modules[name] = copy.deepcopy(modules[source])  # fp32 when a full-weight role copies it (`made`)
            else:  # a checkpoint (or a run's checkpoints/latest) means its exported denoisers
                modules[name] = {e: made(name, self.source_denoiser(source, key, e)) for e in experts}
        built: dict[str, dict[str, nn.Module]] = {}
        for name in (n for n in init_order(roles) if n in needed):  # a shared base before the roles sharing it
            role = roles[name]
            built[name] = {}
            for e in experts:
                if role.share_base:
                    module = share_weights(built[role.init_from][e])  # the base role's, frozen and cast already
                else:
                    module = modules[name][e].to(self.device)
                if role.lora is not None and not role.share_base:  # a base of its own, frozen like the teacher's
                    cast_role(module.requires_grad_(False), self.frozen_dtype)
                if e not in trains[name]:
                    cast_role(module.eval().requires_grad_(False), self.frozen_dtype)
                elif role.lora is not None:
                    add_lora(module, role.lora, self.lora_target_modules, key=f"roles.{name}.lora")
                    module.train()
                else:
                    module.train().requires_grad_(True)
                built[name][e] = module
        handles = {}
        for name in (n for n in roles if n in wanted):
            role = roles[name]
            for e, module in built[name].items():
                self.set_up_denoiser(module, trainable=e in trains[name])
            base = ({e: base_fingerprint(m, self.weights_of(name)) for e, m in built[name].items()
                     if e in trains[name]} if role.lora is not None else None)
            handles[name] = RoleHandle(name=name, modules=built[name], trainable=role.trainable, base=base)
        return RoleManager(handles)

    def _trained_experts(self, name: str) -> set[str]:
        """The denoisers role `name` trains: none when it is frozen, `roles.<name>.experts` or all."""
        role = self.cfg.roles[name]
        if not role.trainable:
            return set()
        if role.experts is None:
            return set(self.expert_keys)
        unknown = [e for e in role.experts if e not in self.expert_keys]
        if unknown:
            raise ConfigError(f"roles.{name}.experts: {', '.join(unknown)} is not a denoiser of this model; it has "
                              f"{', '.join(self.expert_keys)}")
        return set(role.experts)

    def weights_of(self, role: str) -> str:
        """Where a role's weights come from, in words: the checkpoint or hub id its init_from chain ends at, else
        the model's (model.path, or the preset and its seed)."""
        roles = self.cfg.roles
        while role in roles and roles[role].init_from in roles:
            role = roles[role].init_from
        if role in roles and roles[role].init_from is not None:
            return roles[role].init_from
        return self.model_weights()

    def model_weights(self) -> str:
        """The model's own weights, in words: model.path, or the preset and its seed."""
        m = self.cfg.model
        return m.path if m.path is not None else f"preset:{m.preset}:init_seed={m.init_seed}"

    def frozen_role(self, name: str, modules: dict[str, nn.Module]) -> RoleHandle:
        """A frozen handle around modules (e.g. a checkpoint's exported student, for sampling)."""
        for module in modules.values():
            cast_role(module.to(self.device).eval().requires_grad_(False), self.frozen_dtype)
        for key in self.expert_keys:
            if key in modules:
                self.set_up_denoiser(modules[key], trainable=False)
        return RoleHandle(name=name, modules=dict(modules), trainable=False)

    def set_up_denoiser(self, module: nn.Module, *, trainable: bool) -> None:
        """Apply the model section's speed settings to a role's denoiser, in place (its state-dict keys stay):
        activation checkpointing when it trains, the attention backend, regional compilation. Through the
        methods of diffusers' ModelMixin; a family of other models overrides it."""
        m = self.cfg.model
        if trainable and m.gradient_checkpointing:
            blocks = self.denoiser_blocks(module)
            for i, block in enumerate(blocks):
                block._recompute, block._checkpoint_save = i % m.checkpoint_every == 0, tuple(m.checkpoint_save)
            if m.compile:
                # Inside each block, so that its compiled graph holds the recompute (torchtitan's order). diffusers'
                # checkpointing wraps the compiled block instead: on an H200 (torch 2.11) that gave other gradients
                # on each identical call (docs/PERFORMANCE.md, "compile").
                for block in blocks:
                    checkpoint_inside(block)
            elif m.checkpoint_every == 1 and not m.checkpoint_save:
                module.enable_gradient_checkpointing()
            else:
                module.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_marked_blocks)
        if m.attention_backend is not None:
            module.set_attention_backend(m.attention_backend)
        if self.sequence_mesh is not None:
            self.enable_sequence_parallel(module)
        if m.compile:
            raise_recompile_limit()
            module.compile_repeated_blocks(**compile_kwargs(m))

    def copy_denoiser(self, module: nn.Module, memo: dict | None = None) -> nn.Module:
        """A deep copy of a set-up denoiser (`memo`: copy.deepcopy's, e.g. parameters to share, not copy)."""
        return copy.deepcopy(module, memo)

    def enable_sequence_parallel(self, module: nn.Module) -> None:
        """Split the denoiser's sequence over the ranks of `sequence_mesh`'s "ulysses" dimension, in place."""
        raise ConfigError(f"parallel.sequence_parallel_size: model family {self.cfg.model.family!r} has no sequence "
                          f"parallelism")

    @classmethod
    def check_runtime(cls, cfg: Config, device: torch.device, *, backward: bool) -> None:
        """Checks of the model section that need the device or optional packages, made before any model is built
        (preflight, and a plugin being built): a ConfigError naming the key. `backward`: roles will train."""
        m = cfg.model
        if m.compile or m.vae_compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())  # with the debug ones: eager, aot_eager
            if m.compile_backend not in known:
                usable = [name for name in known if "TESTING" not in name and "minifier" not in name]
                raise ConfigError(f"model.compile_backend: unknown torch.compile backend {m.compile_backend!r}; "
                                  f"known: {', '.join(usable)}")
            if m.compile_options:
                from torch._inductor import config as inductor_config

                unknown = sorted(set(m.compile_options) - set(inductor_config.get_config_copy()))
                if unknown:
                    raise ConfigError(f"model.compile_options: {', '.join(unknown)} not a setting of "
                                      f"torch._inductor.config")
            if m.compile_backend == "inductor" and device.type == "cuda":
                from torch.utils._triton import has_triton

                if not has_triton():
                    raise ConfigError("model.compile_backend: inductor compiles for the GPU with triton, which is "
                                      "not installed; install it or leave model.compile off")

    # -- data ------------------------------------------------------------------------------

    def identity(self) -> dict:
        """What preprocessed data depends on (encoders and their settings); shards made under another are refused."""
        raise NotImplementedError(f"model family {self.cfg.model.family!r} does not preprocess data")

    def encode_prompts(self, prompts: list[str], cache: bool = True) -> torch.Tensor:
        """Text embeddings (B, L, D), fp32; `cache` keeps each prompt's embedding for reuse."""
        raise NotImplementedError(f"model family {self.cfg.model.family!r} has no text encoder")

    def encode_videos(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) videos in [-1, 1] -> x0 (B, *latent_shape), fp32."""
        raise NotImplementedError(f"model family {self.cfg.model.family!r} does not encode videos")

    def video_latent_shape(self, num_frames: int, height: int, width: int, key: str = "validation") -> tuple[int, ...]:
        """x0's (C, F, H, W) for a video of this size; a size the model cannot take is a ConfigError naming `key`."""
        raise NotImplementedError(f"model family {self.cfg.model.family!r} has no video size")

    # -- step-time primitives (what methods' adapter Protocols ask for) --------------------

    @abstractmethod
    def prepare_batch(self, raw: dict, *, latents_source: LatentsSource) -> Batch:
        """A loader batch on the device: conditional and unconditional embeddings, and x0 from the data
        (`latents_source="data"`; a BatchError when the batch has no `latents_key`) or zeros of the right shape."""

    @abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t), the fraction of noise at timestep t (B,), in [0, 1]."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: x0 noised to timestep t."""

    @abstractmethod
    def shift_timestep(self, t: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """Map uniform timesteps in [0, T] through the family's timestep shift (where training spends its steps);
        `shift` replaces the model's own."""

    @abstractmethod
    def predict_velocity(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, batch: Batch, *,
                         conditional: bool) -> torch.Tensor:
        """The role's denoiser output at (x_t, t): the flow velocity v = ε − x0, fp32; the prompt's
        embeddings when `conditional`, the negative prompt's otherwise. Runs through the role's engine."""

    @abstractmethod
    def predict_x0(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, batch: Batch, *,
                   conditional: bool) -> torch.Tensor:
        """The role's estimate of x0 at (x_t, t), fp32."""

    def predict_x0_cond_uncond(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor,
                               batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The role's x0 at (x_t, t) with the prompt and with the negative prompt (the two halves of
        classifier-free guidance), fp32: one forward over the batch twice over (`Batch.cond_uncond`) when
        model.batched_cfg, else two forwards. A family whose denoiser mixes samples of a batch must override it."""
        if not self.cfg.model.batched_cfg:
            return (self.predict_x0(handle, x_t, t, batch, conditional=True),
                    self.predict_x0(handle, x_t, t, batch, conditional=False))
        both = self.predict_x0(handle, torch.cat([x_t, x_t]), torch.cat([t, t]), batch.cond_uncond(), conditional=True)
        cond, uncond = both.chunk(2)
        return cond, uncond

    def denoiser_blocks(self, module: nn.Module) -> nn.ModuleList:
        """The denoiser's sequence of transformer blocks (`module.blocks`, as in Wan and most DiTs)."""
        return module.blocks

    def block_features(self, handle: RoleHandle, x_t: torch.Tensor, t: torch.Tensor, batch: Batch, *,
                       blocks: list[int], conditional: bool = True) -> list[torch.Tensor]:
        """Hidden states (B, tokens, width) after each of the chosen blocks of the role's denoiser at (x_t, t):
        a forward through the role's engine, the blocks' outputs kept by forward hooks, and stopped as the
        block after the last chosen one starts (the rest of the network is not needed). Differentiable with
        respect to x_t (and the role's weights, unless they are frozen for the call)."""
        layers = self.denoiser_blocks(handle.modules[self.denoiser_key])
        kept: dict[int, torch.Tensor] = {}

        def keep(index: int):
            def hook(module, args, output):
                kept.setdefault(index, output[0] if isinstance(output, tuple) else output)
            return hook

        def stop(module, args):
            raise _FeaturesTaken

        hooks = [layers[i].register_forward_hook(keep(i)) for i in blocks]
        after = max(blocks) + 1
        # The stop runs before the next block starts, so every block whose output is kept has finished
        # (and its checkpointed activations recompute cleanly in the backward). Not under ZeRO-3, whose
        # parameter gathering expects every forward to finish.
        if after < len(layers) and not _partitions_weights(handle):
            hooks.append(layers[after].register_forward_pre_hook(stop))
        try:
            self.predict_velocity(handle, x_t, t, batch, conditional=conditional)
        except _FeaturesTaken:
            pass
        finally:
            for h in hooks:
                h.remove()
        if self.sequence_mesh is not None:  # each rank holds its own tokens; a head reads the whole sequence
            from distill.models.sequence_parallel import gathered_tokens

            return [gathered_tokens(kept[i], self.sequence_mesh) for i in blocks]
        return [kept[i] for i in blocks]

    def block_feature_shape(self, handle: RoleHandle) -> tuple[int, int]:
        """(number of blocks, width of their hidden states) of the role's denoiser."""
        raise NotImplementedError(f"model family {self.cfg.model.family!r} gives no block features")

    # -- sampling and export ---------------------------------------------------------------

    def validator(self) -> Validator:
        """The sampler of ValidationRequests (validation videos, bench)."""
        raise NotImplementedError(f"model family {self.cfg.model.family!r} has no sampler")

    def export_pipeline(self, modules_folder: Path, out_dir: Path, sampling: SamplingSpec, *, fuse: bool = False) -> dict:
        """Write a stock pipeline folder around an exported role's modules (`modules_folder/<name>/`),
        with a scheduler set up for `sampling`; returns the record of how to load and call it. A LoRA role's
        adapter is written as the family's LoRA file (with `fuse`: merged into a whole pipeline folder)."""
        raise NotImplementedError(f"model family {self.cfg.model.family!r} cannot export a pipeline")


class _FeaturesTaken(Exception):
    """Ends a forward pass early: `block_features` has the hidden states it needs."""


def _partitions_weights(handle: RoleHandle) -> bool:
    engine = handle.engine
    return engine is not None and bool(getattr(engine, "zero_optimization_partition_weights", lambda: False)())
