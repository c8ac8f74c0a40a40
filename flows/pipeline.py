"""The pipeline: shapes data (optional) → preprocess → teacher pre-training (optional) → DMD2
distillation → benchmark of every saved student checkpoint → comparison report.

    python -m flows.pipeline configs/demo/pipeline.yaml      # embedded: Prefect's temporary local server

Every run config is checked first, so a bad config fails before any data or training work.
Preprocessing and finished training runs are cached on their inputs: re-running with the
same data and configs redoes nothing and only re-reports.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger

from distill.config import ConfigError, build_section, load_config, read_config_file
from distill.strict import positive
from distill.storage import open_store, sha256_of
from flows.credentials import load_storage_credentials
from flows.tasks import (bench, cached, check_config, check_ranks, compare, list_checkpoints, make_shapes, mark_latest, preprocess,
                         shards_missing, train)


@dataclass(kw_only=True)
class ShapesStage:
    out: str
    """Folder of the shapes-world data set (videos/ and captions.csv)."""
    count: int = 300
    """Videos (at least 1)."""
    num_frames: int = 5
    """Frames per video."""
    height: int = 32
    """Height in pixels."""
    width: int = 32
    """Width in pixels."""
    seed: int = 0
    """Seed of the world."""

    def validate(self, path: str) -> None:
        """The world's own rules (frames, size), checked with the pipeline spec rather than after the first stages."""
        from distill.data.shapes import ShapesWorldConfig

        positive(self, path, "count")
        try:
            ShapesWorldConfig(num_frames=self.num_frames, height=self.height, width=self.width, seed=self.seed)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None


@dataclass(kw_only=True)
class RunStage:
    config: str
    """A run config (YAML)."""
    overrides: list[str] = field(default_factory=list)
    """`key.path=value` overrides."""


@dataclass(kw_only=True)
class BenchStage:
    prompts: int = 8
    """Prompts per benchmark."""
    seeds: int = 2
    """Videos per prompt."""
    teacher_steps: int = 50
    """Steps of the reference teacher (with CFG)."""
    training_iterations: int = 4
    """Iterations of the training-throughput measurement (0 = skip), in the last checkpoint's report."""

    def validate(self, path: str) -> None:
        positive(self, path, "prompts", "seeds", "teacher_steps")
        if self.training_iterations < 0:
            raise ConfigError(f"{path}.training_iterations: must be >= 0, got {self.training_iterations}")


@dataclass(kw_only=True)
class PipelineConfig:
    shapes: ShapesStage | None = None
    """Make a shapes-world data set first (the embedded demo); unset when the run configs name real data."""
    teacher: RunStage | None = None
    """Pre-train the teacher with flow matching first; unset when the student's teacher already exists."""
    student: RunStage
    """The DMD2 distillation run."""
    bench: BenchStage = field(default_factory=BenchStage)
    """Benchmark settings."""
    num_gpus: int = 0
    """Ranks per training run (0 = one, on the CPU or one GPU)."""
    sequence_parallel_size: int = 1
    """Ranks that split each video's tokens in the training runs (their parallel.sequence_parallel_size); it must
    divide the ranks."""
    report: str | None = None
    """Where the comparison goes; unset = <student output>/bench/compare."""
    checksums: dict[str, str] = field(default_factory=dict)
    """Files the run depends on (a committed teacher's weights) and their SHA-256: one missing or changed stops
    the pipeline before any work."""
    retrain: bool = False
    """Scheduled retraining: each run writes the student to <student output>/<run time> and starts from
    the last successful one (named by <student output>/LATEST), on the current data."""


    def validate(self, path: str) -> None:
        positive(self, path, "sequence_parallel_size")
        check_ranks(self.num_gpus, self.sequence_parallel_size)


def load_pipeline(path: str, **parameters) -> PipelineConfig:
    """The spec, with a deployment's parameters (num_gpus, sequence_parallel_size) over its keys where given."""
    raw = read_config_file(path)
    raw.update({k: v for k, v in parameters.items() if v is not None})
    return build_section(PipelineConfig, raw, "")


