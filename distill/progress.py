"""Progress a person can follow: a tqdm bar on a terminal, else a line every so often.

A line reads `train 150/300 (50%) | dmd_loss 0.1234 | 0.45 s/it | ETA 1m07s`: what runs, done/total,
the values worth watching, seconds per unit, time left. `parse_line` reads one back (the flows turn
the launcher's output into a Prefect progress bar); `on_update(done, total)` hears every update of a
job in this process (preprocessing, benchmarks).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable

ProgressCallback = Callable[[int, int], None]
_LINE = re.compile(r"^(?P<what>[a-z][\w-]*) (?P<done>\d+)/(?P<total>\d+) \(\d+%\)")


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def parse_line(line: str) -> tuple[str, int, int] | None:
    """(what, done, total) of a progress line, None for any other line."""
    match = _LINE.match(line.strip())
    if match is None or int(match["total"]) <= 0:
        return None
    return match["what"], int(match["done"]), int(match["total"])


class Progress:
    """Counts `done` of `total` units of `what`; shows them as a bar (`bar=True` and a terminal on stderr)
    or writes a line to stdout at most every `every` units (and at the end); silent when not `enabled`
    (ranks other than 0), though `on_update` still hears it."""

    def __init__(self, what: str, total: int, *, initial: int = 0, unit: str = "it", every: int = 1,
                 bar: bool = False, enabled: bool = True, on_update: ProgressCallback | None = None):
        self.what, self.total, self.done, self.unit = what, total, initial, unit
        self.every = max(1, every)
        self.on_update = on_update
        self._initial = initial
        self._start = time.perf_counter()
        self._bar = None
        self._lines = enabled and not (bar and sys.stderr.isatty())
        if enabled and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=what, unit=unit)
        if on_update is not None:
            on_update(initial, total)

    def expect(self, n: int) -> None:
        """`n` more units to do than said at the start (a job that learns its size as it goes)."""
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def update(self, n: int = 1, values: dict[str, float] | None = None, note: str = "") -> None:
        """`n` more units done; `values` (losses) and `note` (what was just done) go on the line."""
        self.done += n
        if self.on_update is not None:
            self.on_update(self.done, self.total)
        if self._bar is not None:
            self._bar.update(n)
            if values:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
        elif self._lines and (self.done % self.every == 0 or self.done >= self.total):
            print(self.line(values, note), flush=True)

    def line(self, values: dict[str, float] | None = None, note: str = "") -> str:
        elapsed = time.perf_counter() - self._start
        per_unit = elapsed / max(1, self.done - self._initial)
        parts = [f"{self.what} {self.done}/{self.total} ({100 * self.done // max(1, self.total)}%)"]
        if note:
            parts.append(note)
        if values:
            parts.append(" ".join(f"{k} {v:.4g}" for k, v in values.items()))
        parts.append(f"{per_unit:.3g} s/{self.unit}")
        parts.append(f"ETA {format_seconds(per_unit * (self.total - self.done))}" if self.done < self.total
                     else f"done in {format_seconds(elapsed)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
