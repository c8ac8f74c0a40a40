"""A real Prefect server and process worker on loopback, deployments from deploy/prefect.yaml."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tiny import tiny_raw

pytestmark = pytest.mark.prefect_server  # a real Prefect server and process worker

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZE = {"num_frames": 5, "height": 16, "width": 16}
README = (ROOT / "deploy" / "README.md").read_text()
PROCESS_DEPLOYMENTS = {"pipeline", "preprocess", "train", "bench", "compare"}
# A worker asks the server for scheduled runs every 10 s by default; every second here (it only decides how soon a
# run starts, not what happens). The server's own polling: tests/prefect_server.py.
WORKER_POLLING = {"PREFECT_WORKER_QUERY_SECONDS": "1"}


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(prefect_server_process):
    """`prefect server start` on a free port, with its own home (database); stopped at the end. It was started after
    collection (conftest.py), so it boots while the tests before this module run."""
    home = prefect_server_process.home
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=prefect_server_process.api_url, PREFECT_LOGGING_LEVEL="WARNING")
    prefect(env, *as_written("prefect server status --wait --timeout 120"))  # as deploy/README.md waits for it
    yield env
    prefect_server_process.stop()


def prefect(env: dict, *args: str, ok: bool = True) -> str:
    """The prefect CLI from the repository root; its output. ok=False: it must fail (output and errors)."""
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout if ok else proc.stdout + proc.stderr


def as_written(command: str) -> list[str]:
    """The arguments after `prefect` of a command in deploy/README.md (the test follows the README literally)."""
    assert command in README, f"deploy/README.md no longer says: {command}"
    words = shlex.split(command)
    return words[words.index("prefect") + 1 :]


@contextlib.contextmanager
def process_worker(env: dict, pool: str, cwd: Path, logs: Path):
    """`prefect worker start --pool POOL` in `cwd`, its log in `logs`, until the block ends."""
    log = open(logs / "worker.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool], env={**env, **WORKER_POLLING},
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield logs / "worker.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # a worker ignores a lone SIGTERM while it runs: follow with SIGINT
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def save_secrets(env: dict, values: dict[str, str]) -> None:
    """Secret blocks, saved as deploy/README.md saves them."""
    assert 'Secret(value="...").save("distill-aws-secret-access-key", overwrite=True)' in README
    code = "from prefect.blocks.system import Secret\n" + "".join(
        f"Secret(value={v!r}).save({k!r}, overwrite=True)\n" for k, v in values.items())
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A checkout for the worker's DISTILL_HOME: the repository's code and configs, its own runs/."""
    home = tmp_path_factory.mktemp("checkout")
    for name in ("flows", "distill", "configs", "pyproject.toml"):
        (home / name).symlink_to(ROOT / name)
    return home


@pytest.fixture(scope="module")
def worker(server, tmp_path_factory, s3_server, checkout):
    """The process set-up of deploy/README.md, as written: storage credentials in Secret blocks, the pool, every
    process deployment, a worker run from the checkout with DISTILL_HOME=$PWD (and no AWS keys of its own)."""
    save_secrets(server, {"distill-aws-access-key-id": s3_server.key_id,
                          "distill-aws-secret-access-key": s3_server.secret})
    prefect(server, *as_written("prefect work-pool create distill-process --type process"))
    prefect(server, *as_written("prefect deploy --prefect-file deploy/prefect.yaml --all"))
    assert "DISTILL_HOME=$PWD prefect worker start --pool distill-process" in README
    env = {k: v for k, v in server.items() if not k.startswith("AWS_")}
    env.update(DISTILL_HOME=str(checkout), OMP_NUM_THREADS="1", AWS_DEFAULT_REGION="us-east-1")  # $PWD
    with process_worker(env, "distill-process", checkout, tmp_path_factory.mktemp("worker")) as log:
        yield server, log


