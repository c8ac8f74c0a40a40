"""An exponential moving average of a role's modules, kept in fp32 beside its engine.

Updated after each optimizer step of the role, and only then (a DMD2 student: on student-update
iterations, never on critic-only ones). Until `start_step` steps have been taken it tracks the
weights exactly; after, e ← decay · e + (1 − decay) · w. The averaged modules are what a
checkpoint exports and a resume reads back (fp32: the round trip is exact).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, modules: dict[str, nn.Module], decay: float, start_step: int = 0, *,
                 deepcopy=copy.deepcopy):
        """`deepcopy(module, memo)`: how to copy a module (a model plugin's `copy_denoiser`: hooks a plain
        deepcopy would leave bound to the original)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.start_step = decay, start_step
        self.modules = {name: _averaged_copy(m, deepcopy) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        """Fold in the weights after optimizer step `step` (1 = the first) of the role."""
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay
        for name, average in self.modules.items():
            for e, w in zip(average.parameters(), modules[name].parameters(), strict=True):
                if e is not w:  # a frozen (LoRA base) parameter is shared, not averaged
                    e.lerp_(w.detach().to(e.device, torch.float32), weight)
            for e, b in zip(average.buffers(), modules[name].buffers(), strict=True):
                e.copy_(b)


def _averaged_copy(module: nn.Module, deepcopy) -> nn.Module:
    """A copy of the module holding fp32 copies of its trainable parameters and the frozen ones shared (the base
    weights under a LoRA adapter: they never change, and a copy of a 14B base would not fit)."""
    frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
    average = deepcopy(module, frozen).eval()
    for p in average.parameters():
        if id(p) not in frozen:
            p.data = p.data.float()
            p.requires_grad_(False)
    return average
