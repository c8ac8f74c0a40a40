"""Roles: the named models a method trains or consults (student, teacher, critic, ...).

A role holds named modules: its denoiser (the family's component name, e.g. `transformer`),
and whatever else it trains or consults (a second expert, a classifier head, adapters). A
trainable role's modules train in one DeepSpeed engine, are checkpointed with it, and the
exported role's modules are exported by name.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill.errors import ConfigError, NonFiniteError


class RoleError(ConfigError):
    """A role a method needs is missing or has the wrong trainable flag."""


@dataclass
class RoleHandle:
    """One role: its named modules, whether it trains, and (when it trains) its optimizer and engine.

    The method writes `optimizer` and `lr_scheduler` (and may `add_module` first, e.g. a head);
    the trainer wraps the role's modules (`RoleModules`) in one DeepSpeed engine and sets
    `engine`. Without an engine (a notebook, a unit test), `backward` and `step` fall back to
    plain PyTorch.
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
    base: dict[str, dict] | None = None
    """A LoRA role: by module, the fingerprint of the frozen base weights its adapter applies to
    (`distill.models.lora`)."""
    gradient_scale: float = 1.0
    """What each loss is multiplied by before its backward (the sequence-parallel group's size: see Trainer)."""
    _frozen: bool = field(default=False, repr=False)

    def module(self, key: str = "transformer"):
        """What to call for a forward pass of module `key`: through the engine when there is one."""
        if key not in self.modules:
            raise KeyError(f"role {self.name!r} has no module {key!r} (has: {', '.join(self.modules)})")
        if self.engine is not None and not self._frozen:
            return functools.partial(self.engine, key)  # RoleModules.forward dispatches by name
        return self.modules[key]

    @contextlib.contextmanager
    def frozen(self):
        """Forward passes inside take part in another role's loss: they put no gradient into this role's
        weights (inputs still get theirs) and call the modules directly, so this role's engine, whose
        backward hooks belong to its own losses, is not involved."""
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        self._frozen = True
        try:
            yield self
        finally:
            self._frozen = False
            for p in params:
                p.requires_grad_(True)

    def add_module(self, key: str, module: nn.Module) -> None:
        """Give the role another module (before engines exist: it then trains in the role's engine)."""
        if self.engine is not None:
            raise RuntimeError(f"role {self.name!r}: add module {key!r} before its engine is built")
        if key in self.modules:
            raise ValueError(f"role {self.name!r} already has a module {key!r}")
        self.modules[key] = module

    def parameters(self):
        for module in self.modules.values():
            yield from module.parameters()

    def named_parameters(self):
        """(`<module>.<parameter>`, parameter) pairs, as the role's engine names them."""
        for key, module in self.modules.items():
            for name, param in module.named_parameters():
                yield f"{key}.{name}", param

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def keeps_a_module_frozen(self) -> bool:
        """Whether one of the role's modules trains nothing (an expert of a two-expert model it does not train)."""
        return any(not any(p.requires_grad for p in m.parameters()) for m in self.modules.values())

    def named_trainable_parameters(self):
        """What the role's optimizer steps (a LoRA role: its adapter and added modules, not the base)."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad and self.keeps_a_module_frozen():
            # None of the weights this role trains took part (the call went to an expert it keeps frozen): the step
            # then applies zero gradients, as it does to any of its weights a loss does not reach.
            loss = loss + sum(p.sum() for p in self.trainable_parameters()) * 0.0
        if self.gradient_scale != 1.0:
            loss = loss * self.gradient_scale
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def step(self) -> None:
        """Optimizer step (the engine applies it at the accumulation boundary), then zero grads.

        A gradient holding NaN or Inf is refused (NonFiniteError) rather than stepped into the weights;
        DeepSpeed in fp32 skips such a step by itself, and saying nothing would train nothing.
        """
        if self.engine is not None:
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.step()
            if self.engine.was_step_applied():  # True only where the accumulation boundary applied a step
                norm = self.engine.get_global_grad_norm()
                self.last_grad_norm = float(norm) if norm is not None else None
                self.optimizer_steps += 1
            elif boundary:  # no fp16 loss scaling here: a skipped step means a gradient norm that is not finite
                raise self._refused()
            return
        params = self.trainable_parameters()
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        self.last_grad_norm = float(norm)
        if not math.isfinite(self.last_grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._refused()
        self.optimizer.step()
        self.optimizer_steps += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _refused(self) -> NonFiniteError:
        return NonFiniteError(f"role {self.name!r}: the gradient is not finite (NaN or Inf); its optimizer step was "
                              f"refused and training stops")

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class RoleModules(nn.ModuleDict):
    """A role's modules as the one nn.Module its engine wraps; `forward(key, ...)` calls module `key`.

    State-dict keys are `<module>.<parameter>`, so engine checkpoints keep modules apart by name.
    """

    def forward(self, key: str, *args, **kwargs):
        return self[key](*args, **kwargs)


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
