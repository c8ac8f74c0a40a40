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


# Fixtures of the Prefect servers that conftest starts right after collection (tests/prefect_server.py).
PREFECT_SERVER_FIXTURES = ("prefect_server_process", "flows_prefect_server")
PREFECT_SERVERS = pytest.StashKey[dict]()


def prefect_server(config, name: str) -> PrefectServer:
    """The server of fixture `name`, started now unless it was already."""
    servers = config.stash.setdefault(PREFECT_SERVERS, {})
    if name not in servers:
        servers[name] = PrefectServer(config._tmp_path_factory.mktemp(f"prefect-home-{name}"))
    return servers[name]


def pytest_collection_finish(session):
    """Start the Prefect servers that the selected tests use now, in the background: each boots (about 20 s of one
    core) while the tests before its module run (see tests/prefect_server.py). Under pytest-xdist (`make test`) a
    worker does not know which modules it will get: each server starts when its module first asks for it, while
    the other worker goes on."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    for name in PREFECT_SERVER_FIXTURES:
        if any(name in getattr(item, "fixturenames", ()) for item in session.items):
            prefect_server(session.config, name)


# The longest modules first, longest to shortest, the others in file order: `make test` hands whole modules to two
# pytest-xdist workers, and a long module started last would leave one core idle at the end. Minutes of one worker,
# measured with --durations=0 on two cores (2026-12-05, 13 min 33 s in all, the cores 94 % busy): 5.5, 5.1, 5.1,
# then 2.1 to 0.7. The multi-rank modules' runs are most of the suite's CPU time: one run serves every test that
# needs it (tests/test_distributed.py's ZeRO-3 run), and a parametrization another one covers is left out.
LONGEST_MODULES = ("test_distributed.py", "test_reshard.py", "test_deploy.py", "test_flows.py", "test_checkpoint.py",
                   "test_wan.py", "test_demo.py", "test_shapes.py", "test_bench.py", "test_lora.py")


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # one process: file order (its Prefect servers boot meanwhile)
        return
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session):
    for server in session.config.stash.get(PREFECT_SERVERS, {}).values():
        server.stop()


@pytest.fixture(scope="session")
def prefect_server_process(request) -> PrefectServer:
    """tests/test_deploy.py's Prefect server (booting, or booted)."""
    return prefect_server(request.config, "prefect_server_process")


@pytest.fixture(scope="session")
def flows_prefect_server(request) -> PrefectServer:
    """The temporary Prefect server of tests/test_flows.py (booting, or booted)."""
    return prefect_server(request.config, "flows_prefect_server")
