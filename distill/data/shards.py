"""The shard format: what `distill preprocess` writes and the trainer reads.

A shard folder (local, or s3:// through the artifact store) holds
    shard-00000.safetensors   tensors of up to `shard_size` samples
    shard-00000.json          its record: count, bytes, sha256 (and S3 ETag), tensor shapes and dtypes,
                              captions, videos
    negative.safetensors      the negative-prompt embedding, once
    MANIFEST.json             written last: the model identity, the settings, every shard's record,
                              the negative embedding's bytes and sha256

Tensors: `prompt_embeds` (N, L, D) bf16 with L the longest prompt in the shard (zero padding
beyond is cut and restored at load), and for video data `pixels` (N, 3, F, H, W) uint8 or
`vae_latent` (N, C, F', H', W') bf16. A shard counts as written once its record exists (the
record goes up after the file); a folder counts as finished once MANIFEST.json exists.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from distill.errors import InputError
from distill.storage import ArtifactStore, sha256_of

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
NEGATIVE = "negative.safetensors"


class ShardError(InputError):
    """A shard folder or file disagrees with its manifest or with the run; the message names it."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def describe(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}


def write_shard(store: ArtifactStore, staging: Path, index: int, tensors: dict[str, torch.Tensor],
                extra: dict) -> dict:
    """Write one shard file into the store, then its record (which marks it complete). Returns the record.

    `staging` is where the file is made; for a local store it is the store's own folder.
    """
    name = shard_name(index)
    path = staging / f"{name}.safetensors"
    tmp = staging / f"{name}.safetensors.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    count = next(iter(tensors.values())).shape[0]
    record = {"file": path.name, "count": count, **file_record(store, path), "tensors": describe(tensors), **extra}
    store.put_text(json.dumps(record, indent=1), f"{name}.json")
    if not store.is_local:
        path.unlink()
    return record


def file_record(store: ArtifactStore, path: Path) -> dict:
    """Put a file into the store under its name; returns its bytes, sha256 and (S3) ETag, to check it by later."""
    record = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    store.put_file(path, path.name)
    etag = store.etag(path.name)
    return {**record, "etag": etag} if etag else record


def read_record(store: ArtifactStore, index: int) -> dict | None:
    """The record of a complete shard, or None when the shard is missing, partial or damaged.

    Locally the file's checksum is checked; in a remote store its size and ETag (the checksum is
    checked again when training first loads the shard).
    """
    name = shard_name(index)
    if not store.exists(f"{name}.json"):
        return None
    record = json.loads(store.get_text(f"{name}.json"))
    if store.size(record["file"]) != record["bytes"]:
        return None
    if record.get("etag") and store.etag(record["file"]) != record["etag"]:
        return None
    if store.is_local and sha256_of(Path(store.root) / record["file"]) != record["sha256"]:
        return None
    return record


def read_manifest(store: ArtifactStore) -> dict:
    if not store.exists(MANIFEST):
        raise ShardError(f"{store.uri}: no {MANIFEST}; not a finished shard folder (run `distill preprocess` to make one)")
    manifest = json.loads(store.get_text(MANIFEST))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{store.key_uri(MANIFEST)}: format_version {manifest.get('format_version')}, "
                         f"this reader knows {FORMAT_VERSION}")
    return manifest