@flow(name="pipeline")
def pipeline(spec: str = "configs/demo/pipeline.yaml", num_gpus: int | None = None,
             sequence_parallel_size: int | None = None) -> str:
    """Run the whole chain; returns where the comparison report is. num_gpus and sequence_parallel_size, when
    given, replace the spec's."""
    logger = get_run_logger()
    load_storage_credentials()
    p = load_pipeline(spec, num_gpus=num_gpus, sequence_parallel_size=sequence_parallel_size)
    stages = [s for s in (p.teacher, p.student) if s is not None]
    if p.sequence_parallel_size > 1:  # the training runs split their videos' tokens
        for stage in stages:
            stage.overrides = [*stage.overrides, f"parallel.sequence_parallel_size={p.sequence_parallel_size}"]
    verify_checksums(p.checksums)  # 1. the files and every config, before any work
    for stage in stages:
        check_config(stage.config, stage.overrides)
    if p.shapes is not None:  # 2. data
        s = p.shapes
        missing = not Path(s.out, "captions.csv").is_file()
        cached(make_shapes, missing)(s.out, s.count, s.num_frames, s.height, s.width, s.seed)
    base = load_config(p.student.config, p.student.overrides)
    if p.retrain:
        p.student.overrides = [*p.student.overrides, *retrain_overrides(base)]
    for stage in stages:  # 3. preprocess and train, the teacher first
        cached(preprocess, shards_missing(stage.config, stage.overrides))(stage.config, stage.overrides)
        train(stage.config, stage.overrides, p.num_gpus, resume=None)  # a crashed earlier attempt resumes
    student = load_config(p.student.config, p.student.overrides)
    storage = {k: v for k, v in vars(student.storage).items() if v is not None}
    root = student.run.output.rstrip("/")
    b = p.bench
    checkpoints = list_checkpoints(root, storage)  # 4. every saved checkpoint; what is the same in each, the
    # frozen teacher's rows (one run, prompts and seeds) and the training throughput (the run's config, fresh
    # weights), in the last one's report alone, where the comparison finds them
    reports = [bench(c, b.prompts, b.seeds, b.teacher_steps, b.training_iterations if c == checkpoints[-1] else 0,
                     storage, teacher_rows=c == checkpoints[-1]) for c in checkpoints]
    report = compare(reports, p.report or f"{root}/bench/compare", storage)  # 5. side by side
    if p.retrain:
        mark_latest(base.run.output, root.rsplit("/", 1)[1], storage)
    logger.info(f"comparison report: {report}; the videos side by side: {page_of(report)}")
    for r in reports:
        logger.info(f"benchmark report: {r}/report.md ({r}/report.html)")
    return report


def page_of(report: str) -> str:
    """compare.html beside compare.md."""
    return report.rsplit("/", 1)[0] + "/compare.html"


def verify_checksums(checksums: dict[str, str]) -> None:
    for path, expected in checksums.items():
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"checksums: {path} is missing (the pipeline depends on it)")
        digest = sha256_of(file)
        if digest != expected.lower():
            raise ConfigError(f"checksums: {path} has SHA-256 {digest}, not {expected}: it changed since it was "
                              f"recorded; restore it (git checkout) or record the new one")


def retrain_overrides(base) -> list[str]:
    """A fresh output named by the run's scheduled time; the last student's weights, when there is one."""
    from prefect.runtime import flow_run

    when = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    root = base.run.output.rstrip("/")
    out = [f"run.output={root}/{when.strftime('%Y%m%d-%H%M%S')}"]
    store = open_store(root, base.storage)
    if store.exists("LATEST"):
        out.append(f"roles.student.init_from={root}/{store.get_text('LATEST').strip()}/checkpoints/latest")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the distillation pipeline (Prefect flow).")
    parser.add_argument("spec", nargs="?", default="configs/demo/pipeline.yaml")
    args = parser.parse_args()
    report = pipeline(args.spec)
    print(f"\nPipeline finished. Comparison report: {report}\nOpen in a browser: {page_of(report)}")


if __name__ == "__main__":
    main()
