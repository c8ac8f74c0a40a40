"""Casting a role's or a frozen component's weights to the run's dtype."""

from __future__ import annotations

import torch
from torch import nn


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a frozen component (VAE, text encoder), keeping the parameters and buffers its class marks
    `_keep_in_fp32_modules` in fp32, matched by name part as diffusers' `from_pretrained(torch_dtype=...)` does
    (`scale_shift_table` is a parameter, not a module)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            fp32 = dtype != torch.float32 and any(k in name.split(".") for k in keep)
            tensor.data = tensor.data.to(torch.float32 if fp32 else dtype)
    return module


def cast_role(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a role's module entirely, as a DeepSpeed bf16 engine casts a trainable role's: frozen and trainable
    roles then share their numerics, and a role copied from a frozen one starts with exactly its predictions."""
    return nn.Module.to(module, dtype)
