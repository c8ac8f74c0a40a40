import os

import pytest
import torch

from prefect_server import PrefectServer

# Two threads on two cores is erratic; tests are small enough for one.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture(scope="session")
def s3_server():
    from s3_server import start_s3_server

    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The loopback S3 server, with its credentials in the standard AWS environment variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return s3_server


PREFECT_SERVER = pytest.StashKey[PrefectServer]()


def pytest_collection_finish(session):
    """Start tests/test_deploy.py's Prefect server now, in the background, when a selected test uses it: it boots
    (about 20 s of one core) while the tests before that module run (see tests/prefect_server.py)."""
    if session.config.option.collectonly:
        return
    if any("prefect_server_process" in getattr(item, "fixturenames", ()) for item in session.items):
        session.config.stash[PREFECT_SERVER] = PrefectServer(session.config._tmp_path_factory.mktemp("prefect-home"))


def pytest_sessionfinish(session):
    server = session.config.stash.get(PREFECT_SERVER, None)
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def prefect_server_process(request, tmp_path_factory) -> PrefectServer:
    """The Prefect server started after collection (booting, or booted), or one started now."""
    if PREFECT_SERVER not in request.config.stash:
        request.config.stash[PREFECT_SERVER] = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    return request.config.stash[PREFECT_SERVER]
