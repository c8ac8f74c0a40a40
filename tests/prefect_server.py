"""Real `prefect server start`s on loopback, each with its own home (database): tests/test_deploy.py's, and the
temporary server that tests/test_flows.py runs its flows against.

A server takes about 20 s to boot (imports, then its new database's migrations), nearly all of it on one core.
conftest.py starts each in the background as soon as collection is done, when a selected test uses its fixture,
so that it boots while the tests before those modules run on the other core.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from s3_server import free_port

BIN = Path(sys.executable).parent
# Polling intervals of the server, shorter than Prefect's defaults (they only decide how soon a change is noticed,
# not what happens): it revokes lapsed concurrency leases every 15 s, and tells a job waiting for a concurrency
# slot (the GPU slot) to retry after up to 30 s.
SERVER_POLLING = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
                  "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}


class PrefectServer:
    """`prefect server start` on a free port, started at construction; not waited for (clients wait as they need)."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                   PREFECT_API_URL="", PREFECT_UI_API_URL=self.api_url, **SERVER_POLLING)  # the UI's API here
        self.log = home / "server.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)

    def wait(self, timeout: float = 120) -> None:
        """Until the server answers its health check."""
        deadline = time.time() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{self.api_url}/health", timeout=2).read() == b"true":
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the Prefect server did not start (its log: {self.log})")
            time.sleep(0.2)


@contextlib.contextmanager
def flows_in_this_process(server: PrefectServer):
    """Flows run in this process against `server`, as prefect_test_harness (Prefect 3.9) runs them against the
    temporary server it starts: the API URL set in this context and in the process-global one (which threads that
    a test starts see), and the log and event workers drained before the server may stop."""
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    server.wait()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield

            async def drain_workers():  # as prefect_test_harness does on leaving
                try:
                    result = APILogWorker.instance().drain()
                    if inspect.isawaitable(result):
                        await result
                except RuntimeError:  # not started
                    pass
                result = EventsWorker.drain_all()
                if inspect.isawaitable(result):
                    await result

            run_coro_as_sync(drain_workers())
