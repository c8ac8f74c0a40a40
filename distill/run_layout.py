"""A run folder's checkpoint layout: names, MANIFEST.json, `latest`, listing, a checkpoint's export.

<output>/checkpoints/
    step-000500/
        roles/<role>/state/          DeepSpeed engine checkpoint of a trainable role
        roles/<role>/universal/      the same as a DeepSpeed universal checkpoint, once `distill reshard` added it
        export/<module>/             the exported role's modules as diffusers folders (export/transformer)
        trainer/rank-00000.pt        each rank's stateful objects (loop, method, data position, RNG)
        config.yaml
        MANIFEST.json                written last, once every rank's files are in the store: each
                                     file's bytes and sha256 (layout 3), checked before anything is built
        WITHDRAWN.json               instead of MANIFEST.json: published, then found to hold weights
                                     that give non-finite values; never resumed from
    latest                           names the newest complete checkpoint; written after its manifest

The one place that knows these names: training writes through it, and models (`init_from` a
checkpoint), bench, export and flows read through it. Works on any store, local or s3://.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from distill.config import Config, StorageConfig, build_config
from distill.errors import InputError
from distill.storage import ArtifactStore, open_store, sha256_of

ROOT = "checkpoints"
MANIFEST = "MANIFEST.json"
WITHDRAWN = "WITHDRAWN.json"
LATEST = "latest"
KEEP = "KEEP"
EXPORT = "export"
CONFIG = "config.yaml"
FORMAT = 3
"""Version of the checkpoint layout: 2 = roles of named modules, sampling and method metadata in the
manifest; 3 = each file's bytes and sha256 in the manifest."""
READABLE = (2, 3)
"""Layouts this version reads. A layout-2 checkpoint has no sizes or checksums: its files are checked for presence."""
NAME = re.compile(r"step-\d{6,}")


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
    """A complete checkpoint's name from `name` or "latest"; CheckpointError naming what is there otherwise.

    Only the run's own names are accepted: a path (into another run, or out of the folder) is refused.
    """
    if name == LATEST:
        name = latest_checkpoint(run)
        if name is None:
            raise CheckpointError(f"{run.key_uri(ROOT)}: no checkpoint to resume from (no `latest`)")
    if not NAME.fullmatch(name):
        complete, _ = list_checkpoints(run)
        raise CheckpointError(f"{name}: not a checkpoint name of the run {run.uri}; a run resumes only from its "
                              f"own checkpoints ({', '.join(complete) or 'none yet'}, or latest). To start from "
                              f"another run's checkpoint, set roles.<role>.init_from to it in a new run")
    if not run.exists(f"{ROOT}/{name}/{MANIFEST}"):
        complete, _ = list_checkpoints(run)
        withdrawn = " (withdrawn: its weights give non-finite values)" if run.exists(f"{ROOT}/{name}/{WITHDRAWN}") else ""
        raise CheckpointError(f"{run.key_uri(f'{ROOT}/{name}')}: not a complete checkpoint{withdrawn} "
                              f"(complete ones: {', '.join(complete) or 'none'})")
    return name


def step_of(name: str) -> int:
    return int(name.split("-")[1])


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


# -- verifying a checkpoint's files -----------------------------------------------------------
# A checkpoint's files are checked against its manifest before anything is built from them: sizes
# first (one stat or HEAD a file), then sha256. Hashing reads every byte, many GB for a real model's
# weights and optimizer states: that is accepted on each resume, export, bench and init_from (it
# costs less than loading them), and readers check only the files they read.


def file_records(manifest: dict, under: str = "") -> dict[str, dict]:
    """The manifest's file records (path in the checkpoint -> bytes, sha256), of the files under `under`."""
    files = manifest.get("files", {})
    if isinstance(files, list):  # layout 2: run-relative keys, nothing known of their content
        prefix = f"{ROOT}/{manifest['name']}/"
        files = {k.removeprefix(prefix): {} for k in files}
    return {rel: record for rel, record in files.items() if rel.startswith(under)}


