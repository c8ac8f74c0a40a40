"""The artifact store against a real S3-compatible server on loopback, and the local store."""

from __future__ import annotations

import json
import os

import pytest

from distill.config import StorageConfig
from distill.storage import LocalStore, StorageError, open_store

FAST = dict(retries=2, backoff_seconds=0.05, connect_timeout=1.0, read_timeout=2.0)


def s3_store(server, prefix="store-test", **cfg):
    return open_store(f"s3://{server.bucket}/{prefix}", StorageConfig(endpoint_url=server.endpoint, **cfg))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_round_trip_listing_and_delete(tmp_path, s3, kind):
    store = LocalStore(tmp_path / "store") if kind == "local" else s3_store(s3, f"rt-{os.getpid()}",
                                                                            multipart_threshold_mb=5,
                                                                            multipart_chunk_mb=5)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))  # multipart on S3: 3 parts of 5 MiB
    store.put_file(big, "a/big.bin")
    store.put_bytes(b"hello", "a/b/small.txt")
    store.put_text("x", "c.txt")
    assert store.list() == ["a/b/small.txt", "a/big.bin", "c.txt"]
    assert store.list("a") == ["a/b/small.txt", "a/big.bin"]
    assert store.list("a/b/small.txt") == ["a/b/small.txt"]
    assert store.exists("a/big.bin") and not store.exists("a/nothing")
    assert store.sizes("a") == {"a/b/small.txt": 5, "a/big.bin": 12 * 1024 * 1024}
    assert store.get_file("a/big.bin", tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert store.get_file("a/big.bin", tmp_path / "sized.bin", big.stat().st_size).read_bytes() == big.read_bytes()
    assert store.get_file("a/b/small.txt", tmp_path / "small.txt", 5).read_bytes() == b"hello"
    assert store.get_bytes("a/b/small.txt") == b"hello"

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.pt").write_bytes(b"1")
    (folder / "MANIFEST.json").write_text("{}")
    keys = store.upload_folder(folder, "pub", last="MANIFEST.json")
    assert keys[-1] == "pub/MANIFEST.json" and set(keys) == {"pub/sub/x.pt", "pub/MANIFEST.json"}
    store.download_folder("pub", tmp_path / "down")
    assert store.upload_folder(folder / "sub", "") == ["x.pt"] and store.get_bytes("x.pt") == b"1"  # into the root
    store.delete("x.pt")
    assert (tmp_path / "down" / "sub" / "x.pt").read_bytes() == b"1"

    store.delete("a")
    assert store.list() == ["c.txt", "pub/MANIFEST.json", "pub/sub/x.pt"]
    with pytest.raises(StorageError, match="not found"):
        store.get_bytes("a/b/small.txt")


def test_a_checkpoint_of_many_files_is_checked_in_one_listing_and_fetched_a_request_a_file(tmp_path, s3):
    """A universal checkpoint holds four files a parameter (thousands for a real model): its sizes come from one
    listing, not a request each, and a file of known size comes down in one GET, without boto3's HEAD first."""
    from distill.run_layout import CheckpointError, check_sizes

    store = s3_store(s3, f"many-{os.getpid()}")
    folder = tmp_path / "ckpt"
    for i in range(40):
        (folder / "zero" / f"w{i}").mkdir(parents=True)
        (folder / "zero" / f"w{i}" / "fp32.pt").write_bytes(bytes(i))
    store.upload_folder(folder, "step")
    records = {f"zero/w{i}/fp32.pt": {"bytes": i} for i in range(40)}
    sent = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))

    check_sizes(store, "step", records)
    assert sent == ["GET"]  # list_objects_v2
    store.download_folder("step", tmp_path / "down")
    assert sent[1:] == ["GET"] * 41  # the listing, then each file
    assert all((tmp_path / "down" / rel).stat().st_size == r["bytes"] for rel, r in records.items())
    with pytest.raises(CheckpointError, match=r"many-\d+/step/zero/w3/fp32.pt: 3 bytes, MANIFEST.json says 4"):
        check_sizes(store, "step", {**records, "zero/w3/fp32.pt": {"bytes": 4}})
    with pytest.raises(CheckpointError, match=r"step/zero/w40/fp32.pt: missing"):
        check_sizes(store, "step", {**records, "zero/w40/fp32.pt": {"bytes": 40}})


def test_wrong_credentials_are_a_clear_error_without_the_secret(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 20)
    store = s3_store(s3, **FAST)
    with pytest.raises(StorageError) as err:
        store.check()
    assert "access denied" in str(err.value) and f"s3://{s3.bucket}/store-test" in str(err.value)
    assert "not-the-secret" not in str(err.value) and s3.secret not in str(err.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")
    with pytest.raises(StorageError, match="access denied \\(InvalidAccessKeyId\\)"):
        s3_store(s3, **FAST).put_bytes(b"x", "k")


def test_missing_bucket_and_unreachable_server(s3):
    store = open_store("s3://no-such-bucket/run", StorageConfig(endpoint_url=s3.endpoint, **FAST))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        store.check()
    from s3_server import free_port

    dead = open_store("s3://any-bucket/run", StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", **FAST))
    with pytest.raises(StorageError, match="failed after 2 attempts"):
        dead.check()


def test_bad_scheme():
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_store("gs://bucket/run")


@pytest.mark.parametrize("files", [0, 12])
def test_the_transfer_bench_round_trips_a_checkpoint_in_either_layout(tmp_path, s3, files):
    from distill.bench.storage import main

    result = main(["--uri", f"s3://{s3.bucket}/bench-{files}", "--endpoint-url", s3.endpoint, "--size-gb", "0.001",
                   "--repeats", "1", "--files", str(files), "--json", str(tmp_path / "storage.json")])
    assert result["files"] == (files or 3) and result["bytes"] == int(0.001 * 2**30)  # every byte checked on the way
    assert len(result["upload_seconds"]) == len(result["download_seconds"]) == 1
    assert json.loads((tmp_path / "storage.json").read_text()) == result
