"""The Prefect flows in this process, against a temporary local server (as under Prefect's test harness)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import get_client

from distill.config import ConfigError
from prefect_server import flows_in_this_process
from tiny import tiny_raw

pytestmark = pytest.mark.prefect_server  # flows against a temporary Prefect server

SIZE = {"num_frames": 5, "height": 16, "width": 16}


@pytest.fixture(scope="module", autouse=True)
def harness(flows_prefect_server):
    """A temporary server of this module's own (a new database), started after collection by conftest.py so that it
    boots while the tests before this module run; flows run in this process against it, as under
    prefect_test_harness. A job waiting for a concurrency slot (test_gpu_jobs_on_one_host_take_turns) retries within
    1 s there (tests/prefect_server.py)."""
    with flows_in_this_process(flows_prefect_server):
        yield
    flows_prefect_server.stop()


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def artifacts(key: str) -> list:
    async def read():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    return asyncio.run(read())


def tiny_pipeline(tmp: Path) -> str:
    """Shapes data and a DMD2 student of a random tiny teacher (teacher pre-training: see test_deploy)."""
    data = {**SIZE, "videos": str(tmp / "shapes"), "shards": str(tmp / "shards"), "shard_size": 8}
    student = tiny_raw(tmp / "student", data=data, training={"max_steps": 4, "checkpoint_every": 2},
                       validation={"every": 4, "seeds": [0], "prompts": ["a red circle moving left"]},
                       method_config={"generator_update_interval": 2})
    student["run"]["name"] = "flow-student"
    spec = {"shapes": {"out": str(tmp / "shapes"), "count": 8, **SIZE},
            "student": {"config": write(tmp / "student.yaml", student)},
            "bench": {"prompts": 2, "seeds": 1, "teacher_steps": 3, "training_iterations": 2}}
    return write(tmp / "pipeline.yaml", spec)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[Path, str, str]:
    """The tiny pipeline, run once for the module: its folder, its spec and the comparison it returned."""
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("pipeline")
    spec = tiny_pipeline(tmp)
    return tmp, spec, pipeline(spec)


def logs_of(flow_run_id) -> list:
    async def read():
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_pipeline_runs_end_to_end_then_reuses_its_work(pipeline_run):
    from flows.pipeline import pipeline

    tmp_path, spec, report = pipeline_run
    assert report == str(tmp_path / "student" / "bench" / "compare" / "compare.md")
    assert "# Comparison" in Path(report).read_text()
    assert (tmp_path / "student" / "bench" / "compare" / "compare.html").is_file()
    for step in ("step-000002", "step-000004"):
        assert (tmp_path / "student" / "bench" / step / "report.parquet").exists()
        assert (tmp_path / "student" / "bench" / step / "report.html").exists()
    # the frozen teacher sampled once, for the last checkpoint's report; the comparison shows it from there
    models = {step: set(pd.read_csv(tmp_path / "student" / "bench" / step / "report.csv")["model"])
              for step in ("step-000002", "step-000004")}
    assert "teacher" not in models["step-000002"] and "teacher" in models["step-000004"], models
    assert "| teacher |" in Path(report).read_text()
    throughput = {step: "## Training throughput" in (tmp_path / "student" / "bench" / step / "report.md").read_text()
                  for step in ("step-000002", "step-000004")}
    assert throughput == {"step-000002": False, "step-000004": True}  # measured once: the same run config
    # Artifacts: the validation sheet and metrics of the run, a report per checkpoint, the comparison.
    markdown = artifacts("flow-student-validation")[0].data
    assert "contact.png" in markdown and "Sampler sde" in markdown and "![contact sheet](data:image/png;base64," in markdown
    assert artifacts("flow-student-metrics")
    bench = artifacts("flow-student-bench-step-000004")[0].data  # the plots inline: the UI shows them anywhere
    assert bench.count("](data:image/png;base64,") == 3 and "](quality_vs_steps.png)" not in bench
    assert "report.html" in bench
    comparison = artifacts("flow-student-comparison")[0].data  # the wide table, regressions first, the page
    assert comparison.index("## Regressions") < comparison.index("## Side by side") and "## Deltas" not in comparison
    assert comparison.count("](data:image/png;base64,") == 1  # compare.png, the metrics per checkpoint
    assert str(tmp_path / "student" / "bench" / "compare" / "compare.html") in comparison
    # Progress bars in the UI: each job's progress artifact reached 100 %.
    for key in ("flow-student-preprocess-progress", "flow-student-train-progress",
                "flow-student-bench-progress-step-000002", "flow-student-bench-progress-step-000004"):
        found = artifacts(key)
        assert found and found[0].type == "progress" and found[0].data == 100.0, key
    # The flow log has the trainer's progress lines; the launcher's start-up noise is logged at DEBUG only.
    run_id = artifacts("flow-student-train-progress")[0].flow_run_id
    logs = [(log.level, log.message) for log in logs_of(run_id)]
    assert any(message.startswith("train 4/4 (100%)") for _, message in logs)
    assert not [m for _, m in logs if "[launch.py:" in m or "Setting accelerator to CPU" in m]

    # Same data, same configs: preprocessing is served from cache, the finished run is not trained again.
    shard_mtime = (tmp_path / "shards" / "MANIFEST.json").stat().st_mtime_ns
    state = pipeline(spec, return_state=True)
    assert state.is_completed()
    assert (tmp_path / "shards" / "MANIFEST.json").stat().st_mtime_ns == shard_mtime
    checkpoints = sorted(p.name for p in (tmp_path / "student" / "checkpoints").iterdir() if p.name.startswith("step"))
    assert checkpoints == ["step-000002", "step-000004"]


@pytest.mark.browser
def test_the_prefect_ui_shows_the_report_plots(pipeline_run, flows_prefect_server):
    """The server's own UI, in headless Chromium: the bench artifact's three plots and the comparison load."""
    from browser import assert_all_loaded, browser, screenshot, wait_until_loaded

    bench = artifacts("flow-student-bench-step-000004")[0]
    comparison = artifacts("flow-student-comparison")[0]
    ui = flows_prefect_server.api_url.removesuffix("/api")
    with browser() as engine:
        page = engine.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{ui}/artifacts/artifact/{bench.id}")
        page.get_by_text("Benchmark: step-000004").first.wait_for(timeout=60_000)
        page.wait_for_function("() => Array.from(document.images).filter(i => i.src.startsWith('data:')).length >= 3")
        state = wait_until_loaded(page)
        screenshot(page, "prefect-bench-artifact.png")
        assert len([i for i in state["images"] if i["src"].startswith("data:image/png")]) == 3
        assert_all_loaded(state)
        page.goto(f"{ui}/artifacts/artifact/{comparison.id}")
        page.get_by_text("Side by side").first.wait_for(timeout=60_000)
        page.wait_for_function("() => Array.from(document.images).some(i => i.src.startsWith('data:'))")
        state = wait_until_loaded(page)
        screenshot(page, "prefect-comparison-artifact.png")
        assert page.locator("table").count() >= 1 and state["images"]
        assert_all_loaded(state)


def test_a_changed_file_of_the_checksums_stops_the_pipeline_before_any_work(tmp_path):
    import hashlib

    from flows.pipeline import pipeline

    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"the weights as recorded")
    spec = yaml.safe_load(Path(tiny_pipeline(tmp_path)).read_text())
    spec["checksums"] = {str(weights): hashlib.sha256(weights.read_bytes()).hexdigest()}
    weights.write_bytes(b"the weights, changed")
    state = pipeline(write(tmp_path / "pipeline.yaml", spec), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=f"checksums: {weights} has SHA-256 [0-9a-f]{{64}}, not [0-9a-f]{{64}}"):
        state.result()
    assert not (tmp_path / "shapes").exists()  # no data made, nothing trained


def test_a_bad_config_fails_in_the_first_task_before_any_work(tmp_path):
    from flows.train import train_flow

    raw = tiny_raw(tmp_path / "run", method_config={"min_timestep_ratio": 0.9, "max_timestep_ratio": 0.1})
    state = train_flow(write(tmp_path / "bad.yaml", raw), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="method_config.min_timestep_ratio"):
        state.result()
    assert not (tmp_path / "run").exists()


def test_sequence_parallel_size_is_a_deployment_parameter_that_must_divide_the_ranks(tmp_path):
    """The pipeline and train flows take num_gpus and sequence_parallel_size (the GPU deployment's parameters);
    a size that does not divide the ranks fails before any work, and a valid one reaches the run's config."""
    from flows.pipeline import load_pipeline
    from flows.train import train_flow

    spec = tiny_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="sequence_parallel_size: 4 does not divide the 2 ranks of num_gpus"):
        load_pipeline(spec, num_gpus=2, sequence_parallel_size=4)
    assert load_pipeline(spec, num_gpus=4, sequence_parallel_size=2).sequence_parallel_size == 2
    assert load_pipeline(spec).sequence_parallel_size == 1  # the spec's (default) where no parameter is given
    state = train_flow(write(tmp_path / "run.yaml", tiny_raw(tmp_path / "run")), num_gpus=2, sequence_parallel_size=4,
                       return_state=True)
    with pytest.raises(ConfigError, match="sequence_parallel_size: 4 does not divide the 2 ranks"):
        state.result()
    assert not (tmp_path / "run").exists()


