"""A run's folder: a local working directory, mirrored into the artifact store when that is remote."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from distill.config import Config, ConfigError
from distill.errors import InputError
from distill.storage import ArtifactStore, open_store

SHARD_CACHE = "shard-cache"
"""Where remote shards are cached in the working folder: a cache, not a product of the run."""


class RunFolder:
    """Files are written under `local`; `sync(rel)` puts a file or folder into the store at the same key.

    For a local output the store's root is `local` itself and `sync` has nothing to do. For a remote
    one without `storage.local_dir`, `local` is a temporary folder that `close()` removes.
    """

    def __init__(self, cfg: Config):
        self.store: ArtifactStore = open_store(cfg.run.output, cfg.storage)
        self.temporary = not self.store.is_local and not cfg.storage.local_dir
        if self.store.is_local:
            self.local = Path(cfg.run.output)
        elif cfg.storage.local_dir:
            self.local = Path(cfg.storage.local_dir)
        else:
            self.local = Path(tempfile.mkdtemp(prefix="distill-run-"))
        self.created = self.local if self.temporary else _first_missing(self.local)
        """The outermost folder this run made (None when `local` was there before): what a failed start removes."""
        self.local.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def removed_on_error(self):
        """A failure inside (a run that never started training) removes the folders this run made, and only those."""
        try:
            yield
        except BaseException:
            if self.created is not None:
                shutil.rmtree(self.created, ignore_errors=True)
            raise

    def close(self) -> None:
        """After training, done or failed: a temporary working folder goes, its metrics put into the store first."""
        if not self.temporary:
            return
        for rel in ("metrics.jsonl", "tb"):
            with contextlib.suppress(InputError):  # the store may be what failed: then only these are lost
                self.sync(rel)
        shutil.rmtree(self.local, ignore_errors=True)

    def leftovers(self) -> list[str]:
        return leftovers(self.store, self.local)

    def refuse_leftovers(self) -> None:
        refuse_leftovers(self.store, self.local)

    def clear(self) -> None:
        """Delete an earlier run's files (--overwrite), the shard cache aside; called once models are built."""
        for top in sorted({k.split("/")[0] for k in self.leftovers()}):
            self.store.delete(top)
            if self.store.is_local:
                continue
            path = self.local / top
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def sync(self, rel: str) -> None:
        if self.store.is_local:
            return
        path = self.local / rel
        if path.is_dir():
            self.store.upload_folder(path, rel)
        elif path.is_file():
            self.store.put_file(path, rel)

    def fetch(self, rel: str) -> bool:
        """Bring a file from the store into the working folder (resume); False when it is not there."""
        if self.store.is_local:
            return (self.local / rel).exists()
        if not self.store.exists(rel):
            return False
        self.store.get_file(rel, self.local / rel)
        return True


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None when `path` exists)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def leftovers(store: ArtifactStore, local: Path | None) -> list[str]:
    """Files an earlier run left (in the store, and in a separate working folder `local`), the shard cache aside:
    a fresh run among them would mix its metrics, events and checkpoints with theirs."""
    keys = set(store.list())
    if not store.is_local and local is not None and local.is_dir():
        keys |= {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    return sorted(k for k in keys if not k.startswith(f"{SHARD_CACHE}/"))


def refuse_leftovers(store: ArtifactStore, local: Path | None) -> None:
    """A fresh run (neither --resume nor --overwrite) starts in an empty folder only."""
    keys = leftovers(store, local)
    if keys:
        names = sorted({k.split("/")[0] + ("/" if "/" in k else "") for k in keys})
        raise ConfigError(f"run.output: {store.uri} already holds a run ({', '.join(names[:6])}"
                          f"{', ...' if len(names) > 6 else ''}); continue it with --resume, start it over "
                          f"with --overwrite (deletes those files), or choose another run.output")