def run(env: dict, deployment: str, parameters: dict) -> str:
    args = ["deployment", "run", deployment]
    for key, value in parameters.items():
        args += ["--param", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    out = prefect(env, *args)
    return next(line.split("UUID:", 1)[1].strip() for line in out.splitlines() if "UUID:" in line)


def flow_run(env: dict, run_id: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/flow_runs/{run_id}") as r:
        return json.loads(r.read())


def task_names(runs: list[dict]) -> list[str]:
    """Task names without the run suffix Prefect adds (train-3e4 -> train)."""
    return [t["name"].rsplit("-", 1)[0] for t in runs]


def api(env: dict, path: str, body: dict) -> list[dict]:
    """POST a filter to the server's REST API."""
    import urllib.request

    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def task_runs(env: dict, run_id: str) -> list[dict]:
    return api(env, "task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})


def logs(env: dict, run_id: str) -> str:
    return "\n".join(r["message"] for r in api(env, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}}))


def artifacts(env: dict, run_id: str) -> list[dict]:
    return api(env, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})


def finished(env: dict, run_id: str, timeout: float = 600) -> dict:
    terminal = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    return wait_for(lambda: (lambda fr: fr if fr["state_type"] in terminal else None)(flow_run(env, run_id)),
                    timeout, f"flow run {run_id}", every=0.5)


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def pipeline_run(worker, s3_server, tmp_path_factory):
    """One run of the `pipeline` deployment over S3: shapes, a tiny teacher, a DMD2 student, benches, comparison."""
    env, log = worker
    tmp_path = tmp_path_factory.mktemp("pipeline")
    bucket = f"s3://{s3_server.bucket}/deploy-{os.getpid()}"
    storage = {"endpoint_url": s3_server.endpoint, "retries": 2, "backoff_seconds": 0.1}
    data = {**SIZE, "videos": str(tmp_path / "shapes"), "shards": f"{bucket}/shards", "shard_size": 8}
    teacher = tiny_raw(f"{bucket}/teacher", method="flow_matching", data=data, storage=storage,
                       training={"max_steps": 4, "checkpoint_every": 4},
                       validation={"every": 4, "seeds": [0], "prompts": ["a red circle moving left"]})
    teacher["roles"] = {"teacher": {"trainable": True}}
    teacher["method_config"]["role"] = "teacher"
    student = tiny_raw(f"{bucket}/student", data=data, storage=storage,
                       training={"max_steps": 4, "checkpoint_every": 2}, method_config={"generator_update_interval": 2})
    student["roles"]["teacher"]["init_from"] = f"{bucket}/teacher/checkpoints/latest"
    teacher["run"]["name"], student["run"]["name"] = "deploy-teacher", "deploy-student"
    spec = write(tmp_path / "pipeline.yaml", {
        "shapes": {"out": str(tmp_path / "shapes"), "count": 10, **SIZE},
        "teacher": {"config": write(tmp_path / "teacher.yaml", teacher)},
        "student": {"config": write(tmp_path / "student.yaml", student)},
        "bench": {"prompts": 2, "seeds": 1, "teacher_steps": 3, "training_iterations": 0}})
    run_id = run(env, "pipeline/pipeline", {"spec": spec})
    return SimpleNamespace(env=env, log=log, id=run_id, state=finished(env, run_id), bucket=bucket, storage=storage)


def test_deployed_pipeline_completes_with_artifacts_in_s3(pipeline_run, s3_server):
    env, run_id, bucket, state = pipeline_run.env, pipeline_run.id, pipeline_run.bucket, pipeline_run.state
    assert state["state_type"] == "COMPLETED", pipeline_run.log.read_text()[-4000:]

    client = s3_server.client()
    prefix = bucket.split("/", 3)[3]
    keys = {o["Key"][len(prefix) + 1 :] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=s3_server.bucket, Prefix=prefix) for o in page.get("Contents", [])}
    for key in ("shards/MANIFEST.json", "teacher/checkpoints/latest", "teacher/validation/step-000004/contact.png",
                "student/checkpoints/step-000002/MANIFEST.json", "student/checkpoints/step-000004/MANIFEST.json",
                "student/bench/step-000004/report.parquet", "student/bench/step-000004/report.md",
                "student/bench/compare/compare.md", "student/bench/compare/compare.html", "student/metrics.jsonl"):
        assert key in keys, key
    assert any(k.startswith("student/bench/compare/web/") and k.endswith(".mp4") for k in keys)  # the page's videos
    names = task_names(task_runs(env, run_id))
    assert names.count("train") == 2 and names.count("bench-checkpoint") == 2 and "compare-reports" in names


