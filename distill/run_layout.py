"""A run folder's checkpoint layout: names, MANIFEST.json, `latest`, listing, a checkpoint's export.

<output>/checkpoints/
    step-000500/
        roles/<role>/state/          DeepSpeed engine checkpoint of a trainable role
        export/<module>/             the exported role's modules as diffusers folders (export/transformer)
        trainer/rank-00000.pt        each rank's stateful objects (loop, method, data position, RNG)
        config.yaml
        MANIFEST.json                written last, once every rank's files are in the store
    latest                           names the newest complete checkpoint; written after its manifest

The one place that knows these names: training writes through it, and models (`init_from` a
checkpoint), bench, export and flows read through it. Works on any store, local or s3://.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from distill.config import Config, StorageConfig, build_config
from distill.errors import InputError
from distill.storage import ArtifactStore, open_store

ROOT = "checkpoints"
MANIFEST = "MANIFEST.json"
LATEST = "latest"
KEEP = "KEEP"
EXPORT = "export"
FORMAT = 2
"""Version of the checkpoint layout; 2 = roles of named modules, sampling and method metadata in the manifest."""


class CheckpointError(InputError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names it."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run: ArtifactStore) -> tuple[list[str], list[str]]:
    """(complete, incomplete) checkpoint names of a run's store, oldest first."""
    names = sorted({k.split("/")[1] for k in run.list(ROOT) if k.count("/") >= 2})
    complete = [n for n in names if run.exists(f"{ROOT}/{n}/{MANIFEST}")]
    return complete, [n for n in names if n not in complete]


def latest_checkpoint(run: ArtifactStore) -> str | None:
    """The name `latest` points to, or None when the run has no complete checkpoint yet."""
    return run.get_text(f"{ROOT}/{LATEST}").strip() if run.exists(f"{ROOT}/{LATEST}") else None


def resolve_checkpoint(run: ArtifactStore, name: str) -> str:
    """A complete checkpoint's name from `name` or "latest"; CheckpointError naming what is there otherwise."""
    if name == LATEST:
        name = latest_checkpoint(run)
        if name is None:
            raise CheckpointError(f"{run.key_uri(ROOT)}: no checkpoint to resume from (no `latest`)")
    if not run.exists(f"{ROOT}/{name}/{MANIFEST}"):
        complete, _ = list_checkpoints(run)
        raise CheckpointError(f"{run.key_uri(f'{ROOT}/{name}')}: not a complete checkpoint "
                              f"(complete ones: {', '.join(complete) or 'none'})")
    return name


def checkpoint_uris(output: str, storage: StorageConfig | None = None) -> list[str]:
    """URIs of a run's complete checkpoints, oldest first."""
    complete, _ = list_checkpoints(open_store(output, storage))
    return [f"{output.rstrip('/')}/{ROOT}/{name}" for name in complete]


def split_checkpoint_uri(uri: str) -> tuple[str, str]:
    """(run output URI, checkpoint name) of `<output>/checkpoints/<name>`; ("", name) for any other path."""
    parts = uri.rstrip("/").split("/")
    if len(parts) < 3 or parts[-2] != ROOT:
        return "", parts[-1]
    return "/".join(parts[:-2]), parts[-1]


@dataclass
class Checkpoint:
    """A complete checkpoint, opened for reading: its store, manifest and run config."""

    uri: str
    store: ArtifactStore
    manifest: dict
    config: Config

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def export_role(self) -> str:
        return self.manifest["export_role"]

    @property
    def export_modules(self) -> list[str]:
        return self.manifest["export_modules"]

    @property
    def sampling(self) -> dict:
        """How the exported role samples (a SamplingSpec as a dict), recorded by its method."""
        return self.manifest["sampling"]

    @property
    def method(self) -> dict:
        """The method's declared metadata: name, headline losses, update kinds, reference guidance."""
        return self.manifest["method"]

    def fetch_export(self, folder: Path) -> Path:
        """The exported modules under `folder/<module>/` (downloaded unless the store is local)."""
        if self.store.is_local:
            return Path(self.store.root) / EXPORT
        self.store.download_folder(EXPORT, folder)
        return folder


def read_manifest(store: ArtifactStore, prefix: str = "") -> dict:
    """The manifest of the checkpoint at `prefix` of `store`, refused unless complete and of this layout."""
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    where = store.key_uri(prefix) if prefix else store.uri
    if not store.exists(key):
        raise CheckpointError(f"{where}: not a complete checkpoint (no {MANIFEST})")
    manifest = json.loads(store.get_text(key))
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: checkpoint layout {manifest.get('format', 1)}, this distill reads layout "
                              f"{FORMAT}; it was written by an older version: start a new run (its export/ "
                              f"folder still serves as init_from)")
    return manifest


def open_checkpoint(uri: str, storage: StorageConfig | None = None) -> Checkpoint:
    """Open a complete checkpoint folder (`<output>/checkpoints/step-000500` or `.../latest`, local or s3://)."""
    uri = resolve_latest(uri, storage)
    store = open_store(uri, storage)
    manifest = read_manifest(store)
    cfg = build_config(yaml.safe_load(store.get_text("config.yaml")))
    if storage is not None:
        cfg.storage = storage
    return Checkpoint(uri, store, manifest, cfg)


def check_weights_folder(path: str, key: str, storage: StorageConfig | None = None) -> None:
    """Fail naming `key` unless `path` is a local folder, a complete checkpoint, or a run's
    `checkpoints/latest` naming one (s3:// sources must be checkpoints); nothing is downloaded."""
    path = path.rstrip("/")
    if not path.startswith("s3://") and not path.endswith(f"/{LATEST}"):
        if not Path(path).is_dir():
            raise CheckpointError(f"{key}: {path}: no such folder")
        return
    try:
        path = resolve_latest(path, storage)
    except CheckpointError as err:
        raise CheckpointError(f"{key}: {err}") from None
    if not open_store(path, storage).exists(MANIFEST):  # any layout: an old one's export/ serves as well
        raise CheckpointError(f"{key}: {path}: not a complete checkpoint (no {MANIFEST})")


def resolve_latest(path: str, storage: StorageConfig | None = None) -> str:
    """`<output>/checkpoints/latest` as the checkpoint it names; any other path as it is."""
    path = path.rstrip("/")
    if not path.endswith(f"/{LATEST}"):
        return path
    root = path[: -len(LATEST) - 1]
    store = open_store(root, storage)
    if not store.exists(LATEST):
        raise CheckpointError(f"{path}: no such file (the run has no complete checkpoint yet)")
    return f"{root}/{store.get_text(LATEST).strip()}"


def resolve_export(path: str, storage: StorageConfig | None = None) -> str | None:
    """The export folder (holding one folder per module) of a checkpoint (`.../checkpoints/step-000500`)
    or of a run's newest one (`.../checkpoints/latest`), local or s3:// (downloaded); None for any
    other path."""
    store = open_store(resolve_latest(path, storage), storage)
    if not store.exists(MANIFEST):
        return None
    if store.is_local:
        return str(Path(store.root) / EXPORT)
    local = Path(tempfile.mkdtemp(prefix="distill-export-"))
    store.download_folder(EXPORT, local)
    return str(local)
