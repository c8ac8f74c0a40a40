"""Checkpoints that resume on another number of ranks: DeepSpeed's universal checkpoints.

Under ZeRO stages 1-3 a role's engine state (`roles/<role>/state`) holds each rank's partition of the fp32
weights and optimizer moments: only as many ranks as wrote it can load it. `distill reshard CHECKPOINT` converts
every trainable role's state with DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) into
`roles/<role>/universal`, each parameter's weights and moments whole. The new files join the manifest (bytes,
sha256), which then says `"universal": true`; nothing of the checkpoint is changed or removed, and a resume on the
number of ranks that wrote it still reads the original state. Under stage 0 every rank saved the whole state: such
a checkpoint resumes on any number of ranks as it is.

A resume on another number of ranks builds the engines with DeepSpeed's `checkpoint.load_universal` and loads the
universal tag; each stateful object (loop, method, data position, RNG) gets the states of all the saved
data-parallel ranks through its `load_resharded` and maps them onto this run's ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from distill.config import StorageConfig
from distill.outputs import replace_folder
from distill.run_layout import (MANIFEST, CheckpointError, check_checksums, check_sizes, file_records,
                                open_checkpoint, records_of)
from distill.storage import ArtifactStore

STATE = "state"
"""The engine tag a run saves its roles' DeepSpeed states under."""
UNIVERSAL = "universal"
"""The engine tag of a role's universal state, and the manifest's key that says the checkpoint has them."""


# -- resuming ---------------------------------------------------------------------------------


def check_resumable(manifest: dict, world_size: int, where: str) -> None:
    """Refuse a checkpoint whose engine states `world_size` ranks cannot load, naming the command that fixes it."""
    saved, stage = manifest["world_size"], manifest.get("zero_stage")
    if saved == world_size or stage == 0 or manifest.get(UNIVERSAL):
        return
    raise CheckpointError(f"{where}: saved by {saved} ranks, this run has {world_size}; under ZeRO stage {stage} "
                          f"each rank saved its own part of the optimizer states. `distill reshard {where}` adds "
                          f"states that resume on any number of ranks (DeepSpeed's universal checkpoint), or resume "
                          f"with {saved} ranks")


def engine_tag(manifest: dict, world_size: int) -> str:
    """The engine states a run of `world_size` ranks loads from a checkpoint it may resume from."""
    if manifest["world_size"] == world_size or manifest.get("zero_stage") == 0:
        return STATE
    return UNIVERSAL


def read_by(records: dict[str, dict], tag: str) -> dict[str, dict]:
    """The file records a resume that loads the engine states of `tag` reads: not the other tag's states."""
    other = UNIVERSAL if tag == STATE else STATE
    return {rel: r for rel, r in records.items() if not (rel.startswith("roles/") and rel.split("/")[2:3] == [other])}


def check_holds(saved: dict, states: dict, where: str) -> None:
    """A rank's saved states hold one for each stateful object of this run; CheckpointError naming those missing."""
    missing = [k for k in states if k not in saved]
    if missing:
        raise CheckpointError(f"{where}: holds no state for {', '.join(missing)} (it has: {', '.join(saved)})")


def load_resharded(folder: Path, states: dict, saved_world_size: int, sequence_parallel_size: int,
                   where: str) -> None:
    """Each stateful object's state from every data-parallel rank of a run with another number of ranks (a
    sequence-parallel group shares one: its first rank's is read), through its `load_resharded`."""
    saved = [torch.load(folder / "trainer" / f"rank-{rank:05d}.pt", weights_only=False)
             for rank in range(0, saved_world_size, sequence_parallel_size)]
    check_holds(saved[0], states, where)
    for key, stateful in states.items():
        if not hasattr(stateful, "load_resharded"):
            raise CheckpointError(f"{where}: the {key} state resumes only on {saved_world_size} ranks (its object "
                                  f"has no load_resharded)")
        try:
            stateful.load_resharded([s[key] for s in saved])
        except ValueError as err:
            raise CheckpointError(f"{where}: cannot resume on another number of ranks: {key}: {err}") from None


# -- converting -------------------------------------------------------------------------------


