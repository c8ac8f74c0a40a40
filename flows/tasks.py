"""Prefect tasks over the distill library. Thin: check inputs, call distill, move artifacts.

GPU work (preprocess, train under the deepspeed launcher, bench) holds the worker host's
`gpu:<host>` concurrency slot, so two GPU jobs never share a host's GPUs by accident. Only
I/O tasks retry, with explicit delays; preprocessing is cached on its inputs (the data, the
model section, and whether the shards it made are still there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from prefect import get_client, get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from distill.config import Config, ConfigError, StorageConfig, load_config, to_dict
from distill.errors import InputError
from distill.run_layout import checkpoint_name, checkpoint_uris, latest_checkpoint, open_checkpoint
from distill.storage import StorageError, open_store
from distill.training.run_folder import refuse_leftovers
from flows.artifacts import artifact_key, publish_comparison, publish_report, publish_validations
from flows.progress import follow_progress, launcher_noise, progress_reporter


def retry_on_io(task, task_run, state) -> bool:
    """Retry what may pass (a store unreachable, the network); never bad input (config, checkpoint, report)."""
    try:
        state.result()
    except StorageError as err:
        return err.transient
    except InputError:
        return False
    except Exception:
        return True
    return False


STORAGE_RETRIES = dict(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_on_io)
GPU_JOBS_PER_HOST = 1
GPU_LEASE_SECONDS = 60
VALIDATION_POLL_SECONDS = 5


@contextlib.contextmanager
def gpu_slot():
    """Hold this host's GPU slot (a global concurrency limit `gpu:<host>`, made on first use) for the block."""
    name = f"gpu:{socket.gethostname()}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # the first GPU job on this host makes the limit
            client.upsert_global_concurrency_limit_by_name(name, GPU_JOBS_PER_HOST)
    # The lease is renewed while the job lives; a job killed outright frees the slot when it lapses (60 s,
    # the server's shortest), not after Prefect's default 300 s.
    with concurrency(name, occupy=1, strict=True, lease_duration=GPU_LEASE_SECONDS):
        yield

# Cached tasks are keyed on their inputs; a caller passes refresh_cache=True (see `cached`) when the
# output they made is gone, so a deleted output is made again rather than served from cache.


def cached(task_, output_missing: bool):
    return task_.with_options(refresh_cache=True) if output_missing else task_


@task(name="check-config")
def check_config(config: str, overrides: list[str]) -> dict:
    """Load and check the run config: a bad config fails here, before any data or training work."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        get_run_logger().error(f"config error: {err}")
        raise
    return to_dict(cfg)


def _data_fingerprint(context, parameters: dict) -> str:
    """Cache key of preprocessing: the data and model sections and the captions table's bytes."""
    cfg = load_config(parameters["config"], parameters["overrides"])
    d = cfg.data
    h = hashlib.sha256(json.dumps([to_dict(cfg.model), to_dict(d)], sort_keys=True).encode())
    if d.videos:
        table = Path(d.videos) / d.captions_file
        h.update(table.read_bytes() if table.is_file() else b"missing")
    return h.hexdigest()


def shards_missing(config: str, overrides: list[str]) -> bool:
    cfg = load_config(config, overrides)
    return not open_store(cfg.data.shards, cfg.storage).exists("MANIFEST.json")


@task(name="preprocess", cache_key_fn=_data_fingerprint, persist_result=True, log_prints=True)
def preprocess(config: str, overrides: list[str]) -> str:
    from distill.data.preprocess import preprocess as run_preprocess

    cfg = load_config(config, overrides)
    report = progress_reporter(artifact_key(cfg.run.name, "preprocess-progress"), f"preprocessing {cfg.data.shards}")
    with gpu_slot():
        manifest = run_preprocess(cfg, progress=False, on_progress=report)
    get_run_logger().info(f"shards ready: {manifest}")
    return manifest


@task(name="make-shapes-dataset", cache_key_fn=lambda ctx, p: json.dumps(p, sort_keys=True), persist_result=True)
def make_shapes(out: str, count: int, num_frames: int, height: int, width: int, seed: int) -> str:
    """The shapes data set at `out`; one made earlier (other settings, or its cached result gone) is replaced,
    any other non-empty folder is refused."""
    from distill.data.shapes import ShapesWorldConfig, is_shapes_dataset, write_dataset

    write_dataset(out, count, ShapesWorldConfig(num_frames=num_frames, height=height, width=width, seed=seed),
                  overwrite=is_shapes_dataset(out))
    return out


