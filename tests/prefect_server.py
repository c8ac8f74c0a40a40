"""A real `prefect server start` on loopback with its own home (database), for tests/test_deploy.py.

It takes about 20 s to boot (imports, then its new database's migrations), nearly all of it on one core.
conftest.py starts it in the background as soon as collection is done, when a selected test uses the
`prefect_server_process` fixture, so that it boots while the tests before test_deploy.py run on the other core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
                   PREFECT_API_URL="", **SERVER_POLLING)
        self.log = home / "server.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