def reshard(uri: str, storage: StorageConfig | None = None) -> str:
    """Add universal engine states to the complete checkpoint at `uri` (a path or s3:// URI, or `.../latest`);
    returns a sentence saying what was done."""
    ckpt = open_checkpoint(uri, storage)
    manifest, store = ckpt.manifest, ckpt.store
    if manifest.get(UNIVERSAL):
        return f"{store.uri}: resumes on any number of ranks already (universal since an earlier reshard)"
    if manifest.get("zero_stage") == 0:
        return (f"{store.uri}: ZeRO stage 0, every rank saved the whole engine states: it resumes on any number of "
                f"ranks as it is")
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{store.uri}: layout {manifest.get('format')} records no file checksums; resume it "
                              f"on {manifest['world_size']} ranks and save a new checkpoint to reshard that one")
    records = {}
    with _workspace(store) as work:
        source = _fetch_states(store, manifest, work / "in")
        for role in manifest["roles"]:
            out = work / "out" / role / UNIVERSAL
            _convert(source / "roles" / role / STATE, out, f"{store.uri} (role {role!r})")
            files = sorted(p for p in out.rglob("*") if p.is_file())
            records.update(records_of(out, files, f"roles/{role}/{UNIVERSAL}"))
        for role in manifest["roles"]:
            _publish(store, work / "out" / role / UNIVERSAL, f"roles/{role}/{UNIVERSAL}")
        # the manifest last: until it names them, the new files are not part of the checkpoint
        files = dict(sorted({**manifest["files"], **records}.items()))
        store.put_text(json.dumps({**manifest, UNIVERSAL: True, "files": files}, indent=1), MANIFEST)
    size = sum(r["bytes"] for r in records.values())
    return (f"{store.uri}: universal engine states of {', '.join(manifest['roles'])} added ({len(records)} files, "
            f"{size / 2**20:.1f} MiB); `distill train CONFIG --resume {ckpt.name}` continues it on any number of ranks")


@contextlib.contextmanager
def _workspace(store: ArtifactStore) -> Iterator[Path]:
    """A scratch folder: inside a local checkpoint (moves into place are renames), else a temporary one."""
    if store.is_local:
        work = Path(store.root) / ".reshard"
        shutil.rmtree(work, ignore_errors=True)  # left by a reshard that died
        work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="distill-reshard-") as tmp:
            yield Path(tmp)


def _fetch_states(store: ArtifactStore, manifest: dict, folder: Path) -> Path:
    """The checkpoint's folder holding `roles/<role>/state` (downloaded into `folder` unless local), checked
    against the manifest: sizes, then checksums."""
    records = {rel: r for role in manifest["roles"]
               for rel, r in file_records(manifest, f"roles/{role}/{STATE}/").items()}
    check_sizes(store, "", records)
    if not store.is_local:
        for role in manifest["roles"]:
            store.download_folder(f"roles/{role}/{STATE}", folder / "roles" / role / STATE)
    folder = Path(store.root) if store.is_local else folder
    check_checksums(folder, records, store.key_uri)
    return folder


def _convert(state: Path, out: Path, where: str) -> None:
    """DeepSpeed's ds_to_universal from `state` into `out` (its chatter on stderr, stdout kept for the result)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    cpus = os.cpu_count() or 1
    # inject_missing_state: distill's modules declare no tensor- or pipeline-parallel layout
    # (universal_checkpoint_info), which the converter wants only to merge such slices
    args = argparse.Namespace(input_folder=str(state), output_folder=str(out), num_extract_workers=min(4, cpus),
                              num_merge_workers=min(2, cpus), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            ds_to_universal(args)
    except Exception as err:  # DeepSpeed's asserts and errors, named with the role they came from
        raise CheckpointError(f"{where}: DeepSpeed's ds_to_universal failed on {state.name}/: "
                              f"{type(err).__name__}: {err}") from err


def _publish(store: ArtifactStore, folder: Path, prefix: str) -> None:
    """`folder` into the checkpoint at `prefix`: a rename in a local store (replacing what a reshard that died
    left there), an upload otherwise."""
    if store.is_local:
        replace_folder(folder, Path(store.root) / prefix)
    else:
        store.upload_folder(folder, prefix)
