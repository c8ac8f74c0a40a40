"""How `model.compile` and `model.vae_compile` call torch.compile: the mode and `model.compile_options` as one set
of inductor settings, with the ones that training needs for sound gradients, and dynamo's recompile limit."""

from __future__ import annotations

from typing import Any

SOUND_GRADIENTS = {"triton.mix_order_reduction": False}
"""Inductor settings that every compile gets unless `model.compile_options` sets them. torch 2.11's mix-order
reductions (a norm's backward computing its row and its column sums in one kernel) gave the Wan blocks' modulation
gradients (`scale_shift_table`, the time embedder) 10^6 times too large on an H200 from 9,360 tokens up, differently
on each call; with them off the compiled gradients are eager's (docs/PERFORMANCE.md, "compile")."""


def compile_kwargs(model_config) -> dict[str, Any]:
    """torch.compile's keyword arguments for the blocks and the decoder. An inductor mode is passed as its settings
    (`list_mode_options`, as torch.compile expands it), so that a mode and options can be given together."""
    m = model_config
    if m.compile_backend != "inductor":
        return {"backend": m.compile_backend}
    from torch._inductor import list_mode_options

    mode = list_mode_options(m.compile_mode) if m.compile_mode else {}
    return {"backend": "inductor", "options": {**mode, **SOUND_GRADIENTS, **m.compile_options}}


def raise_recompile_limit(limit: int = 64) -> None:
    """Every role and mode (with or without grad, train or eval, a bf16 teacher, another video size) is one more
    graph of the same compiled code; past dynamo's default limit of 8 that code silently runs eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