def records_of(folder: Path, files: list[Path], prefix: str = "") -> dict[str, dict]:
    """The manifest's records of `files` (under the local `folder`): bytes and sha256, by path in the checkpoint
    (`prefix/...` where they go under a prefix of it)."""
    lead = f"{prefix}/" if prefix else ""
    return {lead + p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
            for p in files}


def check_sizes(store: ArtifactStore, prefix: str, records: dict[str, dict]) -> None:
    """Each recorded file is in the store (at `prefix`) with its recorded size; CheckpointError naming it."""
    keys = {rel: f"{prefix}/{rel}" if prefix else rel for rel in records}
    # one listing of the narrowest folder that holds them all (the file itself when there is one)
    found = store.sizes(posixpath.commonpath(list(keys.values()))) if keys else {}
    for rel, record in records.items():
        key = keys[rel]
        size = found.get(key)
        if size is None:
            raise CheckpointError(f"{store.key_uri(key)}: missing ({MANIFEST} lists it)")
        if "bytes" in record and size != record["bytes"]:
            raise CheckpointError(f"{store.key_uri(key)}: {size} bytes, {MANIFEST} says {record['bytes']} "
                                  f"(truncated or changed)")


def check_checksums(folder: Path, records: dict[str, dict], where) -> None:
    """Each recorded file under the local `folder` has its recorded sha256; `where(rel)` names a file in errors."""
    for rel, record in records.items():
        if "sha256" in record and sha256_of(folder / rel) != record["sha256"]:
            raise CheckpointError(f"{where(rel)}: checksum differs from {MANIFEST} (the file is damaged or changed)")


def newest_intact(run: ArtifactStore, besides: str) -> str | None:
    """The newest complete checkpoint other than `besides` whose files have their recorded sizes."""
    for name in reversed(list_checkpoints(run)[0]):
        if name == besides:
            continue
        try:
            check_sizes(run, f"{ROOT}/{name}", file_records(read_manifest(run, f"{ROOT}/{name}")))
        except CheckpointError:
            continue
        return name
    return None


@contextlib.contextmanager
def naming_the_newest(run: ArtifactStore | None, name: str):
    """A CheckpointError raised inside also names the run's newest intact checkpoint besides `name`."""
    try:
        yield
    except CheckpointError as err:
        other = newest_intact(run, name) if run is not None else None
        hint = f"the newest complete checkpoint of the run is {other}" if other else "the run has no other complete checkpoint"
        raise CheckpointError(f"{err}; {hint}") from None


# -- reading a checkpoint ------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A complete checkpoint, opened for reading: its store, manifest and run config."""

    uri: str
    store: ArtifactStore
    manifest: dict
    config: Config
    run: ArtifactStore | None = None
    """The run's store, when the checkpoint lies in one (`<output>/checkpoints/<name>`)."""

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
        """The exported modules under `folder/<module>/` (downloaded unless the store is local), their files
        checked against the manifest and their weights for NaN and Inf."""
        return fetch_export(self.uri, self.store, self.manifest, folder, self.run)


def read_manifest(store: ArtifactStore, prefix: str = "") -> dict:
    """The manifest of the checkpoint at `prefix` of `store`, refused unless complete and of a layout this reads."""
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    where = store.key_uri(prefix) if prefix else store.uri
    if not store.exists(key):
        withdrawn = store.exists(f"{prefix}/{WITHDRAWN}" if prefix else WITHDRAWN)
        raise CheckpointError(f"{where}: not a complete checkpoint ("
                              + ("withdrawn: its weights give non-finite values)" if withdrawn else f"no {MANIFEST})"))
    manifest = json.loads(store.get_text(key))
    if manifest.get("format") not in READABLE:
        raise CheckpointError(f"{where}: checkpoint layout {manifest.get('format', 1)}, this distill reads layout "
                              f"{FORMAT} (and {', '.join(map(str, READABLE[:-1]))}); it was written by an older "
                              f"version: start a new run (its export/ folder still serves as init_from)")
    return manifest


