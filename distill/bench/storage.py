"""Benchmark: checkpoint upload and download throughput through the artifact store.

    moto_server -H 127.0.0.1 -p 5000 &          # or any S3-compatible server
    AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x python -m distill.bench.storage \
        --uri s3://bench/ckpt --endpoint-url http://127.0.0.1:5000 --size-gb 1

Writes a checkpoint-shaped folder (one large "optimizer" file and smaller ones, random
bytes, `--size-gb` in all; or `--files` equal ones, as a universal checkpoint holds),
publishes it with `upload_folder` (manifest last), downloads it back, checks every byte, and
prints seconds and MB/s of each direction (median of `--repeats`). Creates the bucket when
it is missing. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from distill.config import StorageConfig
from distill.data.shards import sha256_of
from distill.storage import open_store


def make_checkpoint(folder: Path, total_bytes: int, files: int = 0) -> dict[str, str]:
    """Files shaped like a ZeRO checkpoint of one role: 75 % optimizer state, 25 % weights, a manifest. With
    `files`, like a universal one (`distill reshard`): that many files of equal size (to a byte: together
    `total_bytes`, which the report gives), three a parameter."""
    if files:
        kinds = ("fp32", "exp_avg", "exp_avg_sq")
        share, extra = divmod(total_bytes, files)
        sizes = {f"roles/student/universal/zero/param-{i // 3:05d}/{kinds[i % 3]}.pt": share + (i < extra)
                 for i in range(files)}
    else:
        sizes = {"roles/student/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": total_bytes * 3 // 4,
                 "roles/student/state/mp_rank_00_model_states.pt": total_bytes // 4 - 4096,
                 "trainer/rank-00000.pt": 4096}
    digests = {}
    for name, size in sizes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, 64 << 20))
                f.write(block)
                h.update(block)
                left -= len(block)
        digests[name] = h.hexdigest()
    (folder / "MANIFEST.json").write_text(json.dumps({"files": sorted(sizes)}))
    return digests


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uri", required=True, help="s3://bucket/prefix (or a local folder)")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-mb", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="parts of a large file, or small files, at once")
    p.add_argument("--files", type=int, default=0, help="a universal checkpoint's layout: this many equal files")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cfg = StorageConfig(endpoint_url=args.endpoint_url, multipart_threshold_mb=args.chunk_mb,
                        multipart_chunk_mb=args.chunk_mb, max_concurrency=args.concurrency)
    store = open_store(args.uri, cfg)
    if args.uri.startswith("s3://"):
        try:
            store.check()
        except Exception:  # noqa: BLE001 - a fresh server: make the bucket
            store.client.create_bucket(Bucket=store.bucket)
    total = int(args.size_gb * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="distill-bench-storage-"))
    try:
        digests = make_checkpoint(work / "up", total, args.files)
        ups, downs = [], []
        for i in range(args.repeats):
            prefix = f"bench-{i}"
            start = time.perf_counter()
            store.upload_folder(work / "up", prefix, last="MANIFEST.json")
            ups.append(time.perf_counter() - start)
            down = work / f"down-{i}"
            start = time.perf_counter()
            store.download_folder(prefix, down)
            downs.append(time.perf_counter() - start)
            for name, digest in digests.items():
                assert sha256_of(down / name) == digest, f"{name} came back different"
            shutil.rmtree(down)
            store.delete(prefix)
        mb = total / 1e6
        result = {
            "store": args.uri.split("://")[0] if "://" in args.uri else "local",
            "endpoint": args.endpoint_url,
            "bytes": total,
            "chunk_mb": args.chunk_mb,
            "concurrency": args.concurrency,
            "files": len(digests),
            "upload_seconds": [round(s, 3) for s in ups],
            "download_seconds": [round(s, 3) for s in downs],
            "upload_mb_per_s_median": round(mb / statistics.median(ups), 1),
            "download_mb_per_s_median": round(mb / statistics.median(downs), 1),
            "cpu_count": os.cpu_count(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
