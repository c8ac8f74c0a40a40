"""Activation checkpointing of a denoiser's blocks: every n-th block (`model.checkpoint_every`), selective
(`model.checkpoint_save`: the outputs of some operators kept), and inside a block's own forward so that a compiled
block compiles its recompute (`model.compile`). `ModelPlugin.set_up_denoiser` marks the blocks."""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import create_selective_checkpoint_contexts


def _saved_operators(kinds: tuple[str, ...]) -> list:
    """The aten operators of each kind of `model.checkpoint_save` (those a device or torch build lacks left out)."""
    aten = torch.ops.aten
    names = {"attention": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
                           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                           "_flash_attention_forward", "_efficient_attention_forward"),
             "matmul": ("mm", "addmm", "bmm")}
    return [getattr(aten, name).default for kind in kinds for name in names[kind] if hasattr(aten, name)]


def checkpoint_block(fn, *args, save: tuple[str, ...] = (), **kwargs):
    """Non-reentrant activation checkpointing of `fn` (a block's call), as diffusers' default does it; with `save`,
    selective: the outputs of those kinds of operator are kept and only the rest is recomputed."""
    if save:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _saved_operators(save))
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpoint_marked_blocks(block: nn.Module, *args):
    """diffusers' `gradient_checkpointing_func` when only some blocks recompute (`model.checkpoint_every` > 1) or
    a recompute keeps some outputs (`model.checkpoint_save`): a block marked `_recompute` is checkpointed; the
    others run plainly and keep their activations for the backward."""
    if getattr(block, "_recompute", True):
        return checkpoint_block(block.__call__, *args, save=getattr(block, "_checkpoint_save", ()))
    return block(*args)


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def _checkpointed_forward(self, *args, **kwargs):
    if self._recompute and torch.is_grad_enabled():
        return checkpoint_block(self._plain_forward, *args, save=self._checkpoint_save, **kwargs)
    return self._plain_forward(*args, **kwargs)


def checkpoint_inside(block: nn.Module) -> None:
    """Activation checkpointing in the block's own forward (when it is marked `_recompute` and grad is on), so that
    compiling the block compiles the checkpoint with it. The block's class becomes a subclass of the same name
    (diffusers' `_repeated_blocks` matches by name) that only overrides `forward`: one forward for every block, so
    one compiled graph serves them all; the state dict keeps its keys."""
    cls = type(block)
    if cls in _CHECKPOINTED_CLASSES.values():
        return
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": _checkpointed_forward, "_plain_forward": cls.forward, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__})
    block.__class__ = _CHECKPOINTED_CLASSES[cls]