def _run_store(uri: str, storage: StorageConfig | None) -> ArtifactStore | None:
    root, _ = split_checkpoint_uri(uri)
    return open_store(root, storage) if root else None


def open_checkpoint(uri: str, storage: StorageConfig | None = None) -> Checkpoint:
    """Open a complete checkpoint folder (`<output>/checkpoints/step-000500` or `.../latest`, local or s3://);
    its config is checked against the manifest."""
    uri = resolve_latest(uri, storage)
    store = open_store(uri, storage)
    run = _run_store(uri, storage)
    with naming_the_newest(run, uri.split("/")[-1]):
        manifest = read_manifest(store)
        record = file_records(manifest, CONFIG).get(CONFIG, {})
        check_sizes(store, "", {CONFIG: record})
        text = store.get_bytes(CONFIG)
        if "sha256" in record and hashlib.sha256(text).hexdigest() != record["sha256"]:
            raise CheckpointError(f"{store.key_uri(CONFIG)}: checksum differs from {MANIFEST} (the file is damaged "
                                  f"or changed)")
    cfg = build_config(yaml.safe_load(text.decode()))
    if storage is not None:
        cfg.storage = storage
    return Checkpoint(uri, store, manifest, cfg, run)


def fetch_export(uri: str, store: ArtifactStore, manifest: dict, folder: Path, run: ArtifactStore | None) -> Path:
    """The export folder of a checkpoint (downloaded into `folder` unless local), verified: sizes, checksums, and
    no NaN or Inf in its weights. CheckpointError naming the bad file and the run's newest complete checkpoint."""
    from distill.finite import described, nonfinite_in_safetensors

    with naming_the_newest(run, manifest["name"]):
        records = {rel.removeprefix(f"{EXPORT}/"): r for rel, r in file_records(manifest, f"{EXPORT}/").items()}
        check_sizes(store, EXPORT, records)
        if store.is_local:
            folder = Path(store.root) / EXPORT
        else:
            store.download_folder(EXPORT, folder)
        check_checksums(folder, records, lambda rel: store.key_uri(f"{EXPORT}/{rel}"))
        bad = nonfinite_in_safetensors(folder)
        if bad:
            raise CheckpointError(f"{uri}: its exported weights are not finite (NaN or Inf) in {described(bad)}; "
                                  f"this checkpoint cannot be exported, benchmarked or started from")
    return folder


_EXPORTS: dict[tuple, tuple[str, object]] = {}
"""Exports verified (and downloaded) in this process, by (path, endpoint, manifest's time) -> (folder, temp dir):
a run resolves its init_from sources before it builds anything, and again when it builds the roles."""


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
    name = store.get_text(LATEST).strip()
    if not NAME.fullmatch(name):
        raise CheckpointError(f"{path}: names {name!r}, not a checkpoint of the run")
    return f"{root}/{name}"


def resolve_export(path: str, storage: StorageConfig | None = None) -> str | None:
    """The export folder (holding one folder per module) of a checkpoint (`.../checkpoints/step-000500`)
    or of a run's newest one (`.../checkpoints/latest`), local or s3:// (downloaded), verified as in
    `fetch_export`; None for any other path."""
    path = resolve_latest(path, storage)
    store = open_store(path, storage)
    if not store.exists(MANIFEST) and not store.exists(WITHDRAWN):
        return None
    manifest = read_manifest(store)
    key = (path, storage.endpoint_url if storage else None, manifest.get("created"))
    if key not in _EXPORTS:
        tmp = None if store.is_local else tempfile.TemporaryDirectory(prefix="distill-export-")  # removed at exit
        folder = fetch_export(path, store, manifest, Path(tmp.name) if tmp else Path(), _run_store(path, storage))
        _EXPORTS[key] = (str(folder), tmp)
    return _EXPORTS[key][0]