def check_ranks(num_gpus: int, sequence_parallel_size: int) -> None:
    """The training runs' ranks (num_gpus; 0 = one) split into sequence-parallel groups of this size."""
    ranks = max(1, num_gpus)
    if sequence_parallel_size < 1 or ranks % sequence_parallel_size:
        raise ConfigError(f"sequence_parallel_size: {sequence_parallel_size} does not divide the {ranks} ranks of "
                          f"num_gpus")


def launcher_command(config: str, overrides: list[str], num_gpus: int, resume: bool,
                     overwrite: bool = False) -> list[str]:
    """The deepspeed launcher over the `distill` console script, one rank per GPU (one on CPU)."""
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    distill = shutil.which("distill", path=os.path.dirname(sys.executable)) or "distill"
    from distill.training.distributed import free_port

    cmd = [launcher, "--num_gpus", str(max(1, num_gpus)), "--master_port", str(free_port()), distill, "train", config]
    for item in overrides:
        cmd += ["--set", item]
    if resume:
        cmd.append("--resume")
    elif overwrite:
        cmd.append("--overwrite")
    return cmd


@task(name="train")
def train(config: str, overrides: list[str], num_gpus: int = 0, resume: bool | None = False) -> dict:
    """Run training under the deepspeed launcher; stream its log; publish each validation as an artifact.

    A run that already finished with this very config is not trained again. `resume`: True continues
    from the newest checkpoint, False refuses an output that holds anything, None: see `start_flags`.
    """
    logger = get_run_logger()
    cfg = load_config(config, overrides)
    store = open_store(cfg.run.output, cfg.storage)
    latest = latest_checkpoint(store)
    if latest == checkpoint_name(cfg.training.max_steps):
        saved = yaml.safe_load(store.get_text(f"checkpoints/{latest}/config.yaml"))
        if saved == to_dict(cfg):
            logger.info(f"{cfg.run.output} finished with this config already ({latest}); not training again")
            return {"output": cfg.run.output, "checkpoints": checkpoint_uris(cfg.run.output, cfg.storage)}
    launched = [*overrides, "training.progress_bar=false"]
    resume, overwrite = start_flags(store, load_config(config, launched), resume)
    if not resume and not overwrite:  # refused here, before the launcher and its ranks start, as the ranks would
        refuse_leftovers(store, Path(cfg.storage.local_dir) if cfg.storage.local_dir else None)
    cmd = launcher_command(config, launched, num_gpus, resume, overwrite)
    logger.info("launching: " + " ".join(cmd))
    published: set[str] = set()
    report = progress_reporter(artifact_key(cfg.run.name, "train-progress"), f"training {cfg.run.output}")
    # The launcher sets each rank's RANK / MASTER_* itself; none leak in from this process.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    with gpu_slot():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**env, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        next_check = 0.0
        while (line := _next_line(lines)) is not None:  # a validation is published within seconds, log or not
            if line and "\r" not in line:
                follow_progress(line, "train", report)
                (logger.debug if launcher_noise(line) else logger.info)(line)
            if time.monotonic() >= next_check:
                publish_validations(cfg, store, published)
                next_check = time.monotonic() + VALIDATION_POLL_SECONDS
        code = proc.wait()
    publish_validations(cfg, store, published)
    if code != 0:
        raise RuntimeError(f"training exited with code {code}; the newest complete checkpoint stays resumable "
                           f"(run again with resume=True)")
    return {"output": cfg.run.output, "checkpoints": checkpoint_uris(cfg.run.output, cfg.storage)}


def _pump(stream, lines: queue.Queue) -> None:
    """The launcher's output, line by line, then None at its end."""
    for line in stream:
        lines.put(line.rstrip())
    lines.put(None)


def _next_line(lines: queue.Queue) -> str | None:
    """The next line of output; "" when none came within a second (the caller polls between lines)."""
    try:
        return lines.get(timeout=1.0)
    except queue.Empty:
        return ""


