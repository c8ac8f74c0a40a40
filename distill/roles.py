"""Roles: the named models a method trains or consults (student, teacher, critic, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill.config import ConfigError


class RoleError(ConfigError):
    """A role a method needs is missing or has the wrong trainable flag."""


@dataclass
class RoleHandle:
    """One role: its modules, whether it trains, and (when it trains) its optimizer and engine.

    The method writes `optimizer` and `lr_scheduler`; the trainer wraps the trainable module
    in a DeepSpeed engine and sets `engine`. Without an engine (a notebook, a unit test),
    `backward` and `step` fall back to plain PyTorch.
    """

    name: str
    modules: dict[str, nn.Module]
    trainable: bool
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    max_grad_norm: float = 0.0
    engine: Any = None
    optimizer_steps: int = 0
    """Optimizer steps applied so far (micro-batch steps inside an accumulation window don't count)."""
    last_grad_norm: float | None = field(default=None, repr=False)

    def module(self, key: str = "transformer") -> nn.Module:
        """The module to call for a forward pass (through the engine when there is one)."""
        if self.engine is not None and self.engine.module is self.modules[key]:
            return self.engine
        return self.modules[key]

    def parameters(self):
        for module in self.modules.values():
            yield from module.parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self) -> None:
        """Optimizer step (the engine applies it at the accumulation boundary), then zero grads."""
        if self.engine is not None:
            self.engine.step()
            if self.engine.was_step_applied():  # True only where the accumulation boundary applied a step
                norm = self.engine.get_global_grad_norm()
                self.last_grad_norm = float(norm) if norm is not None else None
                self.optimizer_steps += 1
            return
        params = self.trainable_parameters()
        if self.max_grad_norm > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        self.optimizer_steps += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class RoleManager:
    """The roles of a run, by name."""

    def __init__(self, handles: dict[str, RoleHandle]):
        self.handles = dict(handles)

    def __getitem__(self, name: str) -> RoleHandle:
        return self.handles[name]

    def __contains__(self, name: str) -> bool:
        return name in self.handles

    def __iter__(self):
        return iter(self.handles.values())

    def trainable(self) -> list[RoleHandle]:
        return [h for h in self.handles.values() if h.trainable]

    def require_roles(self, required: dict[str, bool]) -> None:
        """Fail, naming the role, unless each required role exists with the given trainable flag."""
        check_roles({n: h.trainable for n, h in self.handles.items()}, required)


def check_roles(present: dict[str, bool], required: dict[str, bool], where: str = "roles") -> None:
    for name, trainable in required.items():
        if name not in present:
            raise RoleError(f"{where}.{name}: this method needs a role named {name!r} (have: {', '.join(present) or 'none'})")
        if present[name] != trainable:
            want = "trainable" if trainable else "frozen"
            raise RoleError(f"{where}.{name}: this method needs {name!r} {want}; set {where}.{name}.trainable: {str(trainable).lower()}")
