"""Checkpoints of a run, through the artifact store, and exact resume.

<output>/checkpoints/
    step-000500/
        roles/<role>/state/          DeepSpeed engine checkpoint: weights, optimizer (one partition per
                                     rank), lr scheduler
        export/transformer/          the method's exported role (the student) as a diffusers folder
        trainer/rank-00000.pt        iteration, method state (its generators), data position, RNG states
        config.yaml
        MANIFEST.json                written last, once every rank's files are in the store
    latest                           names the newest complete checkpoint; written after its manifest

A checkpoint without MANIFEST.json is incomplete (a run died while saving it) and is never
resumed from; `latest` only ever names complete ones. The newest `keep_checkpoints` are
kept, plus marked ones: every `keep_checkpoint_every` steps, or any with a KEEP file.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from distill.config import ConfigError, to_dict
from distill.errors import InputError
from distill.storage import ArtifactStore

MANIFEST = "MANIFEST.json"
KEEP = "KEEP"
ROOT = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointError(InputError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names it."""


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointManager:
    def __init__(self, store: ArtifactStore, local_root: Path, *, rank: int, world_size: int):
        self.store = store
        self.local_root = Path(local_root)
        self.rank, self.world_size = rank, world_size

    # -- saving ----------------------------------------------------------------------------

    def _staging(self, name: str) -> Path:
        """Where this rank writes before upload: the final folder itself for a local store."""
        if self.store.is_local:
            return Path(self.store.root) / ROOT / name
        return self.local_root / ".staging" / f"rank-{self.rank:05d}" / ROOT / name

    def save(self, trainer) -> str:
        """Save every rank's state; returns the checkpoint's name once it is complete and `latest`."""
        name = checkpoint_name(trainer.iteration)
        prefix = f"{ROOT}/{name}"
        staging = self._staging(name)
        if self.rank == 0 and self.store.exists(f"{prefix}/{MANIFEST}"):
            self.store.delete(prefix)  # saved before, then training went on from an earlier one: replace
        if (self.rank == 0 or not self.store.is_local) and staging.exists():
            shutil.rmtree(staging)  # left by a run that died while saving
        _barrier()

        # 1. Engines (collective): weights, optimizer partitions, schedulers.
        for handle in trainer.roles.trainable():
            handle.engine.save_checkpoint(str(staging / "roles" / handle.name), tag="state", save_latest=False)
        # 2. The exported role as a diffusers folder.
        self._save_export(trainer, staging / "export" / "transformer")
        # 3. This rank's loop state.
        state = {
            "iteration": trainer.iteration,
            "method": trainer.method.state_dict(),
            "loader": trainer.batches.state_dict(),
            "rng": _rng_state(),
        }
        (staging / "trainer").mkdir(parents=True, exist_ok=True)
        torch.save(state, staging / "trainer" / f"rank-{self.rank:05d}.pt")
        if self.rank == 0:
            (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(trainer.cfg), sort_keys=False))
        # 4. Into the store, every rank its own files; then the manifest and `latest`, by rank 0.
        if not self.store.is_local:
            self.store.upload_folder(staging, prefix)
            shutil.rmtree(staging)
        _barrier()
        if self.rank == 0:
            files = self.store.list(prefix)
            step = trainer.iteration
            every = trainer.cfg.training.keep_checkpoint_every
            manifest = {
                "name": name,
                "step": step,
                "world_size": self.world_size,
                "zero_stage": trainer.cfg.deepspeed.get("zero_optimization", {}).get("stage", 0),
                "roles": [h.name for h in trainer.roles.trainable()],
                "export_role": trainer.method.export_role,
                "files": files,
                "created": time.time(),
            }
            self.store.put_text(json.dumps(manifest, indent=1), f"{prefix}/{MANIFEST}")
            if every and step % every == 0:
                self.store.put_text("", f"{prefix}/{KEEP}")
            self.store.put_text(name, f"{ROOT}/latest")
            self.prune(trainer.cfg.training.keep_checkpoints)
        _barrier()
        return name

    def _save_export(self, trainer, folder: Path) -> None:
        handle = trainer.roles[trainer.method.export_role]
        module = handle.modules[trainer.plugin.denoiser_key]
        stage = trainer.cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:  # partitioned weights: gather them (collective), rank 0 writes
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
        names = sorted({k.split("/")[1] for k in self.store.list(ROOT) if k.count("/") >= 2})
        complete = [n for n in names if self.store.exists(f"{ROOT}/{n}/{MANIFEST}")]
        return complete, [n for n in names if n not in complete]

    def resolve(self, name: str) -> str:
        if name == "latest":
            if not self.store.exists(f"{ROOT}/latest"):
                raise CheckpointError(f"{self.store.key_uri(ROOT)}: no checkpoint to resume from (no `latest`)")
            name = self.store.get_text(f"{ROOT}/latest").strip()
        if not self.store.exists(f"{ROOT}/{name}/{MANIFEST}"):
            complete, _ = self.list()
            raise CheckpointError(f"{self.store.key_uri(f'{ROOT}/{name}')}: not a complete checkpoint "
                                  f"(complete ones: {', '.join(complete) or 'none'})")
        return name

    def load(self, trainer, name: str) -> str:
        """Restore engines, method, data position and RNG from checkpoint `name` (or 'latest')."""
        name = self.resolve(name)
        prefix = f"{ROOT}/{name}"
        manifest = json.loads(self.store.get_text(f"{prefix}/{MANIFEST}"))
        if manifest["world_size"] != self.world_size:
            raise CheckpointError(f"{self.store.key_uri(prefix)}: saved by {manifest['world_size']} ranks, this run "
                                  f"has {self.world_size}; resume with the same number of ranks")
        saved = yaml.safe_load(self.store.get_text(f"{prefix}/config.yaml"))
        _check_same_run(saved, to_dict(trainer.cfg), self.store.key_uri(prefix))
        folder = self._fetch(prefix)
        for handle in trainer.roles.trainable():
            path, _ = handle.engine.load_checkpoint(str(folder / "roles" / handle.name), tag="state",
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise CheckpointError(f"{self.store.key_uri(prefix)}: no engine state for role {handle.name!r}")
        state = torch.load(folder / "trainer" / f"rank-{self.rank:05d}.pt", weights_only=False)
        trainer.iteration = state["iteration"]
        trainer.method.load_state_dict(state["method"])
        trainer.batches.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        return name

    def _fetch(self, prefix: str) -> Path:
        if self.store.is_local:
            return Path(self.store.root) / prefix
        folder = self.local_root / ".resume" / f"rank-{self.rank:05d}" / prefix
        if folder.exists():
            shutil.rmtree(folder)
        self.store.download_folder(prefix, folder)
        return folder


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_export(path: str, storage=None) -> str | None:
    """The exported transformer folder of a checkpoint (`.../checkpoints/step-000500`) or of a run's
    newest one (`.../checkpoints/latest`), local or s3:// (downloaded); None for any other path."""
    import tempfile

    from distill.storage import open_store

    path = path.rstrip("/")
    if path.endswith("/latest"):
        root = path[: -len("/latest")]
        store = open_store(root, storage)
        if not store.exists("latest"):
            raise CheckpointError(f"{path}: no such file (the run has no complete checkpoint yet)")
        path = f"{root}/{store.get_text('latest').strip()}"
    store = open_store(path, storage)
    if not store.exists(MANIFEST):
        return None
    if store.is_local:
        return str(Path(store.root) / "export" / "transformer")
    local = Path(tempfile.mkdtemp(prefix="distill-export-")) / "transformer"
    store.download_folder("export/transformer", local)
    return str(local)
