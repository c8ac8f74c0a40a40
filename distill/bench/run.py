"""`distill bench CHECKPOINT`: the inference/quality table, optionally training throughput, into a report.

The report goes to <run output>/bench/<checkpoint>/ through the run's store (or to --out).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from distill.bench.inference import BenchSpec, run_bench
from distill.bench.report import write_report
from distill.config import StorageConfig
from distill.run_layout import open_checkpoint, split_checkpoint_uri
from distill.storage import open_store
from distill.training.metrics import parse_metrics


def bench_checkpoint(checkpoint: str, spec: BenchSpec, *, out: str | None = None,
                     storage: StorageConfig | None = None, training_iterations: int = 0) -> str:
    """Benchmark one checkpoint; returns where report.md is."""
    root, name = split_checkpoint_uri(checkpoint)
    target = out or (f"{root}/bench/{name}" if root else None)
    if target is None:
        raise ValueError(f"{checkpoint}: not under <output>/checkpoints/; pass --out")
    store = open_store(target, storage)
    local = Path(store.root) if store.is_local else Path(tempfile.mkdtemp(prefix="distill-bench-"))
    rows, meta = run_bench(checkpoint, spec, local, storage)
    training = measure_training(checkpoint, training_iterations, storage) if training_iterations else None
    history = None
    if root:
        run_store = open_store(root, storage)
        if run_store.exists("metrics.jsonl"):
            history = parse_metrics(run_store.get_text("metrics.jsonl"))
    report = write_report(local, rows, meta, training, history)
    if not store.is_local:
        store.upload_folder(local, "", last="report.md")
        return store.key_uri("report.md")
    return str(report)


def measure_training(checkpoint: str, iterations: int, storage: StorageConfig | None) -> dict:
    """Throughput of the checkpoint's run config (fresh weights; speed does not depend on them)."""
    from distill.bench.training import measure, throughput_trainer

    cfg = open_checkpoint(checkpoint, storage).config
    result = measure(throughput_trainer(cfg), iterations=iterations)
    result["config"] = {"batch_size": cfg.training.batch_size, "method": cfg.method}
    return result
