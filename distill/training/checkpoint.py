"""Checkpoints of a run, through the artifact store, and exact resume.

The layout (names, manifest, `latest`) is `distill.run_layout`'s. A save first checks that every
weight it would write is finite, then writes, in order: each trainable role's DeepSpeed state
(collective), the exported role's modules as diffusers folders, every rank's stateful objects
(`trainer/rank-N.pt`: a dict of name → state_dict), the config, and, once every rank's files are
in the store, MANIFEST.json (each file's bytes and sha256) and then `latest`. A checkpoint
without MANIFEST.json is incomplete (a run died while saving it) and is never resumed from; a
resume checks the files against the manifest before any model is built, on the number of ranks that saved it (or
any number: under ZeRO stage 0, or once `distill reshard` added universal engine states; see
`distill.training.reshard`). The newest
`keep_checkpoints` are kept, plus marked ones: every `keep_checkpoint_every` steps, or any with a
KEEP file.
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

from distill.errors import ConfigError, NonFiniteError
from distill.finite import described, nonfinite_names
from distill.model_config import RUNTIME_KEYS
from distill.models.lora import (adapter_state, check_same_base, has_lora, load_adapter_state, read_adapter,
                                 save_adapter)
from distill.run_layout import (EXPORT, FORMAT, KEEP, LATEST, MANIFEST, ROOT, WITHDRAWN, CheckpointError,
                                check_checksums, check_sizes, checkpoint_name, file_records, list_checkpoints,
                                naming_the_newest, read_manifest, records_of, resolve_checkpoint, step_of)
from distill.storage import ArtifactStore
from distill.training.distributed import all_gather, ranks_where
from distill.training.reshard import (STATE, UNIVERSAL, check_holds, check_resumable, engine_tag, load_resharded,
                                     read_by)

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

    def load_resharded(self, states: list[dict]) -> None:
        self.load_state_dict(states[0])  # a fresh run seeds these alike on every rank; per-rank draws are the method's


@dataclass
class CheckpointContents:
    """What a checkpoint holds, as the trainer assembles it."""

    step: int
    engines: dict[str, Any]
    """Trainable role name → its DeepSpeed engine (weights, optimizer partitions, scheduler)."""
    states: dict[str, Stateful]
    """Per-rank state by name (loop, method, data position, RNG): saved and restored through state_dict; a resume on
    another number of ranks hands each object every saved data-parallel rank's state (`load_resharded`)."""
    export: dict[str, nn.Module]
    """The exported role's modules by name, saved as diffusers folders under export/<name>/."""
    config: dict
    """The resolved run config."""
    export_is_state: bool = False
    """The exported modules are not an engine's weights but state of their own (an EMA): resume reads them back."""
    manifest: dict = field(default_factory=dict)
    """Further manifest fields (export role, sampling, method metadata) for readers of the checkpoint."""
    bases: dict[str, dict[str, dict]] = field(default_factory=dict)
    """LoRA role name → module name → the fingerprint of the base weights its adapter applies to: saved in the
    manifest (and beside the exported adapter), and the same base required to resume."""


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointManager:
    def __init__(self, store: ArtifactStore, local_root: Path, *, rank: int, world_size: int, zero_stage: int = 0):
        self.store = store
        self.local_root = Path(local_root)
        self.rank, self.world_size = rank, world_size
        self.zero_stage = zero_stage
        self._verified: dict[str, Path] = {}  # checkpoint name -> its checked local folder (resolve, then load)

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
        self._check_finite(contents, name)
        if self.rank == 0 and self.store.list(prefix):
            self.store.delete(prefix)  # left by a run that died while saving it, or withdrawn: replace
        if (self.rank == 0 or not self.store.is_local) and staging.exists():
            shutil.rmtree(staging)
        _barrier()

        # 1. Engines (collective): weights, optimizer partitions, schedulers.
        for role, engine in contents.engines.items():
            # a LoRA role's frozen base is not the role's state: its adapter (and optimizer state) is
            engine.save_checkpoint(str(staging / "roles" / role), tag=STATE, save_latest=False,
                                   exclude_frozen_parameters=True)
        # 2. The exported role's modules as diffusers folders (a LoRA adapter as diffusers saves one).
        export_bases = contents.bases.get(contents.manifest.get("export_role")) or {}
        for key, module in contents.export.items():
            self._save_module(module, staging / EXPORT / key, export_bases.get(key))
        # 3. This rank's stateful objects.
        (staging / "trainer").mkdir(parents=True, exist_ok=True)
        torch.save({k: s.state_dict() for k, s in contents.states.items()}, staging / "trainer" / f"rank-{self.rank:05d}.pt")
        if self.rank == 0:
            (staging / "config.yaml").write_text(yaml.safe_dump(contents.config, sort_keys=False))
        # 4. Into the store, every rank its own files; then the manifest and `latest`, by rank 0.
        if not self.store.is_local:
            records = records_of(staging, sorted(p for p in staging.rglob("*") if p.is_file()))
            self.store.upload_folder(staging, prefix)
            shutil.rmtree(staging)
        _barrier()
        # Each file's bytes and sha256 for the manifest. Hashing reads every file back: for a real model's
        # weights and optimizer states, tens of GB, some seconds a save, shared out over the ranks.
        if self.store.is_local:  # every rank's files in one folder: the ranks hash a share each
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            records = records_of(staging, files[self.rank :: self.world_size])
        records = {rel: r for part in all_gather(records) for rel, r in part.items()}
        if self.rank == 0:
            manifest = {
                "format": FORMAT,
                "name": name,
                "step": contents.step,
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
                "roles": list(contents.engines),
                "lora_bases": contents.bases,
                "export_modules": list(contents.export),
                "states": list(contents.states),
                **contents.manifest,
                "files": dict(sorted(records.items())),
                "created": time.time(),
            }
            self.store.put_text(json.dumps(manifest, indent=1), f"{prefix}/{MANIFEST}")
            if keep_every and contents.step % keep_every == 0:
                self.store.put_text("", f"{prefix}/{KEEP}")
            self.store.put_text(name, f"{ROOT}/{LATEST}")
            self.prune(keep_last)
        _barrier()
        return name

    def _check_finite(self, contents: CheckpointContents, name: str) -> None:
        """Refuse to save weights holding NaN or Inf, on every rank at once (ZeRO-3 ranks hold different parts)."""
        named = [(f"{role}.{n}", p) for role, engine in contents.engines.items()
                 for n, p in engine.module.named_parameters() if p.requires_grad]  # a frozen base never changes
        named += [(f"{EXPORT}/{key}.{n}", t) for key, m in contents.export.items()
                  for n, t in (adapter_state(m) if has_lora(m) else m.state_dict()).items() if t.is_floating_point()]
        bad = nonfinite_names(named)
        ranks = ranks_where(bool(bad))
        if ranks:
            raise NonFiniteError(f"{self.store.key_uri(f'{ROOT}/{name}')}: not saved, weights are not finite (NaN or "
                                 f"Inf) on rank {', '.join(map(str, ranks))}" + (f": {described(bad)}" if bad else ""))

    def _save_module(self, module: nn.Module, folder: Path, base: dict | None) -> None:
        if has_lora(module):  # stage 0-2 only (the config says so): every rank holds the whole adapter
            if self.rank == 0:
                save_adapter(module, folder, base)
        elif self.zero_stage == 3:  # partitioned weights: gather them (collective), rank 0 writes
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

    def resolve(self, name: str, config: dict | None = None) -> str:
        """The complete checkpoint `name` (or 'latest') names, checked to be resumable by this run's ranks (and
        with `config`, the run's), and its files against its manifest: sizes, then checksums (a remote one is
        downloaded for that). The trainer calls it before building any model."""
        name = resolve_checkpoint(self.store, name)
        prefix = f"{ROOT}/{name}"
        with naming_the_newest(self.store, name):
            manifest = read_manifest(self.store, prefix)
            check_resumable(manifest, self.world_size, self.store.key_uri(prefix))
            records = read_by(file_records(manifest), engine_tag(manifest, self.world_size))
            check_sizes(self.store, prefix, records)
            folder = self._fetch(prefix, records)
            check_checksums(folder, records, lambda rel: self.store.key_uri(f"{prefix}/{rel}"))
        if config is not None:
            _check_same_run(yaml.safe_load((folder / "config.yaml").read_text()), config, self.store.key_uri(prefix))
        self._verified[name] = folder
        return name

    def loads_universal(self, name: str) -> bool:
        """Whether resuming from the resolved checkpoint `name` reads universal engine states: its engines must be
        built to (DeepSpeed's checkpoint.load_universal)."""
        return engine_tag(json.loads((self._verified[name] / MANIFEST).read_text()), self.world_size) == UNIVERSAL

    def newer_than(self, name: str) -> list[str]:
        """The complete checkpoints after `name`: a resume from `name` would replace them."""
        return [n for n in self.list()[0] if step_of(n) > step_of(name)]

    def drop(self, names: list[str]) -> None:
        """Delete complete checkpoints (rank 0), and point `latest` at the newest one left."""
        if self.rank == 0:
            for name in names:
                self.store.delete(f"{ROOT}/{name}")
            complete = self.list()[0]
            if complete:
                self.store.put_text(complete[-1], f"{ROOT}/{LATEST}")
        _barrier()

    def withdraw_from(self, step: int) -> str:
        """Unpublish the checkpoints of `step` and later (their weights gave non-finite values): rank 0 renames their
        manifests to WITHDRAWN.json and points `latest` at the newest one left. Returns a sentence saying so."""
        complete = self.list()[0]
        bad = [n for n in complete if step_of(n) >= step]
        good = [n for n in complete if step_of(n) < step]
        _barrier()  # every rank has read the list before rank 0 changes it: they all say the same
        if self.rank == 0 and bad:
            for name in bad:
                self.store.put_text(self.store.get_text(f"{ROOT}/{name}/{MANIFEST}"), f"{ROOT}/{name}/{WITHDRAWN}")
                self.store.delete(f"{ROOT}/{name}/{MANIFEST}")
            if good:
                self.store.put_text(good[-1], f"{ROOT}/{LATEST}")
            else:
                self.store.delete(f"{ROOT}/{LATEST}")
        _barrier()
        said = f"withdrew {', '.join(bad)} (weights that give non-finite values); " if bad else ""
        if not good:
            return said + "the run has no checkpoint with finite weights"
        return said + f"latest is {good[-1]}, the last checkpoint whose weights are finite"

    def load(self, name: str, contents: CheckpointContents) -> str:
        """Restore engines and every stateful object from checkpoint `name` (or 'latest'); returns its name."""
        if name not in self._verified:
            name = self.resolve(name)
        prefix = f"{ROOT}/{name}"
        where = self.store.key_uri(prefix)
        folder = self._verified[name]
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        _check_same_run(saved, contents.config, where)
        manifest = json.loads((folder / MANIFEST).read_text())
        saved_bases = manifest.get("lora_bases", {})
        for role, bases in contents.bases.items():
            for key, base in bases.items():
                check_same_base(saved_bases.get(role, {}).get(key, {}), base, f"{where} (role {role!r}, {key})")
        for role, engine in contents.engines.items():
            frozen = any(not p.requires_grad for p in engine.module.parameters())  # saved without its frozen base
            path, _ = engine.load_checkpoint(str(folder / "roles" / role), tag=engine_tag(manifest, self.world_size),
                                             load_module_strict=not frozen,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"{where}: no engine state for role {role!r}")
        if manifest["world_size"] == self.world_size:
            self._load_states(folder, contents.states, where)
        else:  # every saved rank's states, mapped onto this run's ranks
            load_resharded(folder, contents.states, manifest["world_size"],
                           contents.config.get("parallel", {}).get("sequence_parallel_size", 1), where)
        if contents.export_is_state:
            for key, module in contents.export.items():
                if has_lora(module):
                    load_adapter_state(module, read_adapter(folder / EXPORT / key)[0], where)
                else:
                    module.load_state_dict(_read_safetensors(folder / EXPORT / key, where))
        if not self.store.is_local:  # the downloaded copy (many GB for a real model) is read: gone
            shutil.rmtree(self._download_root())
        del self._verified[name]
        return name

    def _load_states(self, folder: Path, states: dict[str, Stateful], where: str) -> None:
        saved = torch.load(folder / "trainer" / f"rank-{self.rank:05d}.pt", weights_only=False)
        check_holds(saved, states, where)
        for key, stateful in states.items():
            stateful.load_state_dict(saved[key])

    def _download_root(self) -> Path:
        return self.local_root / ".resume" / f"rank-{self.rank:05d}"

    def _fetch(self, prefix: str, records: dict[str, dict]) -> Path:
        """The checkpoint's folder, with the files of `records` and its manifest (downloaded unless local)."""
        if self.store.is_local:
            return Path(self.store.root) / prefix
        folder = self._download_root() / prefix
        if folder.exists():
            shutil.rmtree(folder)
        self.store.get_files([(f"{prefix}/{rel}", folder / rel, r.get("bytes"))
                              for rel, r in [*records.items(), (MANIFEST, {})]])
        return folder


