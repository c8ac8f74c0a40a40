"""Model plugins: build-time assembly of a family's diffusers components into roles.

A plugin builds one denoiser per role (from another role's weights, a folder, or the
model's own weights), freezes the frozen roles, and serves the step-time primitives a
method's adapter Protocol asks for. It knows nothing of any training method.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from distill.config import Config, ConfigError
from distill.roles import RoleHandle, RoleManager
from distill.training.checkpoint import resolve_export


class ModelPlugin(ABC):
    num_train_timesteps: ClassVar[int] = 1000
    denoiser_key: ClassVar[str] = "transformer"

    def __init__(self, cfg: Config, *, device: torch.device, frozen_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.frozen_dtype = frozen_dtype

    # -- what a family provides ------------------------------------------------------------

    @abstractmethod
    def new_denoiser(self) -> nn.Module:
        """The model's own denoiser weights (from model.path, or a preset's random init)."""

    @abstractmethod
    def load_denoiser(self, path: str, key: str) -> nn.Module:
        """A denoiser from a folder; `key` names the config key for errors."""

    # -- roles -----------------------------------------------------------------------------

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
        modules: dict[str, nn.Module] = {}
        for name in (n for n in _init_order(roles) if n in needed):
            source = roles[name].init_from
            if source is None:
                modules[name] = self.new_denoiser()
            elif source in roles:
                modules[name] = copy.deepcopy(modules[source])  # before any cast: full precision copy
            else:  # a checkpoint (or a run's checkpoints/latest) means its exported transformer
                source = resolve_export(source, self.cfg.storage) or source
                modules[name] = self.load_denoiser(source, key=f"roles.{name}.init_from")
        handles = {}
        for name, role in roles.items():
            if name not in wanted:
                continue
            module = modules[name].to(self.device)
            if role.trainable:
                module.train().requires_grad_(True)
                if self.cfg.model.gradient_checkpointing:
                    module.enable_gradient_checkpointing()
            else:
                cast_frozen(module.eval().requires_grad_(False), self.frozen_dtype)
            handles[name] = RoleHandle(name=name, modules={self.denoiser_key: module}, trainable=role.trainable)
        return RoleManager(handles)

    def frozen_role(self, name: str, module: nn.Module) -> RoleHandle:
        """A frozen handle around a module (e.g. a checkpoint's exported student, for sampling)."""
        module = cast_frozen(module.to(self.device).eval().requires_grad_(False), self.frozen_dtype)
        return RoleHandle(name=name, modules={self.denoiser_key: module}, trainable=False)


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a frozen module, keeping the submodules its class marks `_keep_in_fp32_modules` in fp32.

    This is what diffusers' `from_pretrained(torch_dtype=...)` does; its `ModelMixin.to(dtype)`
    casts everything (and warns), so the plain nn.Module cast is used here.
    """
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    nn.Module.to(module, dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    if dtype != torch.float32 and keep:
        for name, sub in module.named_modules():
            if any(k in name.split(".") for k in keep):
                nn.Module.to(sub, torch.float32)
    return module


def _init_order(roles: dict) -> list[str]:
    """Roles ordered so that each comes after the role it starts from; cycles are errors."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ConfigError(f"roles.{name}.init_from: roles start from each other in a cycle")
        visiting.add(name)
        source = roles[name].init_from
        if source in roles:
            visit(source)
        order.append(name)

    for name in roles:
        visit(name)
    return order
