"""Progress in the Prefect UI: a progress artifact per job, kept up to date; the launcher's noise kept out of
the flow log.

Jobs in this process (preprocessing, benchmarks) call the reporter; training runs under the deepspeed
launcher, so its progress comes from the progress lines its rank 0 writes (distill/progress.py).
"""

from __future__ import annotations

import re
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from distill.progress import ProgressCallback, parse_line

UPDATE_SECONDS = 1.0
"""At most one update of a progress artifact a second (the last one always goes)."""

_NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\] |^DeepSpeed \S+ built successfully")


def launcher_noise(line: str) -> bool:
    """A line of the launcher's own start-up (accelerator warnings, world-info dicts, the rank's command) or
    of DeepSpeed's info logging: logged at DEBUG level (PREFECT_LOGGING_LEVEL=DEBUG shows it), not INFO.
    DeepSpeed's errors are not noise."""
    return bool(_NOISE.match(line))


def progress_reporter(key: str, description: str) -> ProgressCallback:
    """A callback (done, total) that keeps the progress artifact `key` at done/total percent."""
    state = {"id": None, "last": 0.0}

    def report(done: int, total: int) -> None:
        if total <= 0:
            return
        percent = 100.0 * min(done, total) / total
        now = time.monotonic()
        if state["id"] is None:
            state["id"] = create_progress_artifact(percent, key=key, description=description)
        elif done >= total or now - state["last"] >= UPDATE_SECONDS:
            update_progress_artifact(state["id"], percent)
        else:
            return
        state["last"] = now

    return report


def follow_progress(line: str, what: str, report: ProgressCallback) -> bool:
    """Report `line` when it is a progress line of `what`; whether it was one."""
    parsed = parse_line(line)
    if parsed is None or parsed[0] != what:
        return False
    report(parsed[1], parsed[2])
    return True