def _read_safetensors(folder: Path, where: str) -> dict:
    """A module's state dict from a diffusers folder (one file or shards): every *.safetensors in it."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{where}: no weights in {EXPORT}/{folder.name}")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


# Keys that may change between a checkpoint and its resumed run; any other difference is refused. Speed levers
# that compute the same thing up to float rounding may change too (and a checkpoint from before them has none).
_MAY_CHANGE = {"training.max_steps", "training.log_every", "training.progress_bar", "training.checkpoint_every",
               "training.keep_checkpoints", "training.keep_checkpoint_every", "validation", "storage", "run.output",
               "run.name",
               # how the model runs, not what it computes (and absent from checkpoints written before them)
               *RUNTIME_KEYS, "training.optimizer_implementation"}


# Sections added after checkpoints were first written: absent from an older checkpoint, they held their default.
_ADDED_LATER = {"parallel": {"sequence_parallel_size": 1}}


def _check_same_run(saved: dict, now: dict, where: str, path: str = "") -> None:
    for key in sorted(set(saved) | set(now)):
        dotted = f"{path}.{key}" if path else key
        if dotted in _MAY_CHANGE:
            continue
        a, b = saved.get(key, _ADDED_LATER.get(dotted)), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _check_same_run(a, b, where, dotted)
        elif a != b:
            raise ConfigError(f"{dotted}: {b!r} now, {a!r} in the checkpoint {where}; resuming needs the same "
                              f"value (only max_steps, logging, checkpointing, validation, storage and how the model "
                              f"runs may change)")