def test_artifacts_are_keyed_by_run_name_with_rounded_floats(pipeline_run):
    """Two runs never share a key: each starts with the run config's name (deploy-teacher, deploy-student)."""
    made = {a["key"]: a for a in artifacts(pipeline_run.env, pipeline_run.id)}
    assert {"deploy-teacher-validation", "deploy-teacher-metrics", "deploy-student-bench-step-000002",
            "deploy-student-bench-step-000004", "deploy-student-comparison"} <= set(made)
    assert all(k.startswith(("deploy-teacher-", "deploy-student-")) for k in made), sorted(made)
    table = json.loads(made["deploy-teacher-metrics"]["data"])
    assert table and all(v == float(f"{v:.4g}") for row in table for v in row.values() if isinstance(v, float))


def test_the_small_spec_completes_as_the_readme_says_with_outputs_under_distill_home(worker, checkout):
    env, log = worker
    out = prefect(env, *as_written("prefect deployment run 'pipeline/pipeline' --param "
                                   "spec=configs/small/pipeline.yaml --watch"))
    assert "Flow run finished successfully in 'Completed'" in out, out + log.read_text()[-4000:]
    assert "# Comparison" in (checkout / "runs/small/student/bench/compare/compare.md").read_text()
    assert "$DISTILL_HOME/runs/small/student/bench/compare/compare.md" in README


def test_no_secret_is_stored_in_deployments_runs_logs_or_artifacts(pipeline_run, docker_pool, s3_server):
    """The S3 pipeline ran on a worker with no AWS keys of its own: its flows read the Secret blocks at run time.
    Nothing the server keeps (every deployment, flow run, task run, log and artifact) holds a credential."""
    env = pipeline_run.env
    assert pipeline_run.state["state_type"] == "COMPLETED", pipeline_run.log.read_text()[-4000:]
    prefect({**env, "DISTILL_IMAGE": IMAGE}, *as_written(GPU_DEPLOY))
    kept = {"deployments": api(env, "deployments/filter", {}), "flow_runs": api(env, "flow_runs/filter", {}),
            "task_runs": api(env, "task_runs/filter", {}), "artifacts": api(env, "artifacts/filter", {})}
    kept["logs"] = []
    while page := api(env, "logs/filter", {"offset": len(kept["logs"]), "limit": 200}):
        kept["logs"] += page
    assert kept["deployments"] and kept["flow_runs"] and kept["logs"] and kept["artifacts"]
    assert "storage credentials from the Secret blocks" in logs(env, pipeline_run.id)
    text = json.dumps(kept)
    for secret in (s3_server.secret, s3_server.key_id):
        assert secret not in text


def test_bench_follows_latest_and_bad_input_fails_once_naming_its_cause(pipeline_run, tmp_path):
    """`checkpoints/latest` is benchmarked as the checkpoint it names; an empty or wrong parameter fails at once."""
    env, bucket, storage = pipeline_run.env, pipeline_run.bucket, pipeline_run.storage
    small = {"prompts": 2, "seeds": 1, "teacher_steps": 3, "storage": storage}
    bench_id = run(env, "bench/bench", {"checkpoints": [f"{bucket}/student/checkpoints/latest"], **small})
    missing = run(env, "bench/bench", {"checkpoints": [f"{bucket}/student/checkpoints/step-000003"], **small})
    no_report = run(env, "compare/compare", {"reports": [f"{bucket}/student/bench/none"],
                                             "out": str(tmp_path / "compare"), "storage": storage})
    refused = prefect(env, "deployment", "run", "compare/compare", "--param", "reports=[]", ok=False)
    assert "reports" in refused and "should be non-empty" in refused, refused

    state = finished(env, bench_id)
    assert state["state_type"] == "COMPLETED", state["state"]["message"]
    assert sorted(a["key"] for a in artifacts(env, bench_id)) == ["deploy-student-bench-progress-step-000004",
                                                                  "deploy-student-bench-step-000004"]
    for run_id, task, cause in ((missing, "check-checkpoints", "step-000003"),
                                (no_report, "compare-reports", "bench/none/report.parquet: not found")):
        state = finished(env, run_id)
        assert state["state_type"] == "FAILED" and cause in state["state"]["message"], state["state"]
        tasks = task_runs(env, run_id)
        assert task_names(tasks) == [task] and tasks[0]["run_count"] == 1  # not retried: it cannot change