def start_flags(store, cfg: Config, resume: bool | None) -> tuple[bool, bool]:
    """(--resume, --overwrite) of a training launch into `store`, the run's output, for the config as launched.

    None (automation) resumes from a checkpoint when there is one; without one, it starts over only where
    an attempt of this very config died before its first checkpoint, so another run's files stay refused.
    """
    if resume is not None:
        return resume, False
    if latest_checkpoint(store) is not None:
        return True, False
    return False, store.exists("config.yaml") and yaml.safe_load(store.get_text("config.yaml")) == to_dict(cfg)


@task(name="check-checkpoints")
def check_checkpoints(checkpoints: list[str], storage: dict | None = None) -> list[str]:
    """Each checkpoint complete, `.../checkpoints/latest` as the one it names: a bad one fails here, before
    any benchmark."""
    cfg = StorageConfig(**(storage or {}))
    try:
        return [open_checkpoint(c, cfg).uri for c in checkpoints]
    except InputError as err:
        get_run_logger().error(f"checkpoint error: {err}")
        raise


@task(name="bench-checkpoint", log_prints=True)
def bench(checkpoint: str, prompts: int, seeds: int, teacher_steps: int, training_iterations: int,
          storage: dict | None = None, teacher_rows: bool = True) -> str:
    """Benchmark one checkpoint (compute-heavy: no retries); publish its report.md as an artifact. Without
    `teacher_rows`, a sibling report (same run, prompts and seeds) has the teacher's."""
    from distill.bench.inference import BenchSpec
    from distill.bench.run import bench_checkpoint

    spec = BenchSpec(prompts=prompts, seeds=seeds, teacher_steps=teacher_steps, teacher_rows=teacher_rows)
    cfg = StorageConfig(**(storage or {}))
    ckpt = open_checkpoint(checkpoint, cfg)
    progress = progress_reporter(artifact_key(ckpt.config.run.name, "bench-progress", ckpt.name),
                                 f"benchmark of {ckpt.uri}")
    with gpu_slot():
        report = bench_checkpoint(checkpoint, spec, storage=cfg, training_iterations=training_iterations,
                                  progress_bar=False, on_progress=progress)
    store = open_store(report.rsplit("/", 1)[0], cfg)
    meta = json.loads(store.get_text("meta.json"))
    publish_report(meta["run"], meta["name"], store.get_text("report.md"), checkpoint, store.get_bytes,
                   store.key_uri("report.html"))
    return report.rsplit("/", 1)[0]


@task(name="compare-reports", **STORAGE_RETRIES)
def compare(reports: list[str], out: str, storage: dict | None = None) -> str:
    """Side by side, with deltas and regressions; reports may live in any store."""
    import tempfile

    from distill.bench.compare import compare as compare_reports

    cfg = StorageConfig(**(storage or {}))
    local, runs = [], []
    for report in reports:  # what the comparison reads: the table, the meta (with the previews' index), the previews
        store = open_store(report, cfg)
        folder = Path(tempfile.mkdtemp(prefix="distill-report-"))
        local.append(store.get_file("report.parquet", folder / "report.parquet").parent)
        run = None
        if store.exists("meta.json"):
            run = json.loads(store.get_file("meta.json", folder / "meta.json").read_text()).get("run")
            if store.list("web/"):  # reports made before report.html have none
                store.download_folder("web/", folder / "web")
        runs.append(run)
    out_store = open_store(out, cfg)
    work = Path(out_store.root) if out_store.is_local else Path(tempfile.mkdtemp(prefix="distill-compare-"))
    _, markdown = compare_reports(local, work)
    if not out_store.is_local:
        out_store.upload_folder(work, "", last="compare.md")
    publish_comparison(runs[0] or "reports", markdown, out_store.key_uri("compare.html"),
                       lambda name: (work / name).read_bytes())
    return out_store.key_uri("compare.md")


@task(name="list-checkpoints", **STORAGE_RETRIES)
def list_checkpoints(output: str, storage: dict | None = None) -> list[str]:
    """URIs of a run's complete checkpoints, oldest first."""
    return checkpoint_uris(output, StorageConfig(**(storage or {})))


@task(name="mark-latest", **STORAGE_RETRIES)
def mark_latest(root: str, run: str, storage: dict | None = None) -> str:
    """Name `run` in `<root>/LATEST`: the student that the next scheduled retraining starts from."""
    store = open_store(root, StorageConfig(**(storage or {})))
    store.put_text(run, "LATEST")
    return store.key_uri("LATEST")