def test_a_failed_training_keeps_the_last_checkpoint_for_resume(tmp_path):
    from flows.train import train_flow

    raw = tiny_raw(tmp_path / "run", training={"max_steps": 4, "checkpoint_every": 2})
    config = write(tmp_path / "run.yaml", raw)
    assert train_flow(config)["checkpoints"][-1].endswith("step-000004")
    # Training again over the same output without resume is refused before launching: the task fails.
    raw["training"]["max_steps"] = 6
    write(tmp_path / "run.yaml", raw)
    state = train_flow(config, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="run.output: .* already holds a run .*--resume"):
        state.result()
    result = train_flow(config, resume=True)
    assert result["checkpoints"][-1].endswith("step-000006")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_gpu_jobs_on_one_host_take_turns():
    """Two GPU tasks on one worker host never overlap: the second waits for the host's `gpu:<host>` slot."""
    import socket
    import threading
    import time

    from flows.tasks import gpu_slot

    spans = {}
    first_inside = threading.Event()

    def job(name: str, hold: float) -> None:
        with gpu_slot():
            start = time.monotonic()
            first_inside.set()
            time.sleep(hold)
            spans[name] = (start, time.monotonic())

    first = threading.Thread(target=job, args=("first", 3.0))
    first.start()
    assert first_inside.wait(60)
    job("second", 0.0)
    first.join()
    assert spans["second"][0] >= spans["first"][1]

    async def read_limit():
        async with get_client() as client:
            return await client.read_global_concurrency_limit_by_name(f"gpu:{socket.gethostname()}")

    assert asyncio.run(read_limit()).limit == 1


def test_only_io_tasks_retry():
    from flows import tasks

    assert tasks.bench.retries == 0 and tasks.train.retries == 0 and tasks.preprocess.retries == 0
    assert all(t.retries == 3 for t in (tasks.compare, tasks.list_checkpoints, tasks.mark_latest))