def flow_run_processes(run_id: str) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def killed_run(worker, tmp_path_factory):
    """A `train` run killed outright (the job and its ranks) after its first checkpoint, then resumed.

    The resume is only submitted here: it first waits (about a minute) for the GPU slot that the killed job held
    until that lease lapses. The tests after test_a_job_killed_mid_run_is_crashed_and_keeps_its_checkpoint take
    no GPU slot and run meanwhile; test_a_killed_job_resumes_from_its_checkpoint, last but one in this module,
    waits for the resume. (One test before this split: the same steps, the same checks.)"""
    env, _ = worker
    tmp_path = tmp_path_factory.mktemp("kill-resume")
    out = tmp_path / "run"
    raw = tiny_raw(out, training={"max_steps": 400, "checkpoint_every": 10, "log_every": 10},
                   data={"num_frames": 3, "height": 16, "width": 16},
                   validation={"every": 10, "seeds": [0], "prompts": ["a red circle moving left"]})
    raw["run"]["name"] = "kill-resume"
    config = write(tmp_path / "run.yaml", raw)
    run_id = run(env, "train/train", {"config": config})
    wait_for(lambda: (out / "checkpoints" / "latest").exists(), 300, "a first checkpoint")
    # Training prints nothing between its first and last step: its validations are published all the same.
    made = wait_for(lambda: {a["key"]: a for a in artifacts(env, run_id)}.get("kill-resume-metrics"), 60,
                    "the first validation's artifacts")
    assert flow_run(env, run_id)["state_type"] == "RUNNING"
    step = made["description"].rsplit(" ", 1)[1]  # "kill-resume metrics up to step-000010"
    assert max(row["step"] for row in json.loads(made["data"])) <= int(step.split("-")[1])
    for pid in flow_run_processes(run_id):  # the job and everything it started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["pkill", "-9", "-f", str(config)], check=False)  # the launcher's training ranks
    killed = finished(env, run_id, timeout=120)
    latest = (out / "checkpoints" / "latest").read_text()
    complete = (out / "checkpoints" / latest / "MANIFEST.json").exists()

    raw["training"]["max_steps"] = int(latest.split("-")[1]) + 10
    write(tmp_path / "run.yaml", raw)
    resumed = run(env, "train/train", {"config": config, "resume": True})
    return SimpleNamespace(env=env, out=out, killed=killed, latest=latest, complete=complete, resumed=resumed,
                           max_steps=raw["training"]["max_steps"])


def test_a_job_killed_mid_run_is_crashed_and_keeps_its_checkpoint(killed_run):
    assert killed_run.killed["state_type"] == "CRASHED"
    assert killed_run.complete, killed_run.latest  # the checkpoint `latest` named after the kill: MANIFEST.json


def deployments(env: dict, pool: str) -> dict[str, dict]:
    return {d["name"]: d for d in api(env, "deployments/filter", {}) if d["work_pool_name"] == pool}


GPU_DEPLOY = "DISTILL_IMAGE=REGISTRY/distill-worker:0.1.0 prefect deploy --prefect-file deploy/gpu.yaml --all"
IMAGE = "registry.example.com/distill-worker:0.1.0"


@pytest.fixture(scope="module")
def docker_pool(worker):
    """The docker pool of deploy/README.md, made from deploy/docker-pool.json (no docker worker runs here)."""
    env, _ = worker
    prefect(env, *as_written("prefect work-pool create distill-docker --type docker "
                             "--base-job-template deploy/docker-pool.json"))
    return env


def test_process_deployments_need_only_the_process_pool_and_gpu_ones_an_image(worker, docker_pool):
    """`--all` of prefect.yaml on a process-only set-up (no docker pool, blocks or image); gpu.yaml on its own."""
    env, _ = worker
    assert set(deployments(env, "distill-process")) == PROCESS_DEPLOYMENTS  # deployed before the docker pool
    before = deployments(env, "distill-docker")
    refused = prefect(env, *as_written(GPU_DEPLOY), ok=False)  # DISTILL_IMAGE unset
    assert "DISTILL_IMAGE is not set" in refused and deployments(env, "distill-docker") == before, refused
    prefect({**env, "DISTILL_IMAGE": IMAGE}, *as_written(GPU_DEPLOY))
    nightly = deployments(env, "distill-docker")["pipeline-gpu-nightly"]
    assert nightly["job_variables"]["image"] == IMAGE and nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    # The schedule queues its next runs at once (deploy/README.md, section 4): Scheduled, at 02:00 UTC.
    query = {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}}}
    queued = wait_for(lambda: (lambda runs: runs if len(runs) >= 3 else None)(api(env, "flow_runs/filter", query)),
                      60, "the nightly runs")
    assert all(r["state_type"] == "SCHEDULED" and r["expected_start_time"][11:16] == "02:00" for r in queued)


