"""Artifact storage: a local directory (the default) or S3 through boto3, behind one interface.

Keys are '/'-separated paths relative to the store's root (a folder, or s3://bucket/prefix).
S3 credentials come from the standard AWS chain (environment, ~/.aws, instance role) and
never pass through this module's arguments, messages or logs. Transfers retry with
exponential backoff; large files go up and down in multipart chunks. A folder is
published by writing its files first and its manifest last: readers treat a folder as
present only once the manifest exists.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distill.config import StorageConfig
from distill.errors import InputError


class StorageError(InputError):
    """A store cannot be reached or refuses a request; the message names the URI, never credentials.

    `transient`: the request failed on every attempt for a reason that may pass (network, server errors),
    so a caller may try again later; a refusal (no credentials, access denied, not found) is not."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks (hashlib drops the GIL: threads may hash files side by side)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactStore(ABC):
    uri: str

    @abstractmethod
    def put_file(self, local: Path, key: str) -> None: ...
    @abstractmethod
    def get_file(self, key: str, local: Path, size: int | None = None) -> Path:
        """The file at `key` copied to `local`; `size`, where the caller knows it, may save a request."""
    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> None: ...
    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...
    @abstractmethod
    def exists(self, key: str) -> bool: ...
    @abstractmethod
    def size(self, key: str) -> int | None:
        """Bytes of the file at `key`, or None when there is none."""
    def etag(self, key: str) -> str | None:
        """The object's entity tag where the store keeps one (S3), else None."""
        return None

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys of all files under `prefix`, sorted."""
    @abstractmethod
    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Bytes of every file under `prefix`, by key: one listing, where a checkpoint of many files would take a
        request per file."""
    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Remove every file under `prefix`."""

    def check(self) -> None:
        """Fail early (bad credentials, missing bucket, unreachable server) before any work."""

    def key_uri(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    @property
    def is_local(self) -> bool:
        return isinstance(self, LocalStore)

    def put_text(self, text: str, key: str) -> None:
        self.put_bytes(text.encode(), key)

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode()

    def upload_folder(self, local_dir: Path, prefix: str, *, last: str | None = None) -> list[str]:
        """Upload every file of `local_dir` under `prefix`; the file named `last` goes up last, once every other
        one is up."""
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)  # stable: the manifest moves to the end
        rels = [p.relative_to(local_dir).as_posix() for p in files]
        keys = [f"{prefix.rstrip('/')}/{rel}" if prefix else rel for rel in rels]
        jobs = [(functools.partial(self.put_file, path, key), path.stat().st_size) for path, key in zip(files, keys)]
        split = len(jobs) - 1 if files and files[-1].name == last else len(jobs)
        self.transfer(jobs[:split])
        self.transfer(jobs[split:])
        return keys

    def download_folder(self, prefix: str, local_dir: Path) -> list[Path]:
        found = sorted(self.sizes(prefix).items())
        if not found:
            raise StorageError(f"{self.key_uri(prefix)}: nothing there")
        paths = [Path(local_dir) / key[len(prefix) :].lstrip("/") for key, _ in found]
        self.get_files([(key, path, size) for (key, size), path in zip(found, paths)])
        return paths

    def get_files(self, files: list[tuple[str, Path, int | None]]) -> None:
        """Download each (key, local path, bytes or None where unknown) through `transfer`."""
        self.transfer([(functools.partial(self.get_file, key, local, size), size) for key, local, size in files])

    def transfer(self, jobs: list[tuple[Callable[[], object], int | None]]) -> None:
        """Run file transfers, each given with its bytes (None: unknown); the first failure is raised."""
        for job, _ in jobs:
            job()


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, local: Path, key: str) -> None:
        target = self._path(key)
        if Path(local).resolve() == target.resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)

    def get_file(self, key: str, local: Path, size: int | None = None) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"{source}: not found")
        local = Path(local)
        if source.resolve() != local.resolve():
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, local)
        return local

    def put_bytes(self, data: bytes, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise StorageError(f"{path}: not found")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        if base.is_file():
            return [prefix]
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {key: self._path(key).stat().st_size for key in self.list(prefix)}

    def delete(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class S3Store(ArtifactStore):
    """s3://bucket/prefix through boto3 (any S3-compatible server with `storage.endpoint_url`)."""

    def __init__(self, uri: str, cfg: StorageConfig):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig

        rest = uri[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"{uri}: no bucket in the URI (expected s3://bucket/prefix)")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.cfg = cfg
        self.endpoint = cfg.endpoint_url or "AWS S3"
        boto_cfg = BotoConfig(
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            max_pool_connections=max(10, cfg.max_concurrency),  # a connection for each part or file in flight
        )
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=boto_cfg
        )
        mib = 1024 * 1024
        self.transfer_config = TransferConfig(
            multipart_threshold=cfg.multipart_threshold_mb * mib,
            multipart_chunksize=cfg.multipart_chunk_mb * mib,
            max_concurrency=cfg.max_concurrency,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn):
        """Run one request with retries and backoff; turn failures into a StorageError naming the URI."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError

        attempts = max(1, self.cfg.retries)
        for attempt in range(attempts):
            try:
                return fn()
            except (NoCredentialsError, PartialCredentialsError):  # no retry brings credentials: fail at once
                raise StorageError(
                    f"{self.key_uri(key)}: no complete AWS credentials found for {self.endpoint}; set them in the "
                    f"standard chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)"
                ) from None
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code in ("NoSuchBucket",) or (code in ("404", "NoSuchKey") and what == "check"):
                    raise StorageError(f"{self.uri}: bucket {self.bucket!r} does not exist at {self.endpoint}") from None
                if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                    raise StorageError(
                        f"{self.key_uri(key)}: access denied ({code}) by {self.endpoint}; check the AWS credentials "
                        f"of the standard chain (AWS_ACCESS_KEY_ID / AWS_PROFILE / instance role)"
                    ) from None
                if code in ("404", "NoSuchKey"):
                    raise StorageError(f"{self.key_uri(key)}: not found") from None
                reason = f"{code}: {err.response.get('Error', {}).get('Message', '')}"
            except (BotoCoreError, S3UploadFailedError, S3TransferFailedError, OSError) as err:
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            if attempt + 1 < attempts:
                time.sleep(self.cfg.backoff_seconds * 2**attempt)
        raise StorageError(f"{self.key_uri(key)}: {what} failed after {attempts} attempts at {self.endpoint} ({reason})",
                           transient=True)

    def check(self) -> None:
        self._call("check", "", lambda: self.client.head_bucket(Bucket=self.bucket))

    def put_file(self, local: Path, key: str) -> None:
        self._call("upload", key, lambda: self.client.upload_file(
            str(local), self.bucket, self._key(key), Config=self.transfer_config))

    def transfer(self, jobs: list[tuple[Callable[[], object], int | None]]) -> None:
        """Files below the multipart threshold `max_concurrency` at a time: a checkpoint of many small files (a
        universal one holds four a parameter) waits on the server's latency, not its bandwidth. Larger ones go
        one after another, each in `max_concurrency` parts. On a failure the files not started are dropped."""
        threshold = self.transfer_config.multipart_threshold
        small = [job for job, size in jobs if size is not None and size < threshold]
        super().transfer([(job, size) for job, size in jobs if size is None or size >= threshold])
        if len(small) < 2 or self.cfg.max_concurrency < 2:
            return super().transfer([(job, None) for job in small])
        with ThreadPoolExecutor(self.cfg.max_concurrency, thread_name_prefix="distill-s3") as pool:
            futures = [pool.submit(job) for job in small]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise

    def get_file(self, key: str, local: Path, size: int | None = None) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".part")
        if size is not None and size < self.transfer_config.multipart_threshold:
            # one GET: boto3's download_file asks for the size first (a HEAD), which a caller that knows it saves
            self._call("download", key, lambda: self._get_to(key, tmp, size))
        else:
            self._call("download", key, lambda: self.client.download_file(
                self.bucket, self._key(key), str(tmp), Config=self.transfer_config))
        os.replace(tmp, local)
        return local

    def _get_to(self, key: str, path: Path, size: int) -> None:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        with open(path, "wb") as f:
            for chunk in body.iter_chunks(1 << 20):
                f.write(chunk)
        if path.stat().st_size != size:  # changed since it was listed: the caller's size no longer holds
            raise OSError(f"{path.stat().st_size} bytes arrived, {size} expected")

    def put_bytes(self, data: bytes, key: str) -> None:
        self._call("upload", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key: str) -> bytes:
        return self._call("download", key,
                          lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        def head():
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return self._call("lookup", key, head)

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else head["ContentLength"]

    def etag(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else head["ETag"].strip('"')

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")

        def pages():
            found = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                found.update((obj["Key"], obj["Size"]) for obj in page.get("Contents", []))
            return found

        strip = len(self.prefix) + 1 if self.prefix else 0
        found = {k[strip:]: size for k, size in self._call("list", prefix, pages).items()}
        if prefix:  # a prefix names a folder or a file, not a name's beginning
            found = {k: size for k, size in found.items() if k == prefix or k.startswith(prefix.rstrip("/") + "/")}
        return found

    def delete(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call("delete", prefix, lambda: self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch}))


def open_store(uri: str, cfg: StorageConfig | None = None) -> ArtifactStore:
    """A store for a local folder or an s3://bucket/prefix URI."""
    if uri.startswith("s3://"):
        return S3Store(uri, cfg or StorageConfig())
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported storage scheme (use a local path or s3://bucket/prefix)")
    return LocalStore(uri)
