"""Finite checks of weights and gradients: after each optimizer step, before a checkpoint is published,
and before export or bench load a checkpoint's weights."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an Inf. One device sync for all of them: cheap enough for every
    iteration (a pass over the weights, a few ms for a 1.3B model on a GPU)."""
    names, flags = [], []
    for name, tensor in named:
        local = getattr(tensor, "ds_tensor", None)  # ZeRO-3: this rank's partition; the parameter itself is empty
        tensor = local if local is not None else tensor
        if tensor.numel():
            names.append(name)
            flags.append(torch.isfinite(tensor.detach()).all())
    if not flags:
        return []
    finite = torch.stack([f.to(flags[0].device) for f in flags])
    if bool(finite.all()):
        return []
    return [name for name, ok in zip(names, finite.tolist()) if not ok]


def nonfinite_in_safetensors(folder: Path) -> list[str]:
    """Names (file:tensor) of non-finite tensors in every *.safetensors under `folder`, read one at a time."""
    from safetensors import safe_open

    bad = []
    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors = ((k, f.get_tensor(k)) for k in f.keys())
            floats = ((k, t) for k, t in tensors if t.is_floating_point())
            bad += [f"{path.relative_to(folder).as_posix()}:{k}" for k in nonfinite_names(floats)]
    return bad


def described(names: list[str], limit: int = 3) -> str:
    """A short list of names for an error message."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
