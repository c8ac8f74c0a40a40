"""`distill bench CHECKPOINT`: the inference/quality table, optionally training throughput, into a report.

The report goes to <run output>/bench/<checkpoint>/ through the run's store (or to --out); a new report
replaces an earlier one there whole.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from distill.bench.inference import BenchSpec, run_bench
from distill.bench.quality import check_metric
from distill.bench.report import is_report, write_report
from distill.config import StorageConfig
from distill.errors import InputError
from distill.outputs import check_output_folder, staged_folder
from distill.progress import Progress, ProgressCallback
from distill.run_layout import open_checkpoint, resolve_latest, split_checkpoint_uri
from distill.storage import open_store
from distill.training.metrics import parse_metrics


def bench_checkpoint(checkpoint: str, spec: BenchSpec, *, out: str | None = None,
                     storage: StorageConfig | None = None, training_iterations: int = 0,
                     progress_bar: bool = True, on_progress: ProgressCallback | None = None) -> str:
    """Benchmark one checkpoint; returns where report.md is. Progress counts rows (a bar on a terminal, else a
    line per row); `on_progress(rows done, rows)` hears each.

    The checkpoint and the report folder are checked before any model is built. The report is made
    aside and then replaces an earlier report there whole (a folder holding anything else is refused)."""
    for metric in spec.metrics:
        check_metric(metric)
    checkpoint = resolve_latest(checkpoint, storage)
    open_checkpoint(checkpoint, storage)  # complete, of this layout, its config valid
    root, name = split_checkpoint_uri(checkpoint)
    target = out or (f"{root}/bench/{name}" if root else None)
    if target is None:
        raise InputError(f"{checkpoint}: not under <output>/checkpoints/, so the report has no default place; "
                         f"pass --out")
    store = open_store(target, storage)

    def bench_into(local: Path) -> Path:
        progress = Progress("bench", int(training_iterations > 0), unit="row", bar=progress_bar, on_update=on_progress)
        rows, meta = run_bench(checkpoint, spec, local, storage, progress)
        training = None
        if training_iterations:
            training = measure_training(checkpoint, training_iterations, storage)
            progress.update(1, note=f"training throughput: {training_iterations} iterations")
        progress.close()
        return write_report(local, rows, meta, training, run_history(root, storage))

    if store.is_local:
        check_output_folder(store.root, what="report folder", how="empty it", replaceable=is_report)
        with staged_folder(store.root) as local:
            bench_into(local)
        return str(Path(store.root) / "report.md")
    if store.list() and not store.exists("report.md"):
        raise InputError(f"{store.uri}: the report folder holds files that are not a report; choose another --out")
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        bench_into(Path(tmp))
        published = set(store.upload_folder(Path(tmp), "", last="report.md"))
    for stale in sorted(set(store.list()) - published):  # files of an earlier report that this one has not
        store.delete(stale)
    return store.key_uri("report.md")


def run_history(root: str, storage: StorageConfig | None) -> list[dict] | None:
    """The run's metrics.jsonl rows (training curves of the report), when the run folder is known."""
    if not root:
        return None
    run_store = open_store(root, storage)
    if not run_store.exists("metrics.jsonl"):
        return None
    return parse_metrics(run_store.get_text("metrics.jsonl"))


def measure_training(checkpoint: str, iterations: int, storage: StorageConfig | None) -> dict:
    """Throughput of the checkpoint's run config (fresh weights; speed does not depend on them)."""
    from distill.bench.training import measure, throughput_trainer

    cfg = open_checkpoint(checkpoint, storage).config
    result = measure(throughput_trainer(cfg), iterations=iterations)
    result["config"] = {"batch_size": cfg.training.batch_size, "method": cfg.method}
    return result