def _signature(path: Path) -> tuple[int, int]:
    """What tells a file changed without reading it: its size and modification time."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class ShardDataset(Dataset):
    """Samples of a finished shard folder, checked against the run's model before any training.

    The folder-level checks (manifest, model identity, files present with the recorded size)
    run at construction; `verify()` checks every shard's checksum (the trainer calls it before
    training starts). A shard's tensor shapes and dtypes are checked when it is first loaded,
    and its checksum again when the file is new (downloaded) or changed since it was checked.
    """

    def __init__(self, store: ArtifactStore, *, identity: dict, max_text_length: int, video: dict | None = None,
                 negative_prompt: str | None = None, with_latents: bool = True, cache_dir: Path | None = None,
                 cache_shards: int = 2):
        self.store = store
        self.folder = store.uri
        # Remote shards are downloaded on first use into cache_dir; local ones are read in place.
        self.files = Path(store.root) if store.is_local else Path(cache_dir or tempfile.mkdtemp(prefix="distill-shards-"))
        self.manifest = read_manifest(store)
        theirs = self.manifest["model"]
        diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
        if diff:
            said = "; ".join(f"{k}: shards {a!r}, run {b!r}" for k, (a, b) in diff.items())
            raise ShardError(f"{self.folder}: shards were made by a different model than this run's ({said}); "
                             f"preprocess again with this run's model section")
        if video is not None and self.manifest["video"] not in (None, video):
            raise ShardError(f"{self.folder}: shards hold videos of {self.manifest['video']}, the run's data "
                             f"section asks for {video}; preprocess again or change data.num_frames/height/width")
        if negative_prompt is not None and self.manifest["negative_prompt"] != negative_prompt:
            raise ShardError(f"{self.folder}: the shards hold the embedding of the negative prompt "
                             f"{self.manifest['negative_prompt']!r}, but data.negative_prompt is {negative_prompt!r}; "
                             f"preprocess again with this negative prompt, or set data.negative_prompt to the shards'")
        self.records = self.manifest["shards"]
        if not self.records or self.manifest["count"] == 0:
            raise ShardError(f"{self.folder}: the data set is empty (0 samples)")
        found = store.sizes()  # one listing: a data set of thousands of shards would take a request a shard
        for record in self.records:
            where, size = store.key_uri(record["file"]), found.get(record["file"])
            if size is None:
                raise ShardError(f"{where}: shard listed in {MANIFEST} is missing")
            if size != record["bytes"]:
                raise ShardError(f"{where}: {size} bytes, {MANIFEST} says {record['bytes']}")
        # Methods that start from noise read the text alone: the latents stay on disk.
        stored = self.manifest["fields"]
        self.keys = [k for k in stored if with_latents or k == "prompt_embeds"]
        self.fields = tuple(self.keys) + ("negative_prompt_embeds",)
        self.max_text_length = max_text_length
        self.starts = []
        total = 0
        for record in self.records:
            self.starts.append(total)
            total += record["count"]
        self.count = total
        negative_path = self._local(NEGATIVE)
        expected = self.manifest.get("negative")  # absent from folders written before it was recorded
        if expected and sha256_of(negative_path) != expected["sha256"]:
            raise ShardError(f"{store.key_uri(NEGATIVE)}: checksum differs from {MANIFEST} (the file changed or is "
                             f"damaged)")
        negative = load_file(str(negative_path))["negative_prompt_embeds"]
        self.negative = self._pad_text(negative[None])[0].float()
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._verified: dict[int, tuple[int, int]] = {}  # shard -> (size, mtime) of the file whose checksum was right
        self._described: set[int] = set()
        self.cache_shards = cache_shards

    def __len__(self) -> int:
        return self.count

    def _local(self, name: str, size: int | None = None) -> Path:
        path = self.files / name
        if not self.store.is_local and not path.is_file():
            self.store.get_file(name, path, size)
        return path

    def locate(self, index: int) -> tuple[int, int]:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:  # last shard whose start <= index
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.starts[mid] <= index else (lo, mid - 1)
        return lo, index - self.starts[lo]

    def _pad_text(self, embeds: torch.Tensor) -> torch.Tensor:
        pad = self.max_text_length - embeds.shape[1]
        return torch.nn.functional.pad(embeds, (0, 0, 0, pad)) if pad > 0 else embeds

    def verify(self, workers: int = 4) -> None:
        """Every shard's checksum, before training starts: a damaged shard found iterations in loses their work.

        Local shards are hashed, the whole data set read once (in threads: large data sets take a while,
        less than an epoch). Shards in S3 are compared by the ETag recorded when they were written, with
        no download; S3 itself guards the bytes it holds, and a shard's sha256 is checked again when it
        is first downloaded. Folders written before ETags were recorded get the size check only.
        """
        if self.store.is_local:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                sums = list(pool.map(lambda r: sha256_of(self.files / r["file"]), self.records))
            bad = [r["file"] for r, digest in zip(self.records, sums) if digest != r["sha256"]]
            self._verified = {i: _signature(self.files / r["file"]) for i, r in enumerate(self.records)
                              if r["file"] not in bad}
        else:
            bad = [r["file"] for r in self.records if r.get("etag") and self.store.etag(r["file"]) != r["etag"]]
        if bad:
            raise ShardError(f"{self.store.key_uri(bad[0])}: checksum differs from {MANIFEST} (the file changed or "
                             f"is damaged){'; also ' + ', '.join(bad[1:]) if bad[1:] else ''}; restore the "
                             f"shards or preprocess into a new data.shards folder")

    def load_shard(self, shard: int) -> dict[str, torch.Tensor]:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        record = self.records[shard]
        path = self._local(record["file"], record["bytes"])
        where = self.store.key_uri(record["file"])
        if self._verified.get(shard) != _signature(path):  # not checked yet, or the file changed since
            if sha256_of(path) != record["sha256"]:
                raise ShardError(f"{where}: checksum differs from {MANIFEST} (the file changed or is damaged)")
            self._verified[shard] = _signature(path)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in self.keys}
        if shard not in self._described:
            found, expected = describe(tensors), {k: record["tensors"].get(k) for k in self.keys}
            if found != expected:
                raise ShardError(f"{where}: tensors {found} disagree with {MANIFEST} {expected}")
            self._described.add(shard)
        self._cache[shard] = tensors
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tensors

    def __getitem__(self, index: int) -> dict:
        shard, row = self.locate(index)
        tensors = self.load_shard(shard)
        item = {"prompt_embeds": self._pad_text(tensors["prompt_embeds"][row : row + 1])[0].float(),
                "negative_prompt_embeds": self.negative}
        if "pixels" in tensors:
            item["pixels"] = tensors["pixels"][row].float() / 127.5 - 1.0
        if "vae_latent" in tensors:
            item["vae_latent"] = tensors["vae_latent"][row].float()
        return item

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        """Shards in a shuffled order, each shard's samples shuffled: random yet shard-local."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = []
        for shard in torch.randperm(len(self.records), generator=g).tolist():
            start, count = self.starts[shard], self.records[shard]["count"]
            order.extend(start + i for i in torch.randperm(count, generator=g).tolist())
        return order
