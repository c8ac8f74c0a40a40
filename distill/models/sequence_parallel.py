"""Ulysses sequence parallelism for a diffusers transformer with a context-parallel plan (`_cp_plan`; Wan's): the
tokens are split over the ranks of a group after the patch embedding (with their rotary embeddings), each
self-attention runs an all-to-all from tokens to heads and back, and the output is gathered before the
unpatchify. Cross-attention needs no exchange (every rank holds the whole text). Each rank's backward then holds
the gradients of its own tokens: a gather passes back to each rank the gradient of its own slice only."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from distill.errors import ConfigError

KEY = "parallel.sequence_parallel_size"


def enable_ulysses(module: nn.Module, mesh, device: torch.device, tokens: dict[str, int]) -> None:
    """Split `module`'s sequence over the mesh's "ulysses" ranks. `tokens`: by config key, the sequence lengths the
    run will use, each of which the group's size must divide (as it must the attention heads)."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    size = mesh["ulysses"].size()
    heads = module.config.num_attention_heads
    if heads % size:
        raise ConfigError(f"{KEY}: {size} does not divide the transformer's {heads} attention heads")
    for key, count in tokens.items():
        if count % size:
            raise ConfigError(f"{KEY}: {size} does not divide the {count} tokens of a video of {key}'s size")
    backend = next(m.processor._attention_backend for m in module.modules() if hasattr(m, "processor"))
    backend = AttentionBackendName(backend) if backend else _AttentionBackendRegistry.get_active_backend()[0]
    # _native_math has a context-parallel path in diffusers 0.42.1, but it returns other values than without it
    # (checked on two gloo ranks); the default (native SDPA) and the GPU kernels give the same as one rank.
    if backend == AttentionBackendName._NATIVE_MATH or not _AttentionBackendRegistry._is_context_parallel_available(
            backend):
        raise ConfigError(f"model.attention_backend: {backend.value} cannot split a sequence over ranks; leave it "
                          f"unset or use _native_cudnn / flash with {KEY}")
    # What ModelMixin.enable_parallelism does, with this rank's own device: enable_parallelism picks a device by
    # `rank % torch.accelerator.device_count()`, which divides by zero on a machine without an accelerator.
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=size, ring_degree=1, mesh=mesh))
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    module._parallel_config = config
    for submodule in module.modules():
        if hasattr(getattr(submodule, "processor", None), "_parallel_config"):
            submodule.processor._parallel_config = config
    apply_context_parallel(module, config.context_parallel_config, module._cp_plan)


def copied(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A deep copy of a transformer that splits its sequence, splitting it too. diffusers' hooks wrap `forward` in
    closures over the module they were made for, which a deep copy shares: the copy's forward would run the
    original's weights. So the hooks come off for the copy and go back on both."""
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    config = getattr(module, "_parallel_config", None)
    if config is None:
        return copy.deepcopy(module, memo)
    remove_context_parallel(module, module._cp_plan)
    try:
        duplicate = copy.deepcopy(module, memo)
    finally:
        apply_context_parallel(module, config.context_parallel_config, module._cp_plan)
    apply_context_parallel(duplicate, duplicate._parallel_config.context_parallel_config, duplicate._cp_plan)
    return duplicate


def gathered_tokens(tokens: torch.Tensor, mesh) -> torch.Tensor:
    """(B, tokens / N, ...) of each rank of the group → (B, tokens, ...) on every one, differentiably (each rank's
    backward keeps the gradient of its own slice, as the transformer's output gather does)."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    return EquipartitionSharder.unshard(tokens, 1, mesh["ulysses"])