def test_docker_pool_runs_get_every_gpu_and_16g_of_shared_memory(docker_pool):
    """The nightly deployment's job, rendered from the pool's template as a docker worker renders it."""
    from prefect.utilities.templating import apply_values

    env = docker_pool
    prefect({**env, "DISTILL_IMAGE": IMAGE}, *as_written(GPU_DEPLOY))
    import urllib.request

    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/work_pools/distill-docker") as r:
        template = json.loads(r.read())["base_job_template"]
    nightly = deployments(env, "distill-docker")["pipeline-gpu-nightly"]
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, **nightly["job_variables"]})
    assert job["image"] == IMAGE and job["image_pull_policy"] == "IfNotPresent"
    assert job["container_create_kwargs"] == {
        "shm_size": "16g", "device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]}


def test_a_worker_without_distill_home_fails_the_run_in_its_pull_step(worker, tmp_path):
    """Not a checkout (DISTILL_HOME unset): the run crashes in its pull step, before any flow code; the worker's
    output names the variable."""
    env, _ = worker
    deploy = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    deploy["deployments"] = [{**d, "name": "train-no-home", "work_pool": {**d["work_pool"], "name": "no-home"}}
                             for d in deploy["deployments"] if d["name"] == "train"]
    prefect(env, "work-pool", "create", "no-home", "--type", "process")
    prefect(env, "deploy", "--prefect-file", write(tmp_path / "prefect.yaml", deploy), "--name", "train-no-home")
    no_home = {k: v for k, v in env.items() if k != "DISTILL_HOME"}
    with process_worker(no_home, "no-home", tmp_path, tmp_path) as log:
        run_id = run(env, "train/train-no-home", {"config": "configs/demo/student.yaml"})
        state = finished(env, run_id, timeout=120)
    assert state["state_type"] == "CRASHED", state
    assert "Executing deployment step: run_shell_script" in logs(env, run_id)  # the run's log: the check failed
    assert "DISTILL_HOME=(unset) is not a distill checkout" in log.read_text()  # the worker's output: why
    assert not task_runs(env, run_id)


def test_deployed_train_with_a_bad_config_fails_in_its_first_task(worker, tmp_path):
    env, _ = worker
    config = write(tmp_path / "bad.yaml", tiny_raw(tmp_path / "run", training={"learning_rate": -1.0}))
    run_id = run(env, "train/train", {"config": config})
    assert finished(env, run_id)["state_type"] == "FAILED"
    tasks = task_runs(env, run_id)
    assert task_names(tasks) == ["check-config"] and tasks[0]["state_type"] == "FAILED"
    assert not (tmp_path / "run").exists()


def test_a_killed_job_resumes_from_its_checkpoint(killed_run):
    """The resume submitted by `killed_run` (after the GPU slot's lease of the killed job lapsed)."""
    env, out = killed_run.env, killed_run.out
    assert finished(env, killed_run.resumed)["state_type"] == "COMPLETED"
    assert (out / "checkpoints" / "latest").read_text() == f"step-{killed_run.max_steps:06d}"


def test_flow_defaults_name_what_the_demo_pipeline_writes():
    """The `bench` deployment's default is the demo student's `latest`; `compare` has no empty default."""
    from distill.config import load_config
    from flows.pipeline import load_pipeline

    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]}
    demo = load_pipeline(str(ROOT / deployments["pipeline"]["parameters"]["spec"]))
    output = load_config(str(ROOT / demo.student.config)).run.output
    assert deployments["bench"]["parameters"]["checkpoints"] == [f"{output}/checkpoints/latest"]
    assert deployments["compare"]["parameters"]["out"] == f"{output}/bench/compare"
    assert "reports" not in deployments["compare"]["parameters"]  # required: the server refuses a run without
