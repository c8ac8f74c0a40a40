"""A run's folder: a local working directory, mirrored into the artifact store when that is remote."""

from __future__ import annotations

import tempfile
from pathlib import Path

from distill.config import Config
from distill.storage import ArtifactStore, open_store


class RunFolder:
    """Files are written under `local`; `sync(rel)` puts a file or folder into the store at the same key.

    For a local output the store's root is `local` itself and `sync` has nothing to do.
    """

    def __init__(self, cfg: Config):
        self.store: ArtifactStore = open_store(cfg.run.output, cfg.storage)
        if self.store.is_local:
            self.local = Path(cfg.run.output)
        elif cfg.storage.local_dir:
            self.local = Path(cfg.storage.local_dir)
        else:
            self.local = Path(tempfile.mkdtemp(prefix="distill-run-"))
        self.local.mkdir(parents=True, exist_ok=True)

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
