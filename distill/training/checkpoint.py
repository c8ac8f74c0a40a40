"""Checkpoints of a run, through the artifact store, and exact resume.

The layout (names, manifest, `latest`) is `distill.run_layout`'s. A save writes, in order:
each trainable role's DeepSpeed state (collective), the exported role's modules as diffusers
folders, every rank's stateful objects (`trainer/rank-N.pt`: a dict of name → state_dict),
the config, and, once every rank's files are in the store, MANIFEST.json and then `latest`.
A checkpoint without MANIFEST.json is incomplete (a run died while saving it) and is never
resumed from. The newest `keep_checkpoints` are kept, plus marked ones: every
`keep_checkpoint_every` steps, or any with a KEEP file.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from distill.errors import ConfigError
from distill.run_layout import (EXPORT, FORMAT, KEEP, LATEST, MANIFEST, ROOT, CheckpointError, checkpoint_name,
                                list_checkpoints, read_manifest, resolve_checkpoint)
from distill.storage import ArtifactStore

__all__ = ["CheckpointContents", "CheckpointError", "CheckpointManager", "RNGState", "Stateful"]


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """The process-wide generators (torch, CUDA, numpy, Python) as a stateful object."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


@dataclass
class CheckpointContents:
    """What a checkpoint holds, as the trainer assembles it."""

    step: int
    engines: dict[str, Any]
    """Trainable role name → its DeepSpeed engine (weights, optimizer partitions, scheduler)."""
    states: dict[str, Stateful]
    """Per-rank state by name (loop, method, data position, RNG): saved and restored through state_dict."""
    export: dict[str, nn.Module]
    """The exported role's modules by name, saved as diffusers folders under export/<name>/."""
    config: dict
    """The resolved run config."""
    export_is_state: bool = False
    """The exported modules are not an engine's weights but state of their own (an EMA): resume reads them back."""
    manifest: dict = field(default_factory=dict)
    """Further manifest fields (export role, sampling, method metadata) for readers of the checkpoint."""


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointManager:
    def __init__(self, store: ArtifactStore, local_root: Path, *, rank: int, world_size: int, zero_stage: int = 0):
        self.store = store
        self.local_root = Path(local_root)
        self.rank, self.world_size = rank, world_size
        self.zero_stage = zero_stage

    # -- saving ----------------------------------------------------------------------------

    def _staging(self, name: str) -> Path:
        """Where this rank writes before upload: the final folder itself for a local store."""
        if self.store.is_local:
            return Path(self.store.root) / ROOT / name
        return self.local_root / ".staging" / f"rank-{self.rank:05d}" / ROOT / name

    def save(self, contents: CheckpointContents, *, keep_last: int, keep_every: int = 0) -> str:
        """Save every rank's part (a collective call); returns the name once it is complete and `latest`."""
        name = checkpoint_name(contents.step)
        prefix = f"{ROOT}/{name}"
        staging = self._staging(name)
        if self.rank == 0 and self.store.exists(f"{prefix}/{MANIFEST}"):
            self.store.delete(prefix)  # saved before, then training went on from an earlier one: replace
        if (self.rank == 0 or not self.store.is_local) and staging.exists():
            shutil.rmtree(staging)  # left by a run that died while saving
        _barrier()

        # 1. Engines (collective): weights, optimizer partitions, schedulers.
        for role, engine in contents.engines.items():
            engine.save_checkpoint(str(staging / "roles" / role), tag="state", save_latest=False)
        # 2. The exported role's modules as diffusers folders.
        for key, module in contents.export.items():
            self._save_module(module, staging / EXPORT / key)
        # 3. This rank's stateful objects.
        (staging / "trainer").mkdir(parents=True, exist_ok=True)
        torch.save({k: s.state_dict() for k, s in contents.states.items()}, staging / "trainer" / f"rank-{self.rank:05d}.pt")
        if self.rank == 0:
            (staging / "config.yaml").write_text(yaml.safe_dump(contents.config, sort_keys=False))
        # 4. Into the store, every rank its own files; then the manifest and `latest`, by rank 0.
        if not self.store.is_local:
            self.store.upload_folder(staging, prefix)
            shutil.rmtree(staging)
        _barrier()
        if self.rank == 0:
            manifest = {
                "format": FORMAT,
                "name": name,
                "step": contents.step,
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
                "roles": list(contents.engines),
                "export_modules": list(contents.export),
                "states": list(contents.states),
                **contents.manifest,
                "files": self.store.list(prefix),
                "created": time.time(),
            }
            self.store.put_text(json.dumps(manifest, indent=1), f"{prefix}/{MANIFEST}")
            if keep_every and contents.step % keep_every == 0:
                self.store.put_text("", f"{prefix}/{KEEP}")
            self.store.put_text(name, f"{ROOT}/{LATEST}")
            self.prune(keep_last)
        _barrier()
        return name

    def _save_module(self, module: nn.Module, folder: Path) -> None:
        if self.zero_stage == 3:  # partitioned weights: gather them (collective), rank 0 writes
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if self.rank == 0:
                    module.save_pretrained(folder, safe_serialization=True)
        elif self.rank == 0:
            module.save_pretrained(folder, safe_serialization=True)

    def prune(self, keep_last: int) -> None:
        """Delete complete checkpoints beyond the newest `keep_last` (unless marked) and dead partial ones."""
        complete, partial = self.list()
        latest = complete[-1] if complete else None
        for name in complete[:-keep_last]:
            if not self.store.exists(f"{ROOT}/{name}/{KEEP}"):
                self.store.delete(f"{ROOT}/{name}")
        for name in partial:
            if latest is not None and name < latest:
                self.store.delete(f"{ROOT}/{name}")

    # -- finding and loading -----------------------------------------------------------------

    def list(self) -> tuple[list[str], list[str]]:
        """(complete, incomplete) checkpoint names, oldest first."""
        return list_checkpoints(self.store)

    def resolve(self, name: str) -> str:
        """The complete checkpoint `name` (or 'latest') names, checked to be resumable by this run's ranks:
        cheap, so the trainer calls it before building any model."""
        name = resolve_checkpoint(self.store, name)
        manifest = read_manifest(self.store, f"{ROOT}/{name}")
        if manifest["world_size"] != self.world_size:
            raise CheckpointError(f"{self.store.key_uri(f'{ROOT}/{name}')}: saved by {manifest['world_size']} ranks, this run "
                                  f"has {self.world_size}; resume with the same number of ranks")
        return name

    def load(self, name: str, contents: CheckpointContents) -> str:
        """Restore engines and every stateful object from checkpoint `name` (or 'latest'); returns its name."""
        name = self.resolve(name)
        prefix = f"{ROOT}/{name}"
        where = self.store.key_uri(prefix)
        saved = yaml.safe_load(self.store.get_text(f"{prefix}/config.yaml"))
        _check_same_run(saved, contents.config, where)
        folder = self._fetch(prefix)
        for role, engine in contents.engines.items():
            path, _ = engine.load_checkpoint(str(folder / "roles" / role), tag="state",
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"{where}: no engine state for role {role!r}")
        states = torch.load(folder / "trainer" / f"rank-{self.rank:05d}.pt", weights_only=False)
        missing = [k for k in contents.states if k not in states]
        if missing:
            raise CheckpointError(f"{where}: holds no state for {', '.join(missing)} (it has: {', '.join(states)})")
        for key, stateful in contents.states.items():
            stateful.load_state_dict(states[key])
        if contents.export_is_state:
            for key, module in contents.export.items():
                module.load_state_dict(_read_safetensors(folder / EXPORT / key, where))
        return name

    def _fetch(self, prefix: str) -> Path:
        if self.store.is_local:
            return Path(self.store.root) / prefix
        folder = self.local_root / ".resume" / f"rank-{self.rank:05d}" / prefix
        if folder.exists():
            shutil.rmtree(folder)
        self.store.download_folder(prefix, folder)
        return folder


def _read_safetensors(folder: Path, where: str) -> dict:
    """A module's state dict from a diffusers folder (one file or shards): every *.safetensors in it."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{where}: no weights in {EXPORT}/{folder.name}")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


# Keys that may change between a checkpoint and its resumed run; any other difference is refused.
_MAY_CHANGE = {"training.max_steps", "training.log_every", "training.progress_bar", "training.checkpoint_every",
               "training.keep_checkpoints", "training.keep_checkpoint_every", "validation", "storage", "run.output",
               "run.name"}


def _check_same_run(saved: dict, now: dict, where: str, path: str = "") -> None:
    for key in sorted(set(saved) | set(now)):
        dotted = f"{path}.{key}" if path else key
        if dotted in _MAY_CHANGE:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_same_run(a, b, where, dotted)
        elif a != b:
            raise ConfigError(f"{dotted}: {b!r} now, {a!r} in the checkpoint {where}; resuming needs the same "
                              f"value (only max_steps, logging, checkpointing, validation and storage may change)")
